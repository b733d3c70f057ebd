// The feature page: the activation histogram and the steering button.
(function () {
  "use strict";
  const SM = window.STARMAP;
  const hist = SM.feature.histogram;
  if (hist && hist.edges && hist.counts) {
    const centres = hist.counts.map((_, i) => (hist.edges[i] + hist.edges[i + 1]) / 2);
    const widths = hist.counts.map((_, i) => hist.edges[i + 1] - hist.edges[i]);
    Plotly.newPlot("histogram", [{ type: "bar", x: centres, y: hist.counts, width: widths, marker: { color: "#e8590c" },
      hovertemplate: "activation %{x:.3f}<br>%{y} tokens<extra></extra>" }], {
      margin: { l: 40, r: 8, t: 6, b: 34 }, bargap: 0.05,
      xaxis: { title: { text: "raw activation (non-zero)", font: { size: 11 } } }, yaxis: { title: { text: "tokens", font: { size: 11 } }, rangemode: "tozero" },
    }, { displaylogo: false, responsive: true });
  }
  document.getElementById("add-steer").addEventListener("click", () => SM.steering.add(SM.feature.id));
})();
