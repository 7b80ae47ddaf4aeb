// The admin page's only script of its own: the copy button for a new key.
// (htmx does everything else; inline scripts are blocked by the page's CSP.)
(function () {
  "use strict";

  function copied(button, text) {
    var status = button.parentElement.querySelector(".copy-status");
    if (status) { status.textContent = text; }
  }

  function fallbackCopy(el) {
    var range = document.createRange();
    range.selectNodeContents(el);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    try { return document.execCommand("copy"); } catch (e) { return false; }
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) { return; }
    var el = document.getElementById(button.getAttribute("data-copy"));
    if (!el) { return; }
    var text = el.textContent.trim();
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(
        function () { copied(button, "Copied."); },
        function () { copied(button, fallbackCopy(el) ? "Copied." : "Select it and copy by hand."); }
      );
    } else {
      copied(button, fallbackCopy(el) ? "Copied." : "Select it and copy by hand.");
    }
  });

  // After htmx swaps a new page into <main>, move keyboard focus there (like a page load).
  document.addEventListener("htmx:afterSwap", function (event) {
    var target = event.detail && event.detail.target;
    if (target && target.id === "main" && event.detail.requestConfig &&
        event.detail.requestConfig.verb === "get" && !target.contains(document.activeElement)) {
      target.focus({ preventScroll: true });
    }
  });
})();
