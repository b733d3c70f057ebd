// StarMap shared browser code: token chips, feature tables, SSE over fetch, the steering store.
// Model text is only ever inserted with textContent, never as markup.
(function () {
  "use strict";
  const SM = window.STARMAP;
  const OTHER = "other";
  SM.OTHER = OTHER;
  SM.features = {};

  SM.colour = function (domain) {
    if (!domain || domain === OTHER) return "#868e96";
    if (SM.domainColours[domain]) return SM.domainColours[domain];
    let h = 0;
    for (const c of domain) h = (h * 31 + c.charCodeAt(0)) % 360;
    return `hsl(${h} 60% 45%)`;
  };
  SM.rgba = function (colour, alpha) {
    if (colour.startsWith("#")) {
      const n = parseInt(colour.slice(1), 16);
      return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
    }
    return colour.replace("hsl(", "hsla(").replace(")", ` / ${alpha})`);
  };
  SM.el = function (tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k === "style") node.style.cssText = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  };
  // Plotly reads a subset of HTML in hover text, tick labels and legends: model and database text is escaped.
  // Numeric entities for quotes: Plotly decodes &#34; but shows &quot; as written.
  SM.escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&#34;", "'": "&#39;" }[c]));
  SM.featureUrl = (fid) => `/features/${encodeURIComponent(fid)}?sae_set=${SM.setId}`;
  SM.fmt = (v, digits = 2) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

  SM.toast = function (message) {
    const node = document.getElementById("toast");
    node.textContent = message;
    node.classList.add("show");
    clearTimeout(SM._toastTimer);
    SM._toastTimer = setTimeout(() => node.classList.remove("show"), 2200);
  };

  SM.errorText = function (body, status) {
    if (body && Array.isArray(body.detail)) {
      return body.detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`).join("; ");
    }
    if (body && body.detail) return String(body.detail);
    return `HTTP ${status}`;
  };
  // Bound beyond loopback, the server asks for its API token on model runs and writes (401 otherwise).
  const TOKEN_KEY = "starmap.apiToken";
  SM.authHeaders = function (headers) {
    const token = localStorage.getItem(TOKEN_KEY);
    return token ? { ...(headers || {}), Authorization: `Bearer ${token}` } : { ...(headers || {}) };
  };
  const tokenField = document.getElementById("api-token");
  if (tokenField) {
    tokenField.value = localStorage.getItem(TOKEN_KEY) || "";
    tokenField.addEventListener("change", () => {
      if (tokenField.value) localStorage.setItem(TOKEN_KEY, tokenField.value); else localStorage.removeItem(TOKEN_KEY);
    });
  }

  SM.fetchJSON = async function (url, options = {}) {
    const response = await fetch(url, { ...options, headers: SM.authHeaders(options.headers) });
    const text = await response.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (_) { body = { detail: text }; }
    if (!response.ok) throw new Error(SM.errorText(body, response.status));
    return body;
  };
  SM.postJSON = (url, payload) => SM.fetchJSON(url, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload),
  });

  // Server-Sent Events from a POST (EventSource can only GET). Calls handlers[event](data).
  SM.streamSSE = async function (url, payload, handlers, signal) {
    const response = await fetch(url, {
      method: "POST", headers: SM.authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(payload), signal,
    });
    if (!response.ok) {
      let body = null;
      try { body = await response.json(); } catch (_) { /* not JSON */ }
      throw new Error(SM.errorText(body, response.status));
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        }
        if (handlers[event]) handlers[event](JSON.parse(data.join("\n")));
      }
    }
  };

  // Domain toggles: which domains tint tokens and show in tables ("other" = explained, no domain).
  SM.domainFilter = function (container, domains, onChange) {
    const key = `starmap.domains.${SM.setId}`;
    let off = new Set(JSON.parse(sessionStorage.getItem(key) || "[]"));
    const filter = {
      enabled: (d) => !off.has(d || OTHER),
      passes: (meta) => {
        if (!meta) return false;
        const doms = meta.domains && meta.domains.length ? meta.domains : [OTHER];
        return doms.some((d) => !off.has(d));
      },
    };
    container.replaceChildren();
    for (const d of [...domains, OTHER]) {
      const pill = SM.el("span", { class: "dom toggle" + (off.has(d) ? " off" : ""), "data-domain": d, title: "show / hide" },
        SM.el("span", { class: "dot", style: `background:${SM.colour(d)}` }), d === OTHER ? "other (no domain)" : d);
      pill.addEventListener("click", () => {
        if (off.has(d)) off.delete(d); else off.add(d);
        pill.classList.toggle("off", off.has(d));
        sessionStorage.setItem(key, JSON.stringify([...off]));
        onChange();
      });
      container.append(pill);
    }
    return filter;
  };

  // The strongest shown feature of a token: what tints its chip.
  SM.strongest = function (token, filter) {
    for (const [fid, value] of token.top || []) {
      const meta = SM.features[fid];
      if (!filter || filter.passes(meta)) return { fid, value, meta };
    }
    return null;
  };
  SM.primaryDomain = (meta) => (meta && meta.domains && meta.domains.length ? meta.domains[0] : OTHER);

  SM.tokenLabel = function (text) {
    if (text === "") return "·";
    // Long runs of blanks would stretch a chip across the page: show them counted.
    return text.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ {5,}/g, (run) => `␣×${run.length}`);
  };
  SM.tintChip = function (chip, token, filter) {
    if (token.content === false) {
      chip.style.background = "";
      chip.title = "template or system prompt: shown, never counted";
      return;
    }
    const best = SM.strongest(token, filter);
    if (!best || best.value <= 0) {
      chip.style.background = "";
      chip.title = "no counted feature";
      return;
    }
    const alpha = Math.min(0.9, 0.1 + 0.75 * Math.min(best.value, 1.2) / 1.2);
    chip.style.background = SM.rgba(SM.colour(SM.primaryDomain(best.meta)), alpha.toFixed(3));
    chip.title = `${best.fid} · ${best.value.toFixed(2)}`;
  };
  SM.tokenChip = function (token, filter) {
    const classes = ["tok"];
    if (token.special) classes.push("special");
    if (token.content === false) classes.push("template");
    if (token.text === "") classes.push("partial");
    if (token.text.includes("\n")) classes.push("nl");
    const chip = SM.el("span", { class: classes.join(" "), "data-i": token.i, "data-role": token.role, text: SM.tokenLabel(token.text) });
    if (token.text === "") chip.title = "part of a multi-byte character";
    SM.tintChip(chip, token, filter);
    return chip;
  };
  SM.appendToken = function (container, token, filter) {
    const chip = SM.tokenChip(token, filter);
    container.append(chip);
    if (token.text.endsWith("\n") && !token.special) container.append(SM.el("br"));
    return chip;
  };

  SM.domainPills = function (domains) {
    const wrap = SM.el("span", { class: "domains" });
    for (const d of domains || []) {
      wrap.append(SM.el("span", { class: "dom" }, SM.el("span", { class: "dot", style: `background:${SM.colour(d)}` }), d));
    }
    return wrap;
  };
  SM.actBar = function (value, colour) {
    const width = Math.max(2, Math.min(100, (value / 1.5) * 100));
    return SM.el("div", { class: "actbar" }, SM.el("i", { style: `width:${width}%;background:${SM.rgba(colour, 0.45)}` }),
      SM.el("span", { text: value.toFixed(3) }));
  };

  // The token inspector: its top features, strongest first, across all hooked layers.
  SM.featureTable = function (container, token, filter, options = {}) {
    container.replaceChildren();
    if (!token) {
      container.append(SM.el("div", { class: "inspector-empty", text: "Hover or click a token to see its features." }));
      return;
    }
    container.append(SM.el("div", { class: "row", style: "margin-bottom:.5rem" },
      SM.el("span", { class: "inspector-token", text: token.text === "" ? "(partial character)" : JSON.stringify(token.text).slice(1, -1) }),
      SM.el("span", { class: "muted small", text: `position ${token.i} · ${token.role} · id ${token.id}` +
        (token.content === false ? " · template, not counted" : "") })));
    const rows = (token.top || []).filter(([fid]) => !filter || filter.passes(SM.features[fid]));
    if (!rows.length) {
      container.append(SM.el("div", { class: "inspector-empty", text: "No counted feature is active on this token (for the shown domains)." }));
      return;
    }
    const body = SM.el("tbody");
    for (const [fid, value] of rows) {
      const meta = SM.features[fid] || {};
      const steerButton = options.noSteer ? null : SM.el("button", { class: "small", title: "add to the steering panel", text: "+ steer" });
      if (steerButton) steerButton.addEventListener("click", (e) => { e.stopPropagation(); SM.steering.add(fid); });
      body.append(
        SM.el("tr", { class: "head-row", "data-feature": fid },
          SM.el("td", {}, SM.el("a", { class: "fid", href: SM.featureUrl(fid), text: fid })),
          SM.el("td", { class: "num", style: "width:45%" }, SM.actBar(value, SM.colour(SM.primaryDomain(meta)))),
          SM.el("td", { class: "num", title: meta.score_method ? `${meta.score_method} score` : "no score" }, SM.fmt(meta.score)),
          SM.el("td", { style: "text-align:right" }, steerButton)),
        SM.el("tr", { class: "expl-row" },
          SM.el("td", { colspan: 4, class: "expl" }, meta.explanation || "(no explanation)", SM.domainPills(meta.domains))));
    }
    container.append(SM.el("table", { class: "feat-table" },
      SM.el("thead", {}, SM.el("tr", {}, SM.el("th", { text: "feature" }), SM.el("th", { text: "normalised activation" }),
        SM.el("th", { text: "score" }), SM.el("th"))),
      body));
  };

  // The steering panel's features, kept per SAE set in localStorage (shared by every page).
  SM.steering = {
    key: () => `starmap.steer.${SM.setId}`,
    list() { return JSON.parse(localStorage.getItem(this.key()) || "[]"); },
    save(items) { localStorage.setItem(this.key(), JSON.stringify(items)); window.dispatchEvent(new Event("starmap-steering")); },
    add(fid, mode = "clamp", value = 4) {
      const items = this.list();
      if (items.some((i) => i.feature === fid)) { SM.toast(`${fid} is already in the steering panel`); return; }
      items.push({ feature: fid, mode, value, scope: "both" });
      this.save(items);
      SM.toast(`${fid} added to the steering panel`);
    },
  };

  // Features active in the current chat, for the map to highlight.
  SM.activeKey = () => `starmap.active.${SM.setId}`;

  const picker = document.getElementById("set-select");
  if (picker) {
    picker.addEventListener("change", () => {
      const url = new URL(window.location.href);
      url.searchParams.set("sae_set", picker.value);
      if (document.body.dataset.page === "feature") url.pathname = "/map";
      window.location.href = url.toString();
    });
  }
})();
