// The Train page's charts: the htmx SSE extension delivers each "metrics" event (JSON rows) to
// #metrics-sink without swapping it; the rows are appended to one uPlot chart per series.
(function () {
  const sink = document.getElementById("metrics-sink");
  if (!sink) return;
  const steps = [];
  const series = {};
  const charts = [];
  document.querySelectorAll(".chart").forEach(function (el) {
    const key = el.dataset.key;
    series[key] = [];
    const opts = { width: 540, height: 200, scales: { x: { time: false } },
      axes: [{}, { size: 70, values: function (u, ticks) { return ticks.map(tick); } }],
      series: [{ label: "step" }, { label: key, stroke: "#0b5cad", width: 2 }] };
    charts.push({ key: key, plot: new uPlot(opts, [steps, series[key]], el) });
  });
  function tick(v) {  // learning rates are tiny: 5e-3, not 0
    if (v == null) return "";
    return v !== 0 && Math.abs(v) < 0.01 ? v.toExponential(1) : String(+v.toPrecision(4));
  }
  sink.addEventListener("htmx:sseMessage", function (event) {
    JSON.parse(event.detail.data).forEach(function (row) {
      steps.push(row.step);
      Object.keys(series).forEach(function (key) { series[key].push(row[key]); });
    });
    charts.forEach(function (c) { c.plot.setData([steps, series[c.key]]); });
    document.getElementById("points").textContent = steps.length + " training steps logged";
  });
})();
