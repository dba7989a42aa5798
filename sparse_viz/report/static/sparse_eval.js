// Sparse evaluation report: perplexity vs k per selector, and per-layer coverage of dense attention.
"use strict";
(function () {
  const data = SV.data;
  const colours = { topk: "#d62728", local: "#2ca02c", sink_local: "#9467bd", random: "#7f7f7f", oracle: "#1f77b4" };
  const dense = data.table.find((r) => r.selector === "dense");
  document.getElementById("summary").textContent =
    `${data.model} · ${data.corpus} · ${data.n_windows} window(s) of ${data.seq_len} tokens` +
    (dense ? ` · dense perplexity ${SV.format(dense.perplexity, 4)}` : "");
  const selectors = [...new Set(data.table.filter((r) => r.selector !== "dense").map((r) => r.selector))];

  function lineChart(element, series, xLabel, yLabel, log, reference) {
    const width = 760, height = 320, m = { left: 60, right: 130, top: 10, bottom: 44 };
    const root = d3.select(element); root.selectAll("*").remove();
    const svg = root.append("svg").attr("viewBox", `0 0 ${width} ${height}`);
    const xs = series.flatMap((s) => s.points.map((p) => p[0]));
    const ys = series.flatMap((s) => s.points.map((p) => p[1])).concat(reference ? [reference] : []);
    const x = (log ? d3.scaleLog().base(2) : d3.scaleLinear()).domain(d3.extent(xs)).range([m.left, width - m.right]);
    const y = (log ? d3.scaleLog() : d3.scaleLinear()).domain(log ? d3.extent(ys) : [0, 1]).nice().range([height - m.bottom, m.top]);
    // x is k (powers of two) or a layer index: integer ticks only
    const ticks = [...new Set(xs)].sort((a, b) => a - b);
    svg.append("g").attr("transform", `translate(0,${height - m.bottom})`)
      .call(d3.axisBottom(x).tickValues(ticks.length <= 16 ? ticks : x.ticks(10).filter(Number.isInteger)).tickFormat(d3.format("d")));
    svg.append("g").attr("transform", `translate(${m.left},0)`).call(d3.axisLeft(y).ticks(6, log ? "~g" : ".1f"));
    svg.append("text").attr("x", (m.left + width - m.right) / 2).attr("y", height - 8).attr("text-anchor", "middle").attr("font-size", 12).text(xLabel);
    svg.append("text").attr("transform", `translate(14,${(height - m.bottom) / 2}) rotate(-90)`).attr("text-anchor", "middle").attr("font-size", 12).text(yLabel);
    if (reference) {
      svg.append("line").attr("x1", m.left).attr("x2", width - m.right).attr("y1", y(reference)).attr("y2", y(reference)).attr("stroke", "#000").attr("stroke-dasharray", "4 3");
    }
    series.forEach((s, i) => {
      svg.append("path").datum(s.points).attr("fill", "none").attr("stroke", colours[s.name] || "#444").attr("stroke-width", 1.8)
        .attr("d", d3.line().x((p) => x(p[0])).y((p) => y(p[1])));
      svg.append("g").selectAll("circle").data(s.points).join("circle").attr("cx", (p) => x(p[0])).attr("cy", (p) => y(p[1])).attr("r", 3).attr("fill", colours[s.name] || "#444");
      // legend in the right margin, never on the data
      const ly = m.top + 16 * i;
      svg.append("line").attr("x1", width - m.right + 10).attr("x2", width - m.right + 28).attr("y1", ly + 6).attr("y2", ly + 6).attr("stroke", colours[s.name] || "#444").attr("stroke-width", 2);
      svg.append("text").attr("x", width - m.right + 32).attr("y", ly + 10).attr("font-size", 11).text(s.name);
    });
    if (reference) {
      const ly = m.top + 16 * series.length;
      svg.append("line").attr("x1", width - m.right + 10).attr("x2", width - m.right + 28).attr("y1", ly + 6).attr("y2", ly + 6).attr("stroke", "#000").attr("stroke-dasharray", "4 3");
      svg.append("text").attr("x", width - m.right + 32).attr("y", ly + 10).attr("font-size", 11).text("dense");
    }
  }

  lineChart(document.getElementById("ppl-chart"),
    selectors.map((name) => ({ name, points: data.table.filter((r) => r.selector === name).map((r) => [r.k, r.perplexity]).sort((a, b) => a[0] - b[0]) })),
    "k (keys per query)", "perplexity", true, dense ? dense.perplexity : null);

  // A k at or above the window length keeps every key of every query: that selector is dense there.
  const T = data.seq_len;
  const degenerate = (k) => T !== null && T !== undefined && k >= T;
  const body = document.querySelector("#ppl-table tbody");
  for (const r of data.table) {
    const row = body.insertRow();
    const k = r.selector === "dense" ? "all" : degenerate(r.k) ? `${r.k} (≥ ${T} tokens: dense)` : r.k;
    for (const v of [r.selector, k, SV.format(r.perplexity, 4), SV.format(r.relative_to_dense, 4) + "x"]) row.insertCell().textContent = v;
  }

  const kSelect = document.getElementById("k-select"), metric = document.getElementById("metric-select");
  for (const k of [...new Set(data.layers.map((r) => r.k))]) kSelect.add(new Option(String(k), String(k)));
  // A value is missing (null) where no query of a window has more than k keys: it is said, not
  // drawn (as 0 or 1); a k with no value at all gets a sentence instead of a chart.
  const note = document.getElementById("layer-note");
  function drawLayers() {
    const rows = data.layers.filter((r) => String(r.k) === kSelect.value);
    const names = [...new Set(rows.map((r) => r.selector))];
    const series = names.map((name) => ({ name, points: rows.filter((r) => r.selector === name && r[metric.value] !== null)
      .map((r) => [r.layer, r[metric.value]]) })).filter((s) => s.points.length);
    const k = Number(kSelect.value);
    const missing = rows.filter((r) => r[metric.value] === null).map((r) => `${r.selector} layer ${r.layer}`);
    note.hidden = !missing.length;
    note.textContent = !missing.length ? "" : !series.length
      ? `No informative query at k = ${k}: ${degenerate(k) ? `the windows have ${T} tokens, so ` : ""}no query sees more than ` +
        `${k} keys and every selector keeps every key (it equals dense), so there is no ${metric.options[metric.selectedIndex].text} to show.`
      : `No informative query (no value) for ${missing.join(", ")}.`;
    const chart = document.getElementById("layer-chart");
    if (!series.length) { d3.select(chart).selectAll("*").remove(); return; }
    lineChart(chart, series, "layer", metric.options[metric.selectedIndex].text, false, null);
  }
  kSelect.addEventListener("change", drawLayers); metric.addEventListener("change", drawLayers);
  if (data.layers.length) drawLayers();
  const defs = document.getElementById("definitions");
  for (const [name, text] of Object.entries(data.definitions)) {
    const dt = document.createElement("dt"); dt.textContent = name;
    const dd = document.createElement("dd"); dd.textContent = text;
    defs.append(dt, dd);
  }
  SV.markReady();
})();
