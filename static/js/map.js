// The neuron map: every explained feature on the UMAP plane (WebGL scatter), filters, search, click-through.
(function () {
  "use strict";
  const SM = window.STARMAP;
  const $ = (id) => document.getElementById(id);
  let data = null;
  let searchHits = new Set();
  const offDomains = new Set();
  const offLayers = new Set();

  const primary = (doms) => (doms && doms.length ? doms[0] : SM.OTHER);
  function wrap(text, width = 60) {
    const words = (text || "").split(/\s+/);
    const lines = [];
    let line = "";
    for (const w of words) {
      if ((line + " " + w).length > width && line) { lines.push(line); line = w; } else line = line ? line + " " + w : w;
    }
    if (line) lines.push(line);
    return lines.slice(0, 5).join("<br>");
  }
  const escapeHtml = SM.escapeHtml;

  function visibleRows() {
    const f = data.features;
    const minScore = +$("min-score").value;
    const rows = [];
    for (let i = 0; i < f.id.length; i++) {
      if (offLayers.has(f.layer[i])) continue;
      const doms = f.domains[i].length ? f.domains[i] : [SM.OTHER];
      if (!doms.some((d) => !offDomains.has(d))) continue;
      if (minScore > 0 && (f.score[i] === null || f.score[i] < minScore)) continue;
      rows.push(i);
    }
    return rows;
  }

  function trace(name, rows, marker) {
    const f = data.features;
    return {
      type: "scattergl", mode: "markers", name,
      x: rows.map((i) => f.x[i]), y: rows.map((i) => f.y[i]),
      customdata: rows.map((i) => f.id[i]),
      text: rows.map((i) => `<b>${escapeHtml(f.id[i])}</b> · layer ${f.layer[i]} · score ${f.score[i] === null ? "–" : f.score[i].toFixed(2)}<br>` +
        `${escapeHtml(f.domains[i].join(", ") || "no domain")}<br>${wrap(escapeHtml(f.explanation[i]))}`),
      hovertemplate: "%{text}<extra></extra>",
      marker,
    };
  }

  function draw() {
    const rows = visibleRows();
    const byDomain = new Map();
    for (const i of rows) {
      const d = primary(data.features.domains[i]);
      if (!byDomain.has(d)) byDomain.set(d, []);
      byDomain.get(d).push(i);
    }
    const traces = [];
    for (const [d, items] of [...byDomain.entries()].sort()) {
      traces.push(trace(d === SM.OTHER ? "other (no domain)" : escapeHtml(d), items,
        { size: 7, color: SM.colour(d), opacity: 0.78, line: { width: 0 } }));
    }
    const shown = new Set(rows);
    const ids = data.features.id;
    if ($("highlight-chat").checked) {
      const active = new Set(JSON.parse(sessionStorage.getItem(SM.activeKey()) || "[]"));
      const hits = rows.filter((i) => active.has(ids[i]));
      $("active-note").textContent = active.size ? `${hits.length} of the ${active.size} features active in the chat are shown` :
        "no chat yet in this tab: send a message on the chat page";
      traces.push(trace("active in chat", hits, { size: 14, symbol: "star", color: "#ffd43b", line: { width: 1, color: "#1d2433" } }));
    } else {
      $("active-note").textContent = "";
    }
    if (searchHits.size) {
      const hits = ids.map((id, i) => i).filter((i) => shown.has(i) && searchHits.has(ids[i]));
      traces.push(trace("search hits", hits, { size: 13, symbol: "circle-open", color: "#1d2433", line: { width: 2 } }));
    }
    const layout = {
      margin: { l: 30, r: 10, t: 10, b: 30 }, hovermode: "closest", dragmode: "pan",
      xaxis: { zeroline: false, showgrid: false, showticklabels: false },
      yaxis: { zeroline: false, showgrid: false, showticklabels: false, scaleanchor: "x" },
      legend: { orientation: "h", y: -0.02 }, plot_bgcolor: "#fbfcfe", paper_bgcolor: "#ffffff",
      hoverlabel: { bgcolor: "#fff", bordercolor: "#ccd", font: { size: 12 } },
    };
    Plotly.react("map-plot", traces, layout, { responsive: true, displaylogo: false, scrollZoom: true });
    $("map-count").textContent = `${rows.length.toLocaleString()} of ${data.n.toLocaleString()} features shown`;
    $("map-count").dataset.shown = rows.length;
    $("map-count").dataset.total = data.n;
  }

  function checkList(container, values, off, label, counts) {
    container.replaceChildren();
    for (const v of values) {
      const box = SM.el("input", { type: "checkbox", "data-value": v });
      box.checked = !off.has(v);
      box.addEventListener("change", () => { if (box.checked) off.delete(v); else off.add(v); draw(); });
      container.append(SM.el("label", {}, box, label(v), SM.el("span", { class: "count", text: counts.get(v) || 0 })));
    }
  }

  async function search(query) {
    const results = $("results");
    results.replaceChildren();
    if (!query.trim()) { searchHits = new Set(); draw(); return; }
    const body = await SM.fetchJSON(`/api/features?q=${encodeURIComponent(query)}&limit=200&sae_set=${SM.setId}`);
    searchHits = new Set(body.items.map((item) => item.id));
    for (const item of body.items.slice(0, 40)) {
      const steer = SM.el("button", { class: "small", type: "button", title: "add to the steering panel", text: "+ steer", style: "float:right" });
      steer.addEventListener("click", () => SM.steering.add(item.id));
      results.append(SM.el("li", {}, steer, SM.el("a", { class: "fid", href: SM.featureUrl(item.id), text: item.id }), item.explanation || ""));
    }
    if (!body.items.length) results.append(SM.el("li", { class: "muted", text: "no explanation matches" }));
    draw();
  }

  async function load() {
    data = await SM.fetchJSON(`/api/map?sae_set=${SM.setId}`);
    $("projection").textContent = `${data.projection}. ${data.n_explained - data.n ? (data.n_explained - data.n) + " explained features lack coordinates." : ""}`;
    const domainCounts = new Map();
    const layerCounts = new Map();
    data.features.domains.forEach((doms, i) => {
      for (const d of doms.length ? doms : [SM.OTHER]) domainCounts.set(d, (domainCounts.get(d) || 0) + 1);
      layerCounts.set(data.features.layer[i], (layerCounts.get(data.features.layer[i]) || 0) + 1);
    });
    const domains = [...data.domains, ...(domainCounts.has(SM.OTHER) ? [SM.OTHER] : [])];
    checkList($("domain-list"), domains, offDomains,
      (d) => SM.el("span", { class: "dom" }, SM.el("span", { class: "dot", style: `background:${SM.colour(d)}` }), d === SM.OTHER ? "other" : d),
      domainCounts);
    checkList($("layer-list"), data.layers, offLayers, (l) => SM.el("span", { text: `layer ${l}` }), layerCounts);
    draw();
    $("map-plot").on("plotly_click", (event) => {
      const point = event.points && event.points[0];
      if (point && point.customdata) window.location.href = SM.featureUrl(point.customdata);
    });
  }

  $("min-score").addEventListener("input", () => { $("min-score-value").textContent = (+$("min-score").value).toFixed(2); draw(); });
  $("highlight-chat").addEventListener("change", draw);
  let timer = null;
  $("search").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => search($("search").value).catch((e) => SM.toast(e.message)), 220); });
  load().catch((error) => { $("map-count").textContent = error.message; });
})();
