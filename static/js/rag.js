// RAG explorer: the generating state goes when the answer arrives; a citation [n] opens and
// scrolls to its evidence (the <details id="evidence-n"> panel).
(function () {
  document.addEventListener("htmx:afterSwap", function (event) {
    if (event.detail.target && event.detail.target.id === "rag-answer") {
      var generating = document.getElementById("generating");
      if (generating) generating.remove();
      var retrieved = document.getElementById("retrieved-list");
      if (retrieved) retrieved.remove();
    }
  });
  document.addEventListener("htmx:responseError", function (event) {
    if (event.detail.target && event.detail.target.id === "rag-answer") {
      var generating = document.getElementById("generating");
      if (generating) generating.textContent = "The answer could not be generated (" + event.detail.xhr.status + ").";
    }
  });
  document.addEventListener("click", function (event) {
    var cite = event.target.closest("a.rag-cite[data-source]");
    if (!cite) return;
    var panel = document.getElementById("evidence-" + cite.dataset.source);
    if (!panel) return;
    event.preventDefault();
    panel.open = true;
    panel.scrollIntoView({ behavior: "smooth", block: "center" });
    history.replaceState(null, "", "#evidence-" + cite.dataset.source);
  });
})();
