/* Training pages: job actions through the API, and the loss chart (Chart.js). */
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

  /* --- Loss chart --------------------------------------------------------------------- */

  var dataNode = document.getElementById("training-chart-data");
  var canvas = document.getElementById("loss-chart");
  if (!dataNode || !canvas) return;

  var config = JSON.parse(dataNode.textContent);
  var emptyNode = document.getElementById("loss-chart-empty");
  var css = getComputedStyle(document.documentElement);
  function token(name, fallback) { return (css.getPropertyValue(name) || "").trim() || fallback; }

  var COLORS = {
    train: token("--accent", "#4f46e5"),
    val: token("--warning-solid", "#f79009"),
    lr: token("--neutral-solid", "#98a2b3"),
    grid: token("--border", "#e4e7ec"),
    text: token("--text-3", "#667085"),
  };

  function series(points) {
    var train = [], val = [], lr = [];
    points.forEach(function (p) {
      if (p.train_loss !== null && p.train_loss !== undefined) train.push({ x: p.step, y: p.train_loss });
      if (p.val_loss !== null && p.val_loss !== undefined) val.push({ x: p.step, y: p.val_loss });
      if (p.learning_rate !== null && p.learning_rate !== undefined) lr.push({ x: p.step, y: p.learning_rate });
    });
    return { train: train, val: val, lr: lr };
  }

  function lossTick(value) { return Number(value).toFixed(2); }
  function lrTick(value) {
    if (value === 0) return "0";
    return Number(value).toExponential(1).replace(".0e", "e");
  }

  var chart = null;

  function render(points) {
    var data = series(points);
    var hasData = data.train.length + data.val.length > 0;
    if (emptyNode) emptyNode.hidden = hasData;
    if (!hasData) return;
    if (chart) {
      chart.data.datasets[0].data = data.train;
      chart.data.datasets[1].data = data.val;
      chart.data.datasets[2].data = data.lr;
      chart.update("none");
      return;
    }
    if (typeof window.Chart === "undefined") return;
    var Chart = window.Chart;
    Chart.defaults.font.family = token("--font-sans", "system-ui, sans-serif");
    Chart.defaults.font.size = 12;
    Chart.defaults.color = COLORS.text;
    var many = data.train.length > 120;
    chart = new Chart(canvas, {
      type: "line",
      data: {
        datasets: [
          {
            label: "Train loss", data: data.train, yAxisID: "y",
            borderColor: COLORS.train, backgroundColor: "rgba(79, 70, 229, .08)",
            borderWidth: 2, pointRadius: many ? 0 : 2, pointHoverRadius: 4, tension: .25, fill: true,
          },
          {
            label: "Validation loss", data: data.val, yAxisID: "y",
            borderColor: COLORS.val, backgroundColor: COLORS.val,
            borderWidth: 2, pointRadius: 3.5, pointHoverRadius: 5, tension: .2, spanGaps: true,
          },
          {
            label: "Learning rate", data: data.lr, yAxisID: "lr",
            borderColor: COLORS.lr, backgroundColor: COLORS.lr,
            borderWidth: 1.5, borderDash: [5, 4], pointRadius: 0, pointHoverRadius: 3, tension: 0,
          },
        ],
      },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        parsing: false,
        normalized: true,
        interaction: { mode: "nearest", axis: "x", intersect: false },
        plugins: {
          legend: { display: false },
          tooltip: {
            callbacks: {
              title: function (items) { return items.length ? "Step " + items[0].parsed.x : ""; },
              label: function (item) {
                var v = item.parsed.y;
                var text = item.dataset.yAxisID === "lr" ? Number(v).toExponential(2) : Number(v).toFixed(4);
                return " " + item.dataset.label + ": " + text;
              },
            },
          },
        },
        scales: {
          x: {
            type: "linear",
            title: { display: true, text: "Step" },
            grid: { color: COLORS.grid },
            ticks: { precision: 0 },
            min: 0,
            max: config.total_steps || undefined,
          },
          y: {
            type: "linear", position: "left",
            title: { display: true, text: "Loss" },
            grid: { color: COLORS.grid },
            ticks: { callback: lossTick },
          },
          lr: {
            type: "linear", position: "right",
            title: { display: true, text: "Learning rate" },
            grid: { drawOnChartArea: false },
            ticks: { callback: lrTick, maxTicksLimit: 6 },
            beginAtZero: true,
            display: data.lr.length > 0,
          },
        },
      },
    });
    canvas.dataset.rendered = "1";
  }

  render(config.points || []);

  // While the job runs, follow its metrics through the API.
  if (config.metrics_url) {
    var busy = false;
    var timer = window.setInterval(function () {
      if (busy || document.hidden) return;
      var status = document.getElementById("job-status");
      if (status && ["completed", "failed", "cancelled"].indexOf(status.dataset.status) >= 0) {
        window.clearInterval(timer);
        return;
      }
      busy = true;
      fetch(config.metrics_url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (points) { if (Array.isArray(points)) render(points); })
        .catch(function () { /* try again next tick */ })
        .finally(function () { busy = false; });
    }, config.refresh_ms || 5000);
  }
})();
