// Steering: a panel of features with a slider each, default vs steered answers with the same seed, presets.
(function () {
  "use strict";
  const SM = window.STARMAP;
  const $ = (id) => document.getElementById(id);
  const ranges = SM.valueRanges;
  const inspector = $("steer-inspector");
  const runs = { default: [], steered: [] };

  async function ensureMeta(ids) {
    const missing = ids.filter((id) => !SM.features[id]);
    await Promise.all(missing.map(async (id) => {
      try { SM.features[id] = await SM.fetchJSON(`/api/features/${encodeURIComponent(id)}?sae_set=${SM.setId}`); }
      catch (_) { SM.features[id] = { id, explanation: "(not in the database)", domains: [] }; }
    }));
  }

  function slider(item, onChange) {
    const [lo, hi] = ranges[item.mode];
    const step = item.mode === "scale" ? 0.1 : 0.25;
    const input = SM.el("input", { type: "range", min: lo, max: hi, step, "aria-label": `${item.feature} value` });
    input.value = item.value;
    input.disabled = item.mode === "ablate";
    input.addEventListener("input", () => onChange(+input.value));
    return input;
  }

  async function renderPanel() {
    const items = SM.steering.list();
    await ensureMeta(items.map((i) => i.feature));
    const panel = $("panel");
    panel.replaceChildren();
    if (!items.length) {
      panel.append(SM.el("div", { class: "muted small", text: "No features yet. Add them here, from a token in the chat, the map, or a feature page." }));
    }
    items.forEach((item, idx) => {
      const meta = SM.features[item.feature] || {};
      const value = SM.el("span", { class: "value", text: item.mode === "ablate" ? "0" : (+item.value).toFixed(2) });
      const update = (patch) => {
        const list = SM.steering.list();
        Object.assign(list[idx], patch);
        SM.steering.save(list);
      };
      const mode = SM.el("select", { "aria-label": `${item.feature} mode` });
      for (const m of Object.keys(ranges)) mode.append(SM.el("option", { value: m, text: m }));
      mode.value = item.mode;
      mode.addEventListener("change", () => {
        const [lo, hi] = ranges[mode.value];
        const defaults = { clamp: 4, scale: 2, ablate: 0, add: 4 };
        update({ mode: mode.value, value: Math.min(hi, Math.max(lo, defaults[mode.value])) });
      });
      const scope = SM.el("select", { "aria-label": `${item.feature} scope` });
      for (const s of ["both", "prompt", "response"]) scope.append(SM.el("option", { value: s, text: s }));
      scope.value = item.scope;
      scope.addEventListener("change", () => update({ scope: scope.value }));
      const range = slider(item, (v) => { value.textContent = v.toFixed(2); const list = SM.steering.list(); list[idx].value = v; localStorage.setItem(SM.steering.key(), JSON.stringify(list)); });
      const remove = SM.el("button", { class: "small", type: "button", title: "remove", text: "✕" });
      remove.addEventListener("click", () => { const list = SM.steering.list(); list.splice(idx, 1); SM.steering.save(list); });
      panel.append(SM.el("div", { class: "steer-row", "data-feature": item.feature },
        SM.el("div", { class: "top" }, SM.el("a", { class: "fid", href: SM.featureUrl(item.feature), text: item.feature }),
          SM.domainPills(meta.domains), SM.el("span", { style: "flex:1" }), remove),
        SM.el("div", { class: "expl", title: meta.explanation || "", text: meta.explanation || "(no explanation)" }),
        SM.el("div", { class: "controls" }, mode, range, value, scope)));
    });
  }
  window.addEventListener("starmap-steering", renderPanel);

  let timer = null;
  $("add-feature").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const q = $("add-feature").value.trim();
      const list = $("add-results");
      list.replaceChildren();
      if (!q) return;
      if (/^\d+_\d+$/.test(q)) {
        const item = SM.el("li", {}, SM.el("a", { href: "#", class: "fid", text: `add ${q}` }));
        item.addEventListener("click", (e) => { e.preventDefault(); SM.steering.add(q); list.replaceChildren(); $("add-feature").value = ""; });
        list.append(item);
        return;
      }
      try {
        const body = await SM.fetchJSON(`/api/features?q=${encodeURIComponent(q)}&limit=15&sae_set=${SM.setId}`);
        for (const f of body.items) {
          SM.features[f.id] = SM.features[f.id] || f;
          const li = SM.el("li", {}, SM.el("a", { href: "#", class: "fid", text: f.id }), " ", f.explanation || "");
          li.addEventListener("click", (e) => { e.preventDefault(); SM.steering.add(f.id); list.replaceChildren(); $("add-feature").value = ""; });
          list.append(li);
        }
        if (!body.items.length) list.append(SM.el("li", { class: "muted", text: "no match" }));
      } catch (error) { SM.toast(error.message); }
    }, 220);
  });
  $("clear-panel").addEventListener("click", () => SM.steering.save([]));

  function renderRun(name, run) {
    const node = $(`answer-${name}`);
    node.replaceChildren();
    runs[name] = run.response;
    for (const t of run.response) {
      const chip = SM.appendToken(node, t, null);
      chip.dataset.run = name;
    }
    node.dataset.text = run.text;
    node.title = `finish: ${run.finish_reason}`;
  }
  function mean(values) { return values.length ? values.reduce((a, b) => a + b, 0) / values.length : 0; }
  function renderTracked(body) {
    const rows = $("tracked");
    rows.replaceChildren();
    const nPrompt = body.default.prompt.length;
    for (const item of body.interventions) {
      const d = body.default.tracked[item.feature].slice(nPrompt);
      const s = body.steered.tracked[item.feature].slice(body.steered.prompt.length);
      rows.append(SM.el("tr", { "data-feature": item.feature },
        SM.el("td", {}, SM.el("a", { class: "fid", href: SM.featureUrl(item.feature), text: item.feature })),
        SM.el("td", { text: `${item.mode}${item.mode === "ablate" ? "" : " " + item.value} · ${item.scope}` +
          (body.steered.tracked_units[item.feature] === "raw" ? " · raw units (no normaliser)" : "") }),
        SM.el("td", { class: "num", text: mean(d).toFixed(3) }), SM.el("td", { class: "num", text: Math.max(0, ...d).toFixed(3) }),
        SM.el("td", { class: "num", text: mean(s).toFixed(3) }), SM.el("td", { class: "num", text: Math.max(0, ...s).toFixed(3) })));
    }
    $("tracked-card").classList.remove("hidden");
  }
  $("answers").addEventListener("click", (e) => {
    const chip = e.target.closest(".tok");
    if (!chip) return;
    document.querySelectorAll("#answers .tok.sel").forEach((c) => c.classList.remove("sel"));
    chip.classList.add("sel");
    const token = runs[chip.dataset.run].find((t) => String(t.i) === chip.dataset.i);
    SM.featureTable(inspector, token, null);
  });

  $("steer-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const interventions = SM.steering.list().map(({ feature, mode, value, scope }) => ({ feature, mode, value: +value, scope }));
    if (!interventions.length) { SM.toast("Add at least one feature to the steering panel"); return; }
    $("steer-go").disabled = true;
    $("steer-status").replaceChildren(SM.el("span", { class: "spinner" }), " generating both answers…");
    try {
      const body = await SM.postJSON("/api/steer", {
        messages: [{ role: "user", content: $("steer-prompt").value }], interventions,
        max_new_tokens: +$("steer-max").value, temperature: +$("steer-temp").value, seed: +$("steer-seed").value,
        sae_set: String(SM.setId),
      });
      Object.assign(SM.features, body.features);
      renderRun("default", body.default);
      renderRun("steered", body.steered);
      renderTracked(body);
      $("steer-status").textContent = `seed ${body.seed} · ${body.default.response.length} / ${body.steered.response.length} tokens`;
      $("answers").dataset.done = "1";
    } catch (error) {
      $("steer-status").textContent = "";
      SM.toast(error.message);
    } finally {
      $("steer-go").disabled = !SM.live;
    }
  });

  async function refreshPresets(select) {
    const presets = await SM.fetchJSON(`/api/presets?sae_set=${SM.setId}`);
    const list = $("preset-list");
    list.replaceChildren(...presets.map((p) => SM.el("option", { value: p.name, text: `${p.name} (${p.interventions.length})` })));
    if (select) list.value = select;
  }
  $("preset-save").addEventListener("click", async () => {
    const name = $("preset-name").value.trim();
    if (!name) { SM.toast("Name the preset first"); return; }
    try {
      await SM.postJSON("/api/presets", { name, sae_set: String(SM.setId), interventions: SM.steering.list() });
      await refreshPresets(name);
      SM.toast(`preset “${name}” saved`);
    } catch (error) { SM.toast(error.message); }
  });
  $("preset-load").addEventListener("click", async () => {
    const name = $("preset-list").value;
    if (!name) return;
    try {
      const preset = await SM.fetchJSON(`/api/presets/${encodeURIComponent(name)}`);
      SM.steering.save(preset.interventions);
      SM.toast(`preset “${name}” loaded`);
    } catch (error) { SM.toast(error.message); }
  });
  $("preset-delete").addEventListener("click", async () => {
    const name = $("preset-list").value;
    if (!name) return;
    try {
      await SM.fetchJSON(`/api/presets/${encodeURIComponent(name)}`, { method: "DELETE" });
      await refreshPresets();
    } catch (error) { SM.toast(error.message); }
  });

  renderPanel();
  refreshPresets().catch((e) => SM.toast(e.message));
  SM.featureTable(inspector, null, null);
})();
