// Impact report: a layer's (query x key) impact matrix on a canvas, one query's row as bars beside
// the attention mass. Tokens and the prompt are untrusted text: textContent / d3 .text() only.
"use strict";
(function () {
  const data = SV.data;
  const tip = SV.tooltip();
  const layerSelect = document.getElementById("layer-select");
  const kSelect = document.getElementById("k-select");
  const excludeFirst = document.getElementById("exclude-first");
  const canvas = document.getElementById("matrix");
  const T = data.tokens.length;
  document.getElementById("summary").textContent = `${data.model} · ${T} tokens · prompt: ${data.prompt}`;
  for (const layer of data.layers) layerSelect.add(new Option(`layer ${layer}`, String(layer)));
  for (const k of data.k) kSelect.add(new Option(String(k), String(k)));
  const defs = document.getElementById("definitions");
  for (const [name, text] of Object.entries(data.definitions)) {
    const dt = document.createElement("dt"); dt.textContent = name;
    const dd = document.createElement("dd"); dd.textContent = text;
    defs.append(dt, dd);
  }

  let rowShown = T - 1;
  const MATRIX_PX = 420;  // the matrix's drawn size (CSS), shared with its token axes
  const colour = d3.interpolateViridis;

  function scaleFor(rows) {
    const skip = excludeFirst.checked ? 1 : 0;
    let lo = Infinity, hi = -Infinity;
    rows.forEach((row) => row.forEach((x, s) => {
      if (x !== null && x > 0 && s >= skip) { lo = Math.min(lo, x); hi = Math.max(hi, x); }
    }));
    if (!isFinite(lo)) { lo = 1e-6; hi = 1; }
    // Log scale onto [0, 1]; values below the range (or 0) take the lowest colour.
    return d3.scaleLog().domain([lo, Math.max(hi, lo * 1.0001)]).range([0, 1]).clamp(true);
  }

  function drawMatrix() {
    const rows = data.impact[layerSelect.value];
    const scale = scaleFor(rows);
    canvas.width = T; canvas.height = T;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(T, T);
    rows.forEach((row, t) => row.forEach((x, s) => {
      const i = 4 * (t * T + s);
      const c = d3.rgb(x === null ? "#ffffff" : colour(x <= 0 ? 0 : scale(x)));
      image.data[i] = c.r; image.data[i + 1] = c.g; image.data[i + 2] = c.b; image.data[i + 3] = 255;
    }));
    ctx.putImageData(image, 0, 0);
    SV.tokenAxes(document.getElementById("matrix-rows"), document.getElementById("matrix-cols"), data.tokens, T, MATRIX_PX);
    const bar = document.getElementById("scale").getContext("2d");
    for (let x = 0; x < 160; x++) { bar.fillStyle = colour(x / 159); bar.fillRect(x, 0, 1, 10); }
    document.getElementById("scale-min").textContent = SV.format(scale.domain()[0], 2);
    document.getElementById("scale-max").textContent = SV.format(scale.domain()[1], 2);
  }

  function topK(row, k) {
    return new Set(row.map((x, s) => [x === null ? -Infinity : x, s]).sort((a, b) => b[0] - a[0]).slice(0, k).map((p) => p[1]));
  }

  function rowChart(element, values, marked, colourMarked, label) {
    // The title sits in the top margin, above the tallest bar (which reaches margin.top).
    const width = 560, height = 164, margin = { left: 48, right: 8, top: 22, bottom: 34 };
    const root = d3.select(element);
    root.selectAll("*").remove();
    const svg = root.append("svg").attr("viewBox", `0 0 ${width} ${height}`);
    const x = d3.scaleBand().domain(d3.range(values.length)).range([margin.left, width - margin.right]).padding(0.1);
    const y = d3.scaleLinear().domain([0, d3.max(values, (v) => v || 0) || 1]).nice().range([height - margin.bottom, margin.top]);
    svg.append("g").selectAll("rect").data(values).join("rect")
      .attr("x", (_, s) => x(s)).attr("width", x.bandwidth())
      .attr("y", (v) => y(v || 0)).attr("height", (v) => y(0) - y(v || 0))
      .attr("fill", (_, s) => (marked.has(s) ? colourMarked : "#c5ccd6"))
      .on("mousemove", (event, v) => tip.show(event, `key ${values.indexOf(v)}\n${label}: ${SV.format(v)}`))
      .on("mouseleave", () => tip.hide());
    svg.append("g").attr("transform", `translate(${margin.left},0)`).call(d3.axisLeft(y).ticks(4));
    const every = Math.max(1, Math.ceil(values.length / 24));
    svg.append("g").attr("transform", `translate(0,${height - margin.bottom})`)
      .call(d3.axisBottom(x).tickValues(d3.range(0, values.length, every)).tickFormat((s) => SV.tokenLabel(data.tokens[s]).slice(0, 8)))
      .selectAll("text").attr("transform", "rotate(-35)").style("text-anchor", "end");
    svg.append("text").attr("class", "chart-title").attr("x", margin.left).attr("y", margin.top - 8)
      .attr("font-size", 11).text(label);
  }

  function drawRow(t) {
    rowShown = t;
    const layer = layerSelect.value, k = Number(kSelect.value);
    const impact = data.impact[layer][t], mass = data.mass[layer][t];
    document.getElementById("row-title").textContent = `query ${t}: ${SV.tokenLabel(data.tokens[t])}`;
    rowChart(document.getElementById("row-impact"), impact, topK(impact, k), "#d62728", "impact (l2)");
    rowChart(document.getElementById("row-mass"), mass, topK(mass, k), "#1f77b4", "attention mass (sum over heads)");
  }

  // A k >= the prompt's length leaves no query with more than k keys: every selection keeps the
  // whole row, so the analysis compares nothing there. Say so rather than show an empty table.
  function drawTable() {
    const body = document.querySelector("#agreement tbody");
    body.replaceChildren();
    const rows = data.agreement.filter((r) => String(r.layer) === layerSelect.value);
    for (const r of rows) {
      const row = body.insertRow();
      for (const v of [r.selector, r.k, SV.format(r.impact_recall_at_k, 3), SV.format(r.impact_share, 3),
        SV.format(r.spearman, 3), r.n_queries]) row.insertCell().textContent = v;
    }
    document.getElementById("agreement").hidden = rows.length === 0;
    const without = data.k.filter((k) => k >= T);
    const note = document.getElementById("agreement-note");
    note.hidden = without.length === 0 && rows.length > 0;
    note.textContent = !data.k.length ? "No k was given: no selection is compared."
      : without.length === data.k.length
      ? `No agreement to show: the prompt has ${T} tokens, so no query sees more than k keys for any k given ` +
        `(${data.k.join(", ")}); every selection keeps every key and there is nothing to compare. ` +
        "A longer prompt or a smaller --k compares selections."
      : without.length ? `Not in the table: k = ${without.join(", ")}, not below the prompt's ${T} tokens ` +
        "(no query sees more than k keys, so every selection keeps every key)."
      : "No agreement rows for this layer.";
  }

  canvas.addEventListener("mousemove", (event) => {
    const box = canvas.getBoundingClientRect();
    const t = Math.min(T - 1, Math.floor((event.clientY - box.top) / box.height * T));
    const s = Math.min(T - 1, Math.floor((event.clientX - box.left) / box.width * T));
    if (s <= t) {
      const v = data.impact[layerSelect.value][t][s];
      tip.show(event, `query ${t} ${SV.tokenLabel(data.tokens[t])}\nkey ${s} ${SV.tokenLabel(data.tokens[s])}\nimpact ${SV.format(v)}`);
      if (t !== rowShown) drawRow(t);
    } else tip.hide();
  });
  canvas.addEventListener("mouseleave", () => tip.hide());
  function redraw() { drawMatrix(); drawRow(rowShown); drawTable(); }
  layerSelect.addEventListener("change", redraw);
  kSelect.addEventListener("change", () => drawRow(rowShown));
  excludeFirst.addEventListener("change", drawMatrix);
  redraw();
  SV.markReady();
})();
