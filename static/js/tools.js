/* Training tools pages: the compare chart and picker, template actions, playground helpers. */
(function () {
  "use strict";

  function errorMessage(xhr) {
    try {
      var body = JSON.parse(xhr.responseText);
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON */ }
    if (!xhr.status) return "The server could not be reached. Check your connection and try again.";
    if (xhr.status === 403) return "Your role does not allow this.";
    if (xhr.status >= 500) return "Something went wrong on our side (HTTP " + xhr.status + "). Try again in a moment.";
    return "The request failed (HTTP " + xhr.status + ").";
  }

  function showError(message) {
    var box = document.querySelector(".action-error");
    if (!box) {
      box = document.createElement("div");
      box.className = "action-error alert alert-error";
      box.setAttribute("role", "alert");
      var content = document.getElementById("content");
      content.insertBefore(box, content.firstChild);
    }
    box.textContent = message;
    box.hidden = false;
    box.scrollIntoView({ block: "nearest", behavior: "smooth" });
  }

  /* --- Server and network errors of htmx requests: say so instead of doing nothing ------- */
  // The element that made the request (event.detail.elt can be the swap target).
  function source(detail) {
    var elt = (detail.requestConfig && detail.requestConfig.elt) || detail.elt;
    return elt && elt.closest ? elt : document.body;
  }
  function isFormValidation(detail) {
    return detail.xhr.status === 400 && !!source(detail).closest("form");
  }

  document.addEventListener("htmx:responseError", function (event) {
    // A 400 from a form carries its own validation message in the swapped HTML.
    if (isFormValidation(event.detail)) return;
    showError(errorMessage(event.detail.xhr));
    // A failed poll stops the polling: say so in the card instead of spinning forever.
    var run = source(event.detail).closest("#playground-run");
    if (run) {
      run.setAttribute("aria-busy", "false");
      var spinner = run.querySelector(".run-progress .spinner");
      if (spinner) spinner.remove();
      var stage = run.querySelector(".run-stage");
      if (stage) stage.textContent = "Updates stopped.";
      var note = run.querySelector(".run-progress p");
      if (note) {
        note.innerHTML = "";
        var link = document.createElement("a");
        link.href = window.location.href;
        link.textContent = "Reload to check on this run";
        note.appendChild(link);
      }
    }
  });
  document.addEventListener("htmx:sendError", function () {
    showError("The server could not be reached. Check your connection and try again.");
  });
  // Forms answered with 400 still swap their re-rendered HTML (field errors).
  document.addEventListener("htmx:beforeSwap", function (event) {
    if (isFormValidation(event.detail)) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });

  /* --- Template delete (through the API) ----------------------------------------------- */
  document.addEventListener("htmx:afterRequest", function (event) {
    var elt = event.detail.elt;
    if (!elt || !elt.getAttribute || elt.getAttribute("data-tool-action") !== "delete-template") return;
    if (!event.detail.successful) return; // responseError shows it
    var card = elt.closest("[data-template]");
    if (card) card.remove();
    if (!document.querySelector("[data-template]")) window.location.reload();
  });

  /* --- Plain forms: a busy button while the page loads --------------------------------- */
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.matches("form[data-loading-text]") || form.hasAttribute("hx-post")) return;
    var button = form.querySelector("button[type=submit]");
    if (!button) return;
    if (form.dataset.busy === "1") { event.preventDefault(); return; } // no double starts
    form.dataset.busy = "1";
    button.setAttribute("aria-disabled", "true");
    button.classList.add("htmx-request");
    var label = button.querySelector("span:last-child");
    if (label) label.textContent = form.dataset.loadingText;
  });
  window.addEventListener("pageshow", function () {
    document.querySelectorAll("form[data-busy]").forEach(function (form) {
      form.removeAttribute("data-busy");
      var button = form.querySelector("button[type=submit]");
      if (button) { button.removeAttribute("aria-disabled"); button.classList.remove("htmx-request"); }
    });
  });

  /* --- Playground --------------------------------------------------------------------- */
  document.addEventListener("change", function (event) {
    if (event.target.matches("select[data-autosubmit]")) event.target.form.submit();
    if (event.target.id === "only-differences") applyDifferences();
  });
  document.addEventListener("click", function (event) {
    var chip = event.target.closest("[data-example]");
    if (!chip) return;
    var prompt = document.getElementById("prompt");
    if (!prompt) return;
    prompt.value = chip.getAttribute("data-example");
    prompt.focus();
  });
  document.addEventListener("keydown", function (event) {
    if (event.target.id !== "prompt" || event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
    event.preventDefault();
    var form = event.target.form;
    if (form.requestSubmit) form.requestSubmit(); else form.submit();
  });
  // After a form comes back with errors, focus the first field to fix.
  document.addEventListener("htmx:afterSettle", function (event) {
    var invalid = document.querySelector("#playground-form [aria-invalid=true]");
    if (invalid && event.detail.xhr && event.detail.xhr.status === 400) {
      var details = invalid.closest("details");
      if (details) details.open = true;
      invalid.focus();
    }
  });
  // After an answer arrives, move focus to it for keyboard and screen-reader users.
  document.addEventListener("htmx:afterSwap", function (event) {
    var run = document.getElementById("playground-run");
    if (run && run.dataset.status === "completed" && event.detail.target === run) run.focus();
  });

  /* --- Compare: picker ------------------------------------------------------------------- */
  var picker = document.getElementById("compare-picker");
  if (picker) {
    var max = Number(picker.dataset.max || 4);
    var submit = document.getElementById("compare-submit");
    var count = document.getElementById("pick-count");
    var update = function () {
      var boxes = picker.querySelectorAll("input[name=jobs]");
      var n = 0;
      boxes.forEach(function (box) {
        if (box.checked) n += 1;
        box.closest("tr").classList.toggle("is-selected", box.checked);
      });
      if (count) {
        count.textContent = n + " of " + max + " selected";
        count.classList.toggle("pick-over", n > max);
      }
      var ok = n >= 2 && n <= max;
      submit.setAttribute("aria-disabled", ok ? "false" : "true");
      submit.disabled = !ok;
      submit.title = ok ? "" : (n > max ? "At most " + max + " jobs" : "Pick at least 2 jobs");
    };
    picker.addEventListener("change", update);
    picker.addEventListener("submit", function () {
      picker.querySelector(".picker-footer").classList.add("is-loading");
    });
    update();
  }

  function applyDifferences() {
    var box = document.getElementById("only-differences");
    var table = document.getElementById("compare-hyperparameters");
    if (!box || !table) return;
    table.classList.toggle("only-differences", box.checked);
  }
  applyDifferences();

  /* --- Compare: overlaid loss curves (Chart.js) ----------------------------------------- */
  var dataNode = document.getElementById("compare-chart-data");
  var canvas = document.getElementById("compare-chart");
  if (!dataNode || !canvas || typeof window.Chart === "undefined") return;
  var config = JSON.parse(dataNode.textContent);
  var css = getComputedStyle(document.documentElement);
  function token(name, fallback) { return (css.getPropertyValue(name) || "").trim() || fallback; }
  function points(pairs) { return pairs.map(function (p) { return { x: p[0], y: p[1] }; }); }
  var datasets = [];
  config.jobs.forEach(function (job) {
    var many = job.train.length > 120;
    datasets.push({
      label: job.name + " · train", data: points(job.train), borderColor: job.colour, backgroundColor: job.colour,
      borderWidth: 2, pointRadius: many ? 0 : 1.5, pointHoverRadius: 4, tension: .25,
    });
    if (job.val.length) {
      datasets.push({
        label: job.name + " · validation", data: points(job.val), borderColor: job.colour, backgroundColor: job.colour,
        borderWidth: 2, borderDash: [6, 4], pointRadius: 3, pointStyle: "rectRot", tension: .2, spanGaps: true,
      });
    }
  });
  var Chart = window.Chart;
  Chart.defaults.font.family = token("--font-sans", "system-ui, sans-serif");
  Chart.defaults.font.size = 12;
  Chart.defaults.color = token("--text-3", "#667085");
  var grid = token("--border", "#e4e7ec");
  new Chart(canvas, {
    type: "line",
    data: { datasets: datasets },
    options: {
      responsive: true, maintainAspectRatio: false, animation: false, parsing: false, normalized: true,
      interaction: { mode: "nearest", axis: "x", intersect: false },
      plugins: {
        legend: { position: "bottom", labels: { usePointStyle: true, boxWidth: 8, boxHeight: 8 } },
        tooltip: {
          callbacks: {
            title: function (items) { return items.length ? "Step " + items[0].parsed.x : ""; },
            label: function (item) { return " " + item.dataset.label + ": " + Number(item.parsed.y).toFixed(4); },
          },
        },
      },
      scales: {
        x: { type: "linear", min: 0, title: { display: true, text: "Step" }, grid: { color: grid }, ticks: { precision: 0 } },
        y: { type: "linear", title: { display: true, text: "Loss" }, grid: { color: grid }, ticks: { callback: function (v) { return Number(v).toFixed(2); } } },
      },
    },
  });
  canvas.dataset.rendered = "1";
})();
