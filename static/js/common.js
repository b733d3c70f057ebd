// StarMap's shared browser code. The pages are server-rendered (Jinja partials fetched with htmx); what is left
// here is what has to run in the browser: the API token on htmx's requests, the set picker, live slider values,
// and the colour rule that Plotly's traces share with the server's chips (app/render.py).
(function () {
  "use strict";
  const SM = window.STARMAP;
  const OTHER = "other";
  SM.OTHER = OTHER;

  // Domain colours: the fixed palette, else a hue hashed from the name (app/render.py:domain_colour).
  SM.colour = function (domain) {
    if (!domain || domain === OTHER) return "#868e96";
    if (SM.domainColours[domain]) return SM.domainColours[domain];
    let h = 0;
    for (let i = 0; i < domain.length; i++) h = (h * 31 + domain.charCodeAt(i)) % 360;
    return `hsl(${h} 60% 45%)`;
  };
  SM.rgba = function (colour, alpha) {
    if (colour.startsWith("#")) {
      const n = parseInt(colour.slice(1), 16);
      return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
    }
    return colour.replace("hsl(", "hsla(").replace(")", ` / ${alpha})`);
  };
  // Plotly reads a subset of HTML in hover text, tick labels and legends: model and database text is escaped.
  // Numeric entities for quotes: Plotly decodes &#34; but shows &quot; as written.
  SM.escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&#34;", "'": "&#39;" }[c]));
  SM.featureUrl = (fid) => `/features/${encodeURIComponent(fid)}?sae_set=${SM.setId}`;
  // Features active in the current chat, for the map to highlight (kept per tab).
  SM.activeKey = () => `starmap.active.${SM.setId}`;

  // Bound beyond loopback, the server asks for its API token on model runs and writes (401 otherwise); htmx's
  // requests carry it from this browser's storage. (The chat's EventSource cannot send headers: the POST that
  // opens a stream carries the token and answers with a one-time stream id.)
  const TOKEN_KEY = "starmap.apiToken";
  const tokenField = document.getElementById("api-token");
  if (tokenField) {
    tokenField.value = localStorage.getItem(TOKEN_KEY) || "";
    tokenField.addEventListener("change", () => {
      if (tokenField.value) localStorage.setItem(TOKEN_KEY, tokenField.value); else localStorage.removeItem(TOKEN_KEY);
    });
  }
  document.body.addEventListener("htmx:configRequest", (event) => {
    const token = localStorage.getItem(TOKEN_KEY);
    if (token) event.detail.headers.Authorization = `Bearer ${token}`;
  });

  // A slider's value shown beside it while it moves (<output data-for="slider id">).
  document.addEventListener("input", (event) => {
    const slider = event.target;
    if (!(slider instanceof HTMLInputElement) || slider.type !== "range" || !slider.id) return;
    for (const out of document.querySelectorAll(`output[data-for="${CSS.escape(slider.id)}"]`)) {
      out.textContent = (+slider.value).toFixed(2);
    }
  });

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
