// The chat page is htmx: the form posts to /chat/turn, the answer streams in through htmx's SSE extension as
// rendered chips (templates/partials/chat_*.html). Only this remains: the conversation so far (the #history
// field, which the server sends back with every answer) survives a reload of this tab.
(function () {
  "use strict";
  const SM = window.STARMAP;
  const key = `starmap.chat.${SM.setId}`;
  const field = () => document.getElementById("history");
  let kept = sessionStorage.getItem(key);
  if (kept && field()) {
    field().value = kept;
    const n = JSON.parse(kept).length;
    if (n) document.getElementById("status").textContent = `${n} earlier message(s) kept; the next answer re-reads them`;
  }
  document.body.addEventListener("htmx:afterSettle", () => {
    const value = field() && field().value;
    if (value && value !== kept) {
      kept = value;
      sessionStorage.setItem(key, value);
    }
  });
})();
