// Plotly glue of the feature page: the activation histogram, drawn from the page's JSON island (Plotly draws
// from arrays). Everything else on the page is server-rendered.
(function () {
  "use strict";
  const island = document.getElementById("histogram-data");
  const hist = island && JSON.parse(island.textContent);
  if (hist && hist.edges && hist.counts) {
    const centres = hist.counts.map((_, i) => (hist.edges[i] + hist.edges[i + 1]) / 2);
    const widths = hist.counts.map((_, i) => hist.edges[i + 1] - hist.edges[i]);
    Plotly.newPlot("histogram", [{ type: "bar", x: centres, y: hist.counts, width: widths, marker: { color: "#e8590c" },
      hovertemplate: "activation %{x:.3f}<br>%{y} tokens<extra></extra>" }], {
      margin: { l: 40, r: 8, t: 6, b: 34 }, bargap: 0.05,
      xaxis: { title: { text: "raw activation (non-zero)", font: { size: 11 } } }, yaxis: { title: { text: "tokens", font: { size: 11 } }, rangemode: "tozero" },
    }, { displaylogo: false, responsive: true });
  }
})();
