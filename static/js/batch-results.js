// Results viewer charts: per-text means with 95% t intervals per model (one field at a time),
// and agreement (alpha / ICC) with 95% intervals. Data: the page's #batch-charts JSON, the same
// shape as GET /api/v1/jobs/{id}/charts.
(function () {
  "use strict";
  function ready(fn) {
    if (document.readyState !== "loading") fn();
    else document.addEventListener("DOMContentLoaded", fn);
  }
  var COLORS = ["#4f46e5", "#0891b2", "#d97706", "#16a34a", "#db2777", "#64748b"];
  // Draws each point's interval as a vertical line (no plugin needed).
  var intervals = {
    id: "intervals",
    afterDatasetsDraw: function (chart) {
      var ctx = chart.ctx;
      chart.data.datasets.forEach(function (ds, i) {
        var meta = chart.getDatasetMeta(i);
        if (meta.hidden) return;
        meta.data.forEach(function (el, j) {
          var p = ds.data[j];
          if (!p || p.low == null || p.high == null) return;
          var scale = chart.scales[chart.options.indexAxis === "y" ? "x" : "y"];
          var a = scale.getPixelForValue(p.low), b = scale.getPixelForValue(p.high);
          ctx.save();
          ctx.strokeStyle = ds.borderColor;
          ctx.lineWidth = 1.5;
          ctx.beginPath();
          if (chart.options.indexAxis === "y") {
            ctx.moveTo(a, el.y); ctx.lineTo(b, el.y);
          } else {
            ctx.moveTo(el.x, a); ctx.lineTo(el.x, b);
          }
          ctx.stroke();
          ctx.restore();
        });
      });
    },
  };
  ready(function () {
    var node = document.getElementById("batch-charts");
    if (!node || !window.Chart) return;
    var data = JSON.parse(node.textContent);
    var dist = document.getElementById("chart-distribution");
    var select = document.getElementById("chart-field");
    var chart = null;
    function draw(index) {
      var series = data.distribution[index];
      if (!series) return;
      if (chart) chart.destroy();
      chart = new Chart(dist, {
        type: "scatter",
        data: {
          datasets: series.datasets.map(function (ds, i) {
            return {
              label: ds.label,
              borderColor: COLORS[i % COLORS.length],
              backgroundColor: COLORS[i % COLORS.length],
              data: ds.data.map(function (p) {
                return { x: series.labels.indexOf(p.x) + (i - (series.datasets.length - 1) / 2) * 0.15, y: p.y, low: p.low, high: p.high, n: p.n, unit: p.x };
              }),
            };
          }),
        },
        options: {
          maintainAspectRatio: false,
          animation: false,
          scales: {
            x: {
              type: "linear", min: -0.5, max: series.labels.length - 0.5,
              afterBuildTicks: function (axis) { axis.ticks = series.labels.map(function (_, i) { return { value: i }; }); },
              ticks: { autoSkip: false, maxRotation: 45, font: { size: 10 }, callback: function (v) { return series.labels[v] || ""; } },
            },
            y: { title: { display: true, text: "mean (95% t interval)" } },
          },
          plugins: { tooltip: { callbacks: { label: function (c) { var p = c.raw; return c.dataset.label + " · " + p.unit + ": " + p.y + (p.low != null ? " [" + p.low + ", " + p.high + "]" : "") + " n=" + p.n; } } } },
        },
        plugins: [intervals],
      });
    }
    if (dist && data.distribution.length) {
      draw(0);
      if (select) select.addEventListener("change", function () { draw(+select.value); });
    }
    var agree = document.getElementById("chart-agreement");
    var rows = data.agreement.filter(function (r) { return r.value != null; });
    if (agree && rows.length) {
      new Chart(agree, {
        type: "bar",
        data: {
          labels: rows.map(function (r) { return r.label; }),
          datasets: [{ label: "agreement (95% bootstrap interval)", borderColor: "#1e293b", backgroundColor: "rgba(79,70,229,0.55)",
                       data: rows.map(function (r) { return { x: r.value, y: r.label, low: r.low, high: r.high }; }) }],
        },
        options: {
          indexAxis: "y", maintainAspectRatio: false, animation: false,
          parsing: { xAxisKey: "x", yAxisKey: "y" },
          scales: { x: { min: -1, max: 1 }, y: { ticks: { font: { size: 10 } } } },
        },
        plugins: [intervals],
      });
    }
  });
})();
