/* New-job form: typing an override turns the override switch on; RunPod-only fields are
   dimmed for the local executor. The estimate itself updates through htmx (new.html). */
(function () {
  "use strict";
  var form = document.getElementById("new-job-form");
  if (!form) return;

  function syncExecutor() {
    var checked = form.querySelector("input[name=executor]:checked");
    var runpod = checked && checked.value === "runpod";
    form.querySelectorAll(".compute-grid select, .compute-grid input").forEach(function (el) {
      el.disabled = !runpod;
    });
    var grid = form.querySelector(".compute-grid");
    if (grid) grid.classList.toggle("is-disabled", !runpod);
  }

  form.addEventListener("input", function (event) {
    if (event.target.closest && event.target.closest(".advanced-grid")) {
      var toggle = form.querySelector("input[name=advanced]");
      if (toggle && !toggle.checked && event.target.value !== "") toggle.checked = true;
    }
  });
  form.addEventListener("change", function (event) {
    if (event.target.name === "executor") syncExecutor();
  });
  syncExecutor();
})();
