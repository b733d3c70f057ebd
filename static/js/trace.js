// Plotly glue of the trace page: each trace card's heatmap, drawn from the card's JSON island (Plotly draws from
// arrays). The cards themselves (the chain, the refusal stage, the monitors, the differences) are rendered by the
// server (templates/partials/trace_results.html); clicking a cell opens the feature behind it.
(function () {
  "use strict";
  const SM = window.STARMAP;
  const label = (text) => (text === "" ? "·" : text.replace(/\n/g, "↵"));

  function heatmap(node, heat) {
    const ticks = heat.tokens.map((t) => SM.escapeHtml(label(t)));
    const text = heat.grid.map((row, l) => row.map((v, i) => {
      const fid = heat.grid_features[l][i];
      const expl = fid && heat.explanations[fid] ? SM.escapeHtml(heat.explanations[fid]) : "";
      const token = SM.escapeHtml(JSON.stringify(heat.tokens[i]));
      return `${token} · layer ${heat.layers[l]}<br>${fid ? `${SM.escapeHtml(fid)}: ${v.toFixed(3)}<br>${expl}` : "no active feature"}`;
    }));
    Plotly.newPlot(node, [{
      type: "heatmap", z: heat.grid, x: heat.tokens.map((_, i) => i), y: heat.layers.map((l) => `L${l}`),
      text, hovertemplate: "%{text}<extra></extra>", colorscale: [[0, "#fbfcfe"], [0.35, "#ffd8a8"], [0.7, "#f76707"], [1, "#862e08"]],
      zmin: 0, zmax: Math.max(1, ...heat.grid.flat()), colorbar: { title: { text: "norm.", side: "right" }, thickness: 10 },
      customdata: heat.grid_features, xgap: 1, ygap: 2,
    }], {
      title: { text: SM.escapeHtml(heat.title), font: { size: 13 }, x: 0, xanchor: "left" },
      margin: { l: 40, r: 10, t: 30, b: 70 },
      xaxis: { tickvals: heat.tokens.map((_, i) => i), ticktext: ticks, tickangle: -50, tickfont: { size: 10 } },
      yaxis: { autorange: "reversed" },
    }, { displaylogo: false, responsive: true });
    node.on("plotly_click", (e) => {
      const p = e.points && e.points[0];
      const fid = p && heat.grid_features[p.pointIndex[0]][p.pointIndex[1]];
      if (fid) window.location.href = SM.featureUrl(fid);
    });
  }

  function drawAll() {
    for (const card of document.querySelectorAll("#trace-results .trace-card")) {
      const node = card.querySelector(".heat");
      if (node.dataset.drawn) continue;
      node.dataset.drawn = "1";
      heatmap(node, JSON.parse(card.querySelector(".heat-data").textContent));
    }
  }
  document.body.addEventListener("htmx:afterSettle", (event) => {
    if (event.target.id === "trace-results") drawAll();
  });
  drawAll();
})();
