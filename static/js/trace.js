// Trace & compare: a layers x tokens heatmap of the strongest safety features, the per-layer chain,
// and for two prompts the per-feature differences.
(function () {
  "use strict";
  const SM = window.STARMAP;
  const $ = (id) => document.getElementById(id);
  const results = $("trace-results");

  function label(t) { return t.text === "" ? "·" : t.text.replace(/\n/g, "↵"); }

  function heatmap(node, trace, title) {
    const ticks = trace.tokens.map((t) => SM.escapeHtml(label(t)));
    const text = trace.grid.map((row, l) => row.map((v, i) => {
      const fid = trace.grid_features[l][i];
      const meta = fid && SM.features[fid];
      const expl = meta && meta.explanation ? SM.escapeHtml(meta.explanation.slice(0, 90)) : "";
      const token = SM.escapeHtml(JSON.stringify(trace.tokens[i].text));
      return `${token} · layer ${trace.layers[l]}<br>${fid ? `${SM.escapeHtml(fid)}: ${v.toFixed(3)}<br>${expl}` : "no active feature"}`;
    }));
    Plotly.newPlot(node, [{
      type: "heatmap", z: trace.grid, x: trace.tokens.map((_, i) => i), y: trace.layers.map((l) => `L${l}`),
      text, hovertemplate: "%{text}<extra></extra>", colorscale: [[0, "#fbfcfe"], [0.35, "#ffd8a8"], [0.7, "#f76707"], [1, "#862e08"]],
      zmin: 0, zmax: Math.max(1, ...trace.grid.flat()), colorbar: { title: { text: "norm.", side: "right" }, thickness: 10 },
      customdata: trace.grid_features, xgap: 1, ygap: 2,
    }], {
      title: { text: title, font: { size: 13 }, x: 0, xanchor: "left" },
      margin: { l: 40, r: 10, t: 30, b: 70 },
      xaxis: { tickvals: trace.tokens.map((_, i) => i), ticktext: ticks, tickangle: -50, tickfont: { size: 10 } },
      yaxis: { autorange: "reversed" },
    }, { displaylogo: false, responsive: true });
    node.on("plotly_click", (e) => {
      const p = e.points && e.points[0];
      const fid = p && trace.grid_features[p.pointIndex[0]][p.pointIndex[1]];
      if (fid) window.location.href = SM.featureUrl(fid);
    });
  }

  function chain(trace) {
    const wrap = SM.el("div", { class: "chain" });
    const stages = trace.chain.map((layer) => ({ title: `layer ${layer.layer}`, key: layer.layer, features: layer.features }));
    stages.push({ title: `refusal · p = ${trace.refusal.probability.toFixed(2)}`, key: "refusal", features: trace.refusal.features });
    for (const layer of stages) {
      const col = SM.el("div", { class: "chain-col", "data-layer": layer.key }, SM.el("h4", { text: layer.title }));
      if (!layer.features.length) col.append(SM.el("div", { class: "muted small", text: "nothing active" }));
      for (const f of layer.features) {
        const meta = SM.features[f.id] || {};
        const peak = trace.tokens[f.peak_token];
        col.append(SM.el("div", { class: "chain-feat", style: `border-left:3px solid ${SM.colour(SM.primaryDomain(meta))}` },
          SM.el("div", { class: "row", style: "justify-content:space-between" },
            SM.el("a", { class: "fid", href: SM.featureUrl(f.id), text: f.id }),
            SM.el("span", { class: "mono", text: f.max.toFixed(2) })),
          SM.el("div", { class: "muted", text: `peak on “${peak ? label(peak) : "?"}”` }),
          SM.el("div", { class: "expl", text: meta.explanation || "(no explanation)" })));
      }
      wrap.append(col);
    }
    return wrap;
  }

  function traceCard(trace, title) {
    const plot = SM.el("div", { class: "heat" });
    const card = SM.el("div", { class: "card stack trace-card" }, plot, SM.el("h3", { text: "Strongest features per layer" }), chain(trace));
    results.append(card);
    heatmap(plot, trace, title);
    return card;
  }

  function differences(body) {
    const rows = SM.el("tbody");
    for (const d of body.differences) {
      const meta = SM.features[d.id] || {};
      rows.append(SM.el("tr", {},
        SM.el("td", {}, SM.el("a", { class: "fid", href: SM.featureUrl(d.id), text: d.id })),
        SM.el("td", { class: "num", text: d.a.toFixed(3) }), SM.el("td", { class: "num", text: d.b.toFixed(3) }),
        SM.el("td", { class: "num " + (d.difference > 0 ? "diff-pos" : "diff-neg"), text: (d.difference > 0 ? "+" : "") + d.difference.toFixed(3) }),
        SM.el("td", { class: "expl" }, meta.explanation || "(no explanation)", SM.el("div", {}, SM.domainPills(meta.domains)))));
    }
    return SM.el("div", { class: "card", id: "differences" },
      SM.el("h3", { text: "Per-feature differences (max normalised activation over the prompt: A − B)" }),
      SM.el("table", { class: "feat-table" }, SM.el("thead", {}, SM.el("tr", {},
        SM.el("th", { text: "feature" }), SM.el("th", { text: "A" }), SM.el("th", { text: "B" }), SM.el("th", { text: "A − B" }),
        SM.el("th", { text: "explanation" }))), rows));
  }

  $("trace-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const a = $("prompt-a").value.trim();
    const b = $("prompt-b").value.trim();
    if (!a) return;
    const common = { sae_set: String(SM.setId), only_safety: $("only-safety").checked, chat_template: $("chat-template").checked, top_n: +$("top-n").value };
    $("trace-go").disabled = true;
    $("trace-status").replaceChildren(SM.el("span", { class: "spinner" }), " running the model…");
    try {
      results.replaceChildren();
      if (b) {
        const body = await SM.postJSON("/api/compare", { ...common, prompt_a: a, prompt_b: b });
        Object.assign(SM.features, body.features);
        const pair = SM.el("div", { class: "grid-2", id: "compare-pair" });
        results.append(pair);
        const left = traceCard(body.a, "A");
        const right = traceCard(body.b, "B");
        pair.append(left, right);
        left.querySelector(".heat") && Plotly.Plots.resize(left.querySelector(".heat"));
        right.querySelector(".heat") && Plotly.Plots.resize(right.querySelector(".heat"));
        results.append(SM.el("div", { style: "height:1rem" }), differences(body));
      } else {
        const body = await SM.postJSON("/api/trace", { ...common, prompt: a });
        Object.assign(SM.features, body.features);
        traceCard(body, "Layers × tokens: strongest normalised activation");
      }
      $("trace-status").textContent = "";
    } catch (error) {
      $("trace-status").textContent = "";
      SM.toast(error.message);
      results.replaceChildren(SM.el("div", { class: "banner", text: error.message }));
    } finally {
      $("trace-go").disabled = !SM.live;
    }
  });
})();
