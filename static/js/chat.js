// The chat page: stream an answer over SSE, render every token as a tinted chip, inspect tokens.
(function () {
  "use strict";
  const SM = window.STARMAP;
  const $ = (id) => document.getElementById(id);
  const transcript = $("transcript");
  const inspector = $("inspector");
  const historyKey = `starmap.chat.${SM.setId}`;
  let messages = JSON.parse(sessionStorage.getItem(historyKey) || "[]");
  let tokens = [];          // every token shown, by position
  let chips = [];           // their chips
  let turnBoxes = {};       // turn -> {box, body, summary}
  let pinned = null;
  let controller = null;
  const allDomains = Object.keys(SM.domainColours);
  const filter = SM.domainFilter($("domain-toggles"), allDomains, () => retint());

  function retint() {
    tokens.forEach((t, i) => chips[i] && SM.tintChip(chips[i], t, filter));
    for (const turn of Object.values(turnBoxes)) renderSummary(turn);
    showInspector(pinned === null ? null : tokens[pinned]);
  }
  function showInspector(token) { SM.featureTable(inspector, token, filter); }

  function turnBox(turn, role) {
    if (turnBoxes[turn]) return turnBoxes[turn];
    const summary = SM.el("span", { class: "turn-summary domains" });
    const body = SM.el("div", { class: "tokens" });
    const box = SM.el("div", { class: "turn", "data-turn": turn },
      SM.el("div", { class: "turn-head" }, SM.el("span", { class: `role role-${role}`, text: role }), summary), body);
    transcript.append(box);
    turnBoxes[turn] = { box, body, summary, role, domains: {} };
    return turnBoxes[turn];
  }
  // Per-turn summary: the strongest shown domains (from the server's turn summaries).
  function renderSummary(turn) {
    turn.summary.replaceChildren();
    const entries = Object.entries(turn.domains).filter(([d]) => filter.enabled(d)).slice(0, 4);
    for (const [d, v] of entries) {
      turn.summary.append(SM.el("span", { class: "dom", title: `strongest ${d} activation in this turn` },
        SM.el("span", { class: "dot", style: `background:${SM.colour(d)}` }), d, SM.el("span", { class: "val", text: v.toFixed(2) })));
    }
  }
  function addToken(token, live) {
    const turn = turnBox(token.turn, token.role);
    const chip = SM.appendToken(turn.body, token, filter);
    if (live) chip.classList.add("gen");
    tokens[token.i] = token;
    chips[token.i] = chip;
  }
  function reset() {
    transcript.replaceChildren();
    tokens = []; chips = []; turnBoxes = {}; pinned = null;
    showInspector(null);
  }
  transcript.addEventListener("mouseover", (e) => {
    const chip = e.target.closest(".tok");
    if (chip && pinned === null) showInspector(tokens[+chip.dataset.i]);
  });
  transcript.addEventListener("click", (e) => {
    const chip = e.target.closest(".tok");
    if (!chip) return;
    const i = +chip.dataset.i;
    chips.forEach((c) => c && c.classList.remove("sel"));
    if (pinned === i) { pinned = null; showInspector(null); return; }
    pinned = i;
    chip.classList.add("sel");
    showInspector(tokens[i]);
  });

  function rememberActive() {
    const active = new Set();
    for (const t of tokens) for (const [fid, v] of t.top || []) if (v >= 0.3) active.add(fid);
    sessionStorage.setItem(SM.activeKey(), JSON.stringify([...active]));
  }

  async function send(text) {
    const system = $("system").value.trim();
    const history = messages.slice();
    history.push({ role: "user", content: text });
    const payload = {
      messages: (system ? [{ role: "system", content: system }] : []).concat(history),
      max_new_tokens: +$("max-new").value, temperature: +$("temperature").value, seed: +$("seed").value,
      sae_set: String(SM.setId),
    };
    controller = new AbortController();
    $("send").disabled = true; $("stop").classList.remove("hidden");
    $("status").textContent = "waiting for the model…";
    const cursor = SM.el("span", { class: "cursor" });
    let generated = 0;
    const started = performance.now();
    try {
      await SM.streamSSE("/api/chat", payload, {
        queued: (d) => { $("status").textContent = `queued behind ${d.position} request(s)…`; },
        features: (d) => Object.assign(SM.features, d),
        prompt: (d) => {
          reset();
          d.tokens.forEach((t) => addToken(t, false));
          for (const s of d.turns) { const box = turnBox(s.turn, s.role); box.domains = s.domains; renderSummary(box); }
          const last = Object.values(turnBoxes).pop();
          if (last) last.body.append(cursor);
          $("status").textContent = "generating…";
        },
        token: (t) => {
          addToken(t, true);
          generated += 1;
          const box = turnBoxes[t.turn];
          box.body.append(cursor);
          $("status").textContent = `${generated} tokens · ${((performance.now() - started) / generated).toFixed(0)} ms/token`;
        },
        done: (d) => {
          for (const s of d.turns) { const box = turnBoxes[s.turn]; if (box) { box.domains = s.domains; renderSummary(box); } }
          messages = history.concat([{ role: "assistant", content: d.text }]);
          sessionStorage.setItem(historyKey, JSON.stringify(messages));
          $("status").textContent = `${d.n_tokens} tokens (${d.finish_reason}) · ${d.ms_per_token.toFixed(1)} ms/token on the server`;
          transcript.dataset.done = "1";
        },
        error: (d) => { throw new Error(d.detail); },
      }, controller.signal);
    } catch (error) {
      if (error.name === "AbortError") {
        $("status").textContent = `stopped after ${generated} tokens`;
        messages = history;
        sessionStorage.setItem(historyKey, JSON.stringify(messages));
      } else {
        $("status").textContent = "";
        SM.toast(error.message);
        transcript.append(SM.el("div", { class: "banner", text: error.message }));
      }
    } finally {
      cursor.remove();
      rememberActive();
      controller = null;
      $("send").disabled = !SM.live; $("stop").classList.add("hidden");
    }
  }

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("message").value.trim();
    if (!text || controller) return;
    $("message").value = "";
    transcript.dataset.done = "";
    send(text);
  });
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("composer").requestSubmit();
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (controller) controller.abort();
    messages = [];
    sessionStorage.removeItem(historyKey);
    reset();
    $("status").textContent = "";
  });
  showInspector(null);
  if (messages.length) {
    $("status").textContent = `${messages.length} earlier message(s) kept; the next answer re-reads them`;
  }
})();
