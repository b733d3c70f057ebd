// Plotly glue of the neuron map. Plotly draws from arrays, not from HTML, so this is the one place a page still
// fetches JSON: the map's columns (/api/map, once). What is shown is the server's answer, not this script's:
// the filters partial names the shown rows (#map-visible) and the search partial the hits (#search-hits), both
// JSON islands beside their HTML; this script only turns them into traces and follows a click to the feature.
(function () {
  "use strict";
  const SM = window.STARMAP;
  const plot = document.getElementById("map-plot");
  if (SM.setId === null || !plot) return;
  const escapeHtml = SM.escapeHtml;
  let data = null;

  const island = (id) => {
    const node = document.getElementById(id);
    return node ? JSON.parse(node.textContent) : null;
  };
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
    if (!data) return;
    const visible = island("map-visible");
    const rows = visible || data.features.id.map((_, i) => i);
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
    const ids = data.features.id;
    const note = document.getElementById("active-note");
    if (document.getElementById("highlight-chat").checked) {
      const active = new Set(JSON.parse(sessionStorage.getItem(SM.activeKey()) || "[]"));
      const hits = rows.filter((i) => active.has(ids[i]));
      note.textContent = active.size ? `${hits.length} of the ${active.size} features active in the chat are shown` :
        "no chat yet in this tab: send a message on the chat page";
      traces.push(trace("active in chat", hits, { size: 14, symbol: "star", color: "#ffd43b", line: { width: 1, color: "#1d2433" } }));
    } else {
      note.textContent = "";
    }
    const searchHits = new Set(island("search-hits") || []);
    if (searchHits.size) {
      const hits = rows.filter((i) => searchHits.has(ids[i]));
      traces.push(trace("search hits", hits, { size: 13, symbol: "circle-open", color: "#1d2433", line: { width: 2 } }));
    }
    const layout = {
      margin: { l: 30, r: 10, t: 10, b: 30 }, hovermode: "closest", dragmode: "pan",
      xaxis: { zeroline: false, showgrid: false, showticklabels: false },
      yaxis: { zeroline: false, showgrid: false, showticklabels: false, scaleanchor: "x" },
      legend: { orientation: "h", y: -0.02 }, plot_bgcolor: "#fbfcfe", paper_bgcolor: "#ffffff",
      hoverlabel: { bgcolor: "#fff", bordercolor: "#ccd", font: { size: 12 } },
    };
    Plotly.react(plot, traces, layout, { responsive: true, displaylogo: false, scrollZoom: true });
    plot.dataset.shown = rows.length; // what is drawn, for the browser tests to compare with the server's count
  }

  // Redraw when the server's answer to a search or a filter change has settled in.
  document.body.addEventListener("htmx:afterSettle", (event) => {
    if (event.target.closest && event.target.closest("#map-view, #search-results")) draw();
  });
  fetch(`/api/map?sae_set=${SM.setId}`)
    .then((response) => (response.ok ? response.json() : Promise.reject(new Error(`map data: HTTP ${response.status}`))))
    .then((body) => {
      data = body;
      draw();
      plot.on("plotly_click", (event) => {
        const point = event.points && event.points[0];
        if (point && point.customdata) window.location.href = SM.featureUrl(point.customdata);
      });
    })
    .catch((error) => { document.getElementById("map-count").textContent = error.message; });
})();
