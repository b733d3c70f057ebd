// The token inspector and the domain toggles (chat and steering pages).
// This stays in the browser on purpose: hovering a chip must show its features at once, without a round trip
// per token. Everything it shows is rendered by the server: each chip carries its features as a small JSON
// island (data-top: [[feature id, normalised activation], ...]), each feature's inspector rows arrive once as a
// <template> in the scope's .feature-lib (the stream's `features` event, or the steering results), and the
// inspector's frame is the page's #inspector-parts template. This script clones those, sets the activation
// bars, and re-tints chips when the reader hides a domain (a view filter kept in this tab).
(function () {
  "use strict";
  const SM = window.STARMAP;
  const parts = document.getElementById("inspector-parts");
  if (!parts) return;
  const part = (name) => parts.content.querySelector(`[data-part="${name}"]`).cloneNode(true);
  const filterKey = `starmap.domains.${SM.setId}`;
  const off = new Set(JSON.parse(sessionStorage.getItem(filterKey) || "[]"));
  let generation = 0;            // bumped when the filter changes: chips tinted under an older one are re-tinted
  const pinned = new Map();      // scope -> its selected chip

  const scopes = () => document.querySelectorAll("[data-inspect]");
  const chipsOf = (scope) => scope.querySelectorAll(".tok[data-top]");
  const filtered = (scope) => Boolean(scope.dataset.filter);
  const libraries = new WeakMap(); // .feature-lib -> Map(feature id -> its <template>), rebuilt as it grows
  function entry(scope, fid) {
    const lib = scope.querySelector(".feature-lib");
    if (!lib) return null;
    let byId = libraries.get(lib);
    if (!byId || byId.size !== lib.children.length) {
      byId = new Map([...lib.children].map((template) => [template.dataset.feature, template]));
      libraries.set(lib, byId);
    }
    return byId.get(fid) || null;
  }
  // A feature is shown unless every domain it has is hidden ("other" = explained, no domain).
  function passes(template) {
    if (!template) return false;
    const domains = JSON.parse(template.dataset.domains || "[]");
    return (domains.length ? domains : [SM.OTHER]).some((d) => !off.has(d));
  }
  function shownFeatures(scope, chip) {
    const rows = JSON.parse(chip.dataset.top || "[]").map(([fid, value]) => ({ fid, value, template: entry(scope, fid) }));
    return filtered(scope) ? rows.filter((row) => passes(row.template)) : rows;
  }

  function show(scope, chip) {
    const box = document.getElementById(scope.dataset.inspect);
    if (!box) return;
    if (!chip) { box.replaceChildren(part("empty")); return; }
    const head = part("head");
    head.children[0].textContent = chip.textContent === "·" ? "(partial character)" : chip.textContent;
    head.children[1].textContent = `position ${chip.dataset.i} · ${chip.dataset.role} · id ${chip.dataset.id}` +
      (chip.dataset.content === "0" ? " · template, not counted" : "");
    const rows = shownFeatures(scope, chip);
    if (!rows.length) { box.replaceChildren(head, part("none")); return; }
    const table = part("table");
    for (const { fid, value, template } of rows) {
      const rowsOf = (template || part("unknown")).content.cloneNode(true);
      if (!template) {
        rowsOf.querySelector("tr").dataset.feature = fid;
        const link = rowsOf.querySelector("a.fid");
        link.textContent = fid;
        link.href = SM.featureUrl(fid);
      }
      rowsOf.querySelector(".actbar > i").style.width = `${Math.max(2, Math.min(100, (value / 1.5) * 100))}%`;
      rowsOf.querySelector(".actbar > span").textContent = value.toFixed(3);
      table.tBodies[0].append(rowsOf);
    }
    box.replaceChildren(head, table);
    htmx.process(box); // the rows' "+ steer" buttons
  }
  // Click pins a chip (a second click unpins it); the arrow keys move the pin.
  function pin(scope, chip, toggle = true) {
    const before = pinned.get(scope);
    if (before) before.classList.remove("sel");
    if (chip && !(toggle && chip === before)) {
      chip.classList.add("sel");
      pinned.set(scope, chip);
      chip.scrollIntoView({ block: "nearest" });
    } else {
      pinned.delete(scope);
      chip = null;
    }
    show(scope, chip);
  }
  const current = (scope) => {
    const chip = pinned.get(scope);
    return chip && chip.isConnected ? chip : null;
  };

  // Chip tint under the domain filter: the strongest shown feature's colour, deeper with its activation.
  function tint(scope, chip) {
    chip.dataset.g = generation;
    if (chip.dataset.content === "0") return;
    const best = shownFeatures(scope, chip)[0];
    if (!best || best.value <= 0) { chip.style.background = ""; chip.title = "no counted feature"; return; }
    const alpha = Math.min(0.9, 0.1 + 0.75 * Math.min(best.value, 1.2) / 1.2);
    chip.style.background = SM.rgba(best.template.dataset.colour, alpha.toFixed(3));
    chip.title = `${best.fid} · ${best.value.toFixed(2)}`;
  }
  // Turn summaries list the four strongest shown domains.
  function summaries(scope) {
    for (const summary of scope.querySelectorAll(".turn-summary")) {
      let shown = 0;
      for (const pill of summary.querySelectorAll(".dom[data-domain]")) {
        pill.hidden = off.has(pill.dataset.domain) || ++shown > 4;
      }
    }
  }
  function refilter(scope, all) {
    if (!filtered(scope)) return;
    for (const chip of scope.querySelectorAll(all ? ".tok[data-top]" : `.tok[data-top]:not([data-g="${generation}"])`)) tint(scope, chip);
    summaries(scope);
  }

  // Delegated from the document: a scope (the transcript, the steering answers) may be swapped in later.
  const scopeOf = (node) => (node instanceof Element ? node.closest("[data-inspect]") : null);
  document.addEventListener("mouseover", (event) => {
    const chip = event.target instanceof Element && event.target.closest(".tok[data-top]");
    const scope = chip && scopeOf(chip);
    if (scope && !current(scope)) show(scope, chip);
  });
  document.addEventListener("click", (event) => {
    const chip = event.target instanceof Element && event.target.closest(".tok[data-top]");
    const scope = chip && scopeOf(chip);
    if (scope) pin(scope, chip);
  });
  // Keyboard: with the transcript (or the answers) focused, the arrow keys walk the chips (Home/End: first and
  // last), Escape unpins.
  document.addEventListener("keydown", (event) => {
    const scope = event.target instanceof Element && event.target.matches("[data-inspect]") ? event.target : null;
    if (!scope) return;
    const chips = [...chipsOf(scope)];
    if (!chips.length) return;
    const at = chips.indexOf(current(scope));
    const moves = { ArrowRight: at + 1, ArrowDown: at + 1, ArrowLeft: at < 0 ? chips.length - 1 : at - 1, ArrowUp: at - 1, Home: 0, End: chips.length - 1 };
    if (event.key === "Escape") { pin(scope, null); event.preventDefault(); return; }
    if (!(event.key in moves)) return;
    event.preventDefault();
    pin(scope, chips[Math.max(0, Math.min(chips.length - 1, moves[event.key]))], false);
  });
  const known = new WeakSet();
  function adopt(scope) {
    if (known.has(scope)) return;
    known.add(scope);
    show(scope, null);
    refilter(scope, true);
  }
  scopes().forEach(adopt);

  // Server-rendered pieces arriving (stream events, partial swaps): tint the new chips under the filter.
  const settled = () => {
    for (const scope of scopes()) {
      adopt(scope);
      if (!current(scope) && pinned.has(scope)) { pinned.delete(scope); show(scope, null); }
      if (off.size) refilter(scope, false);
    }
  };
  document.body.addEventListener("htmx:sseMessage", settled);
  document.body.addEventListener("htmx:afterSettle", settled);

  // The domain toggles (server-rendered buttons): hide or show a domain in tints, summaries and the inspector.
  const toggles = document.getElementById("domain-toggles");
  if (toggles) {
    const mark = (button) => {
      const hidden = off.has(button.dataset.domain);
      button.classList.toggle("off", hidden);
      button.setAttribute("aria-pressed", String(!hidden));
    };
    toggles.querySelectorAll("[data-domain]").forEach(mark);
    toggles.addEventListener("click", (event) => {
      const button = event.target.closest("[data-domain]");
      if (!button) return;
      const domain = button.dataset.domain;
      if (off.has(domain)) off.delete(domain); else off.add(domain);
      sessionStorage.setItem(filterKey, JSON.stringify([...off]));
      mark(button);
      generation += 1;
      for (const scope of scopes()) {
        refilter(scope, true);
        show(scope, current(scope));
      }
    });
  }

  // When an answer's stream closes, remember its active features for the map's "highlight" (this tab only).
  document.body.addEventListener("htmx:sseClose", () => {
    const active = new Set();
    for (const scope of scopes()) {
      for (const chip of chipsOf(scope)) {
        for (const [fid, value] of JSON.parse(chip.dataset.top || "[]")) if (value >= 0.3) active.add(fid);
      }
    }
    sessionStorage.setItem(SM.activeKey(), JSON.stringify([...active]));
  });
})();
