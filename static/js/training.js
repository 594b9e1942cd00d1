/* Training pages: job actions through the API (the loss chart lives in training-dash.js). */
(function () {
  "use strict";

  /* --- Actions: hx-post to /api/v1/training/jobs/<id>/{cancel,retry} ------------------ */

  function showActionError(elt, message) {
    var scope = elt.closest("#training-jobs") || document;
    var box = scope.querySelector(".action-error") || document.querySelector(".action-error");
    if (!box) { window.alert(message); return; }
    box.textContent = message;
    box.hidden = false;
    box.scrollIntoView({ block: "nearest", behavior: "smooth" });
  }

  function errorMessage(xhr) {
    try {
      var body = JSON.parse(xhr.responseText);
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON */ }
    if (!xhr.status) return "The server could not be reached. Try again.";
    return "The request failed (HTTP " + xhr.status + ").";
  }

  document.addEventListener("htmx:afterRequest", function (event) {
    var elt = event.detail.elt;
    var action = elt && elt.getAttribute && elt.getAttribute("data-job-action");
    if (!action) return;
    var xhr = event.detail.xhr;
    if (!event.detail.successful) {
      showActionError(elt, errorMessage(xhr));
      return;
    }
    if (action === "retry") {
      try {
        var job = JSON.parse(xhr.responseText);
        if (job && job.id) { window.location.assign("/training/" + job.id + "/"); return; }
      } catch (e) { /* fall through */ }
    }
    window.location.reload();
  });

  /* --- Filters: leave empty fields out of the URL that gets pushed ----------------------- */

  document.addEventListener("htmx:configRequest", function (event) {
    if (!event.detail.elt.matches || !event.detail.elt.matches("form.filters")) return;
    var params = event.detail.parameters;
    var empty = [];
    if (typeof params.forEach === "function") {
      params.forEach(function (value, key) { if (value === "") empty.push(key); });
    } else {
      Object.keys(params).forEach(function (key) { if (params[key] === "") empty.push(key); });
    }
    empty.forEach(function (key) { if (params.delete) params.delete(key); else delete params[key]; });
  });
})();
