/* Training dashboard: list selection for Compare, more filters, live-refresh errors, and the
   job charts (loss curves and learning-rate schedule) drawn from the chart JSON endpoint. */
(function () {
  "use strict";

  /* --- More filters ------------------------------------------------------------------ */

  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("[data-toggle-filters]");
    if (!button) return;
    var panel = document.getElementById(button.getAttribute("aria-controls"));
    if (!panel) return;
    var open = panel.hidden;
    panel.hidden = !open;
    button.setAttribute("aria-expanded", open ? "true" : "false");
    if (open) {
      var first = panel.querySelector("select, input");
      if (first) first.focus();
    }
  });

  /* --- Compare selection (kept across the live table refresh) -------------------------- */

  var selected = [];
  var MAX_COMPARE = 4;

  function syncCompare() {
    var checks = document.querySelectorAll(".compare-check");
    checks.forEach(function (box) {
      box.checked = selected.indexOf(box.value) !== -1;
      box.disabled = !box.checked && selected.length >= MAX_COMPARE;
    });
    var button = document.getElementById("compare-button");
    var count = document.querySelector("[data-compare-count]");
    if (button) button.disabled = selected.length < 2;
    if (count) {
      count.textContent = selected.length
        ? selected.length + " selected" + (selected.length < 2 ? ", pick one more" : "")
        : "Select 2 to 4 jobs to compare";
    }
    var form = document.getElementById("compare-form");
    if (form) {
      // Selected jobs on other pages still count: carry them as hidden inputs.
      form.querySelectorAll("input[data-carry]").forEach(function (n) { n.remove(); });
      var visible = Array.prototype.map.call(checks, function (b) { return b.value; });
      selected.forEach(function (id) {
        if (visible.indexOf(id) !== -1) return;
        var input = document.createElement("input");
        input.type = "hidden"; input.name = "jobs"; input.value = id;
        input.setAttribute("data-carry", "1");
        form.appendChild(input);
      });
    }
  }

  document.addEventListener("change", function (event) {
    var box = event.target;
    if (!box.classList || !box.classList.contains("compare-check")) return;
    var at = selected.indexOf(box.value);
    if (box.checked && at === -1) selected.push(box.value);
    if (!box.checked && at !== -1) selected.splice(at, 1);
    syncCompare();
  });

  /* --- Loading and server-error states of htmx requests --------------------------------- */

  function liveBox(elt) {
    var scope = elt.closest ? elt.closest("#training-jobs, .main") : null;
    return (scope || document).querySelector(".live-error");
  }

  document.addEventListener("htmx:beforeRequest", function (event) {
    var elt = event.detail.elt;
    if (elt && elt.setAttribute && elt.id) elt.setAttribute("aria-busy", "true");
  });

  function signedOut(xhr) {
    try {
      return !!(xhr && xhr.responseURL && /\/login\/$/.test(new URL(xhr.responseURL).pathname));
    } catch (e) { return false; }
  }

  // A session that ended answers with the sign-in page (a redirect): never swap it into a
  // part of this page.
  document.addEventListener("htmx:beforeSwap", function (event) {
    if (signedOut(event.detail.xhr)) event.detail.shouldSwap = false;
  });

  document.addEventListener("htmx:afterRequest", function (event) {
    var elt = event.detail.elt;
    if (elt && elt.setAttribute && elt.id) elt.setAttribute("aria-busy", "false");
    if (elt && elt.getAttribute && elt.getAttribute("data-job-action")) return; // training.js
    var box = liveBox(elt);
    if (!box) return;
    var xhr = event.detail.xhr;
    var ended = signedOut(xhr);
    if (event.detail.successful && !ended) { box.hidden = true; return; }
    var status = ended ? 401 : xhr && xhr.status;
    var message;
    if (!status) message = "The server could not be reached; showing the last known state.";
    else if (status === 401 || status === 403) message = "Your session ended or your role changed. Sign in again to keep following this page.";
    else if (status >= 500) message = "The server had a problem refreshing this (HTTP " + status + "); it tries again shortly.";
    else message = "This could not be refreshed (HTTP " + status + ").";
    box.textContent = message;
    box.hidden = false;
  });

  document.addEventListener("htmx:afterSettle", function () { syncCompare(); });

  /* --- Job charts ---------------------------------------------------------------------- */

  var state = null;

  function token(name, fallback) {
    var css = getComputedStyle(document.documentElement);
    return (css.getPropertyValue(name) || "").trim() || fallback;
  }

  function xy(pairs) {
    return pairs.map(function (p) { return { x: p[0], y: p[1] }; });
  }

  function lossTick(value) { return Number(value).toFixed(2); }
  function lrTick(value) { return value === 0 ? "0" : Number(value).toExponential(1).replace(".0e", "e"); }

  function build(canvas, config, data) {
    var Chart = window.Chart;
    var colors = {
      train: token("--accent", "#4f46e5"),
      val: token("--warning-solid", "#f79009"),
      lr: token("--neutral-solid", "#98a2b3"),
      grid: token("--border", "#e4e7ec"),
      text: token("--text-3", "#667085"),
    };
    Chart.defaults.font.family = token("--font-sans", "system-ui, sans-serif");
    Chart.defaults.font.size = 12;
    Chart.defaults.color = colors.text;
    var many = data.train.length > 120;
    return new Chart(canvas, {
      type: "line",
      data: {
        datasets: [
          { label: "Train loss", data: xy(data.train), yAxisID: "y", borderColor: colors.train,
            backgroundColor: "rgba(79, 70, 229, .08)", borderWidth: 2, pointRadius: many ? 0 : 2,
            pointHoverRadius: 4, tension: .25, fill: true },
          { label: "Validation loss", data: xy(data.val), yAxisID: "y", borderColor: colors.val,
            backgroundColor: colors.val, borderWidth: 2, pointRadius: 3.5, pointHoverRadius: 5,
            tension: .2, spanGaps: true },
          { label: "Learning rate", data: xy(data.lr), yAxisID: "lr", borderColor: colors.lr,
            backgroundColor: colors.lr, borderWidth: 1.5, borderDash: [5, 4], pointRadius: 0,
            pointHoverRadius: 3, tension: 0 },
        ],
      },
      options: {
        responsive: true, maintainAspectRatio: false, animation: false, parsing: false,
        normalized: true,
        interaction: { mode: "nearest", axis: "x", intersect: false },
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: {
            title: function (items) { return items.length ? "Step " + items[0].parsed.x : ""; },
            label: function (item) {
              var v = item.parsed.y;
              var text = item.dataset.yAxisID === "lr" ? Number(v).toExponential(2) : Number(v).toFixed(4);
              return " " + item.dataset.label + ": " + text;
            },
          } },
        },
        scales: {
          x: { type: "linear", title: { display: true, text: "Step" }, grid: { color: colors.grid },
               ticks: { precision: 0 }, min: 0, max: config.total_steps || undefined },
          y: { type: "linear", position: "left", title: { display: true, text: "Loss" },
               grid: { color: colors.grid }, ticks: { callback: lossTick } },
          lr: { type: "linear", position: "right", title: { display: true, text: "Learning rate" },
                grid: { drawOnChartArea: false }, ticks: { callback: lrTick }, beginAtZero: true },
        },
      },
    });
  }

  function showEmpty(hasData) {
    var empty = document.getElementById("loss-chart-empty");
    if (empty) empty.hidden = hasData;
  }

  function chartError(message) {
    var box = document.getElementById("chart-error");
    if (!box) return;
    box.textContent = message || "";
    box.hidden = !message;
  }

  function fetchJson(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (response.redirected && /\/login\/$/.test(new URL(response.url).pathname)) {
          throw new Error("your session ended; sign in again");
        }
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      });
  }

  function append(dataset, pairs) {
    pairs.forEach(function (p) {
      var last = dataset.data.length ? dataset.data[dataset.data.length - 1] : null;
      if (last && last.x >= p[0]) return;
      dataset.data.push({ x: p[0], y: p[1] });
    });
  }

  function poll(s) {
    if (s !== state || !s.config.active) return;
    var url = s.config.url + "?after=" + encodeURIComponent(s.lastStep);
    fetchJson(url).then(function (data) {
      if (s !== state) return;
      chartError("");
      if (data.reload) { load(s); return; }
      if (data.train.length || data.val.length || data.lr.length) {
        if (!s.chart) {
          load(s);
          return;
        }
        append(s.chart.data.datasets[0], data.train);
        append(s.chart.data.datasets[1], data.val);
        append(s.chart.data.datasets[2], data.lr);
        s.lastStep = data.last_step;
        if (data.total_steps) s.chart.options.scales.x.max = data.total_steps;
        s.chart.update("none");
        showEmpty(true);
      }
      s.config.active = data.active || data.status === "pending";
      if (!s.config.active && s.chart) s.chart.options.scales.x.max = undefined;
    }).catch(function (err) {
      chartError("The chart could not be refreshed (" + err.message + "); retrying.");
    }).then(function () {
      if (s === state && s.config.active) s.timer = window.setTimeout(function () { poll(s); }, s.config.refresh_ms || 5000);
    });
  }

  function load(s) {
    var wrap = document.getElementById("loss-chart-wrap");
    if (wrap) wrap.setAttribute("aria-busy", "true");
    fetchJson(s.config.url).then(function (data) {
      if (s !== state) return;
      chartError("");
      if (wrap) wrap.setAttribute("aria-busy", "false");
      var hasData = data.train.length + data.val.length > 0;
      showEmpty(hasData);
      var note = document.getElementById("chart-note");
      if (note && data.downsampled) {
        note.textContent = data.points_logged.toLocaleString() + " logged steps, drawn as " +
          data.train.length.toLocaleString() + " points (LTTB)";
        note.hidden = false;
      }
      s.lastStep = data.last_step || 0;
      // While it runs the x axis spans the planned steps (known once preprocessing ends).
      s.config.total_steps = data.active ? data.total_steps || s.config.total_steps : null;
      if (hasData && typeof window.Chart !== "undefined") {
        if (s.chart) s.chart.destroy();
        s.chart = build(s.canvas, s.config, data);
        s.canvas.setAttribute("data-points", String(data.train.length));
      }
      s.config.active = data.active || data.status === "pending";
    }).catch(function (err) {
      if (wrap) wrap.setAttribute("aria-busy", "false");
      chartError("The chart could not be loaded (" + err.message + "). Reload the page to try again.");
    }).then(function () {
      if (s === state && s.config.active) s.timer = window.setTimeout(function () { poll(s); }, s.config.refresh_ms || 5000);
    });
  }

  function initChart() {
    var node = document.getElementById("job-chart-config");
    var canvas = document.getElementById("loss-chart");
    if (!node || !canvas) return;
    if (state && state.canvas === canvas) return;
    if (state) {
      window.clearTimeout(state.timer);
      if (state.chart) state.chart.destroy();
    }
    state = { config: JSON.parse(node.textContent), canvas: canvas, chart: null, lastStep: 0, timer: null };
    load(state);
  }

  function ready() {
    initChart();
    syncCompare();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", ready);
  else ready();
  // The page body is swapped in place when a running job finishes: draw the final chart.
  document.addEventListener("htmx:load", function () { initChart(); });
  window.crucibleJobChart = function () { return state && state.chart; };
})();
