// Head / component ablation report. Payload format: sparse_viz/report/ablation.py.
// Token text is untrusted: it reaches the DOM only via textContent / d3 .text().
"use strict";
(function () {
  const data = SV.data;
  const ablations = data.ablations;
  const tooltip = SV.tooltip();
  const state = { selected: 0, metric: "kl_divergence", seq: 0, layer: null, head: 0 };
  const decoded = new Map();

  // Quantised pattern (N, H, T, T) as a Uint8Array, decoded once.
  function pattern(key) {
    if (!key || !data.patterns[key]) return null;
    if (!decoded.has(key)) {
      const entry = data.patterns[key];
      const bin = atob(entry.data);
      const bytes = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      decoded.set(key, { shape: entry.shape, bytes });
    }
    return decoded.get(key);
  }

  function text(el, value) { el.textContent = value; return el; }
  function make(tag, parent, value) { const el = document.createElement(tag); if (value !== undefined) el.textContent = value; if (parent) parent.appendChild(el); return el; }

  // --- header and notes --------------------------------------------------------------------
  const best = ablations.reduce((b, a, i) => (a.kl_divergence > ablations[b].kl_divergence ? i : b), 0);
  text(document.getElementById("summary"),
    `${ablations.length} ablation(s) over ${data.n_sequences} sequence(s)` +
    (data.kind === "components" ? ` · mode: ${data.mode} · ${data.decomposition}` : ` · ${data.n_layers} layers × ${data.n_heads} heads`) +
    ` · largest KL: ${ablations[best].name} (${SV.format(ablations[best].kl_divergence)})`);
  const notes = document.getElementById("notes");
  for (const note of data.notes) make("li", notes, note);

  // --- heatmap (single-head ablations) -----------------------------------------------------
  const singles = ablations.map((a, i) => ({ a, i })).filter((d) => d.a.kind === "head");
  const METRIC_LABELS = { kl_divergence: "KL(baseline || ablated)", frac_top1_changed: "share of top-1 changed",
    delta_logprob_top1: "Δ log-prob of baseline top-1" };
  function drawHeatmap() {
    const root = d3.select("#heatmap");
    root.selectAll("*").remove();
    // Cells share the panel's width (22 to 72 px wide) instead of a narrow fixed strip.
    const left = 46, top = 22, cellH = 22;
    const room = (root.node().clientWidth || 900) - left - 20;
    const cellW = Math.max(22, Math.min(72, Math.floor(room / Math.max(data.n_heads, 1))));
    const values = singles.map((d) => d.a[state.metric]);
    const extent = d3.extent(values);
    // Colour from 0 (no effect) to the largest effect; Δ log-prob runs from 0 down to its minimum.
    const color = state.metric === "delta_logprob_top1"
      ? d3.scaleSequential(d3.interpolateBlues).domain([0, Math.min(0, extent[0]) || -1]).clamp(true)
      : d3.scaleSequential(d3.interpolateMagma).domain([0, extent[1] || 1]);
    SV.colorLegend(root.append("div").node(), color, { title: METRIC_LABELS[state.metric], width: 220 });
    const svg = root.append("svg").attr("width", left + cellW * data.n_heads + 10).attr("height", top + cellH * data.n_layers + 10);
    svg.append("g").selectAll("text").data(d3.range(data.n_heads)).join("text")
      .attr("x", (h) => left + h * cellW + cellW / 2).attr("y", top - 6).attr("text-anchor", "middle").attr("font-size", 10).text((h) => `H${h}`);
    svg.append("g").selectAll("text").data(d3.range(data.n_layers)).join("text")
      .attr("x", left - 6).attr("y", (L) => top + L * cellH + cellH / 2 + 3).attr("text-anchor", "end").attr("font-size", 10).text((L) => `L${L}`);
    svg.append("g").selectAll("rect").data(singles).join("rect")
      .attr("class", (d) => "cell" + (d.i === state.selected ? " selected" : ""))
      .attr("x", (d) => left + d.a.head * cellW).attr("y", (d) => top + d.a.layer * cellH)
      .attr("width", cellW - 1).attr("height", cellH - 1)
      .attr("fill", (d) => color(d.a[state.metric]))
      .attr("data-name", (d) => d.a.name)
      .on("mousemove", (event, d) => tooltip.show(event, `head ${d.a.name}\nKL ${SV.format(d.a.kl_divergence)}\ntop-1 changed ${SV.format(d.a.frac_top1_changed, 3)}\nΔ log-prob ${SV.format(d.a.delta_logprob_top1)}`))
      .on("mouseleave", () => tooltip.hide())
      .on("click", (event, d) => select(d.i));
  }
  if (singles.length) {
    document.getElementById("heatmap-panel").hidden = false;
    document.getElementById("metric-select").addEventListener("change", (e) => { state.metric = e.target.value; drawHeatmap(); });
  }

  // --- component sweep: KL of each component alone, per module ---------------------------------
  if (data.sweep) {
    document.getElementById("sweep-panel").hidden = false;
    const root = d3.select("#sweep");
    for (const entry of data.sweep) {
      const items = entry.index.map((i, k) => ({ i, c: entry.components[k], a: ablations[i] }));
      const width = Math.max(300, Math.min(1000, items.length * 8)), height = 80;
      const x = d3.scaleBand().domain(items.map((d) => d.c)).range([48, width]).padding(0.05);
      const y = d3.scaleLinear([0, d3.max(items, (d) => d.a.kl_divergence) || 1], [height + 5, 5]);
      root.append("div").attr("class", "muted").text(entry.module);
      const svg = root.append("svg").attr("width", width + 10).attr("height", height + 48).attr("class", "sweep-chart");
      svg.append("g").selectAll("rect").data(items).join("rect")
        .attr("class", "bar").attr("data-name", (d) => d.a.name)
        .attr("x", (d) => x(d.c)).attr("width", x.bandwidth())
        .attr("y", (d) => y(d.a.kl_divergence)).attr("height", (d) => height + 5 - y(d.a.kl_divergence))
        .attr("fill", "#3b6fd8")
        .on("mousemove", (event, d) => tooltip.show(event, `component ${d.a.name}\nKL ${SV.format(d.a.kl_divergence)}\ntop-1 changed ${SV.format(d.a.frac_top1_changed, 3)}\nnorm ${SV.format(d.a.component_norm, 3)}`))
        .on("mouseleave", () => tooltip.hide())
        .on("click", (event, d) => select(d.i));
      svg.append("g").attr("transform", "translate(48,0)").call(d3.axisLeft(y).ticks(3));
      // Component indices under the bars (about ten of them) and what the axes are.
      const every = Math.max(1, Math.ceil(items.length / 10));
      svg.append("g").attr("class", "x-axis").attr("transform", `translate(0,${height + 5})`)
        .call(d3.axisBottom(x).tickValues(items.filter((d, k) => k % every === 0).map((d) => d.c)).tickSize(3));
      svg.append("text").attr("class", "x-label").attr("x", (48 + width) / 2).attr("y", height + 40).attr("text-anchor", "middle")
        .attr("font-size", 11).attr("fill", "#667085").text("component index (each ablated alone)");
      svg.append("text").attr("x", 0).attr("y", 0).attr("font-size", 11).attr("fill", "#667085").attr("transform", `translate(12,${height / 2 + 20}) rotate(-90)`).text("KL");
    }
  }

  // --- component masks ---------------------------------------------------------------------
  if (data.kind === "components" && !data.sweep) {
    document.getElementById("masks-panel").hidden = false;
    text(document.getElementById("masks-caption"),
      `Mask value per component (red: ablated) of the run the metrics and patterns come from (${data.mode} mode).` +
      (data.pgd_history.length ? ` PGD KL per step: ${data.pgd_history.map((v) => SV.format(v, 3)).join(", ")}.` : ""));
    const root = d3.select("#masks");
    for (const [module, mask] of Object.entries(data.masks)) {
      const ablated = new Set(data.ablated[module] || []);
      const width = Math.max(300, Math.min(900, mask.length * 6)), height = 70;
      const x = d3.scaleBand().domain(d3.range(mask.length)).range([40, width]).padding(0.05);
      root.append("div").attr("class", "muted").text(module);
      const svg = root.append("svg").attr("width", width + 10).attr("height", height + 38).attr("class", "mask-chart");
      svg.append("g").selectAll("rect").data(mask).join("rect")
        .attr("x", (v, c) => x(c)).attr("width", x.bandwidth())
        .attr("y", (v) => 5 + height * (1 - v)).attr("height", (v) => height * v)
        .attr("fill", (v, c) => (ablated.has(c) ? "#d62728" : "#3b6fd8"))
        .on("mousemove", (event, v) => tooltip.show(event, `mask ${SV.format(v, 3)}`)).on("mouseleave", () => tooltip.hide());
      svg.append("g").selectAll("text").data([...ablated]).join("text").attr("class", "ablated-marker")
        .attr("x", (c) => x(c) + x.bandwidth() / 2).attr("y", height + 16).attr("text-anchor", "middle")
        .attr("font-size", 10).attr("fill", "#d62728").text("×");
      svg.append("g").attr("transform", `translate(40,0)`).call(d3.axisLeft(d3.scaleLinear([0, 1], [5 + height, 5])).ticks(2));
      svg.append("text").attr("class", "x-label").attr("x", (40 + width) / 2).attr("y", height + 32).attr("text-anchor", "middle")
        .attr("font-size", 11).attr("fill", "#667085").text(`component index, 0-${mask.length - 1} (×: ablated)`);
    }
  }

  // --- table ---------------------------------------------------------------------------------
  const tbody = document.querySelector("#ablation-table tbody");
  const order = ablations.map((a, i) => i).sort((i, j) => ablations[j].kl_divergence - ablations[i].kl_divergence);
  const rows = new Map();
  for (const i of order) {
    const a = ablations[i];
    const tr = make("tr", tbody);
    tr.dataset.index = String(i);
    for (const v of [a.name, SV.format(a.kl_divergence), SV.format(a.frac_top1_changed, 3), SV.format(a.delta_logprob_top1), a.positions || "all"]) make("td", tr, v);
    tr.addEventListener("click", () => select(i));
    rows.set(i, tr);
  }

  // --- detail --------------------------------------------------------------------------------
  const seqSelect = document.getElementById("seq-select");
  const layerSelect = document.getElementById("layer-select");
  const headSelect = document.getElementById("head-select");
  data.tokens.forEach((t, n) => { const o = make("option", seqSelect, `#${n} (${t.length} tokens)`); o.value = String(n); });
  for (let h = 0; h < data.n_heads; h++) { const o = make("option", headSelect, `head ${h}`); o.value = String(h); }
  seqSelect.addEventListener("change", () => { state.seq = Number(seqSelect.value); drawDetail(); });
  layerSelect.addEventListener("change", () => { state.layer = Number(layerSelect.value); drawDetail(); });
  headSelect.addEventListener("change", () => { state.head = Number(headSelect.value); drawPatterns(); });

  function drawCanvas(canvas, values, T, diverging) {
    canvas.width = T; canvas.height = T;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(T, T);
    for (let k = 0; k < T * T; k++) {
      let rgb;
      if (values === null) rgb = [240, 240, 240];
      else if (diverging) {
        const v = Math.max(-1, Math.min(1, values[k] / diverging));
        rgb = v >= 0 ? [255, 255 * (1 - v), 255 * (1 - v)] : [255 * (1 + v), 255 * (1 + v), 255];
      } else {
        const c = d3.rgb(d3.interpolateViridis(values[k] / 255));
        rgb = [c.r, c.g, c.b];
      }
      image.data[4 * k] = rgb[0]; image.data[4 * k + 1] = rgb[1]; image.data[4 * k + 2] = rgb[2]; image.data[4 * k + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
  }

  function slice(p, n, h) {
    const [N, H, T] = p.shape;
    if (n >= N) return null;
    const start = ((n * H + h) * T) * T;
    return p.bytes.subarray(start, start + T * T);
  }

  const PATTERN_PX = 280, LABEL_PX = 11;
  function drawTokenAxes(figure, T) {
    SV.tokenAxes(figure.querySelector("svg.y-tokens"), figure.querySelector("svg.x-tokens"), data.tokens[state.seq] || [], T, PATTERN_PX);
  }

  const PROBABILITY = d3.scaleSequential(d3.interpolateViridis).domain([0, 1]);
  function drawPatterns() {
    const a = ablations[state.selected];
    const caption = document.getElementById("pattern-caption");
    const L = state.layer;
    const base = pattern(data.baseline[String(L)]);
    const abl = a.patterns ? pattern(a.patterns[String(L)]) : null;
    const T = base ? base.shape[2] : 1;
    const b = base ? slice(base, state.seq, state.head) : null;
    const q = abl ? slice(abl, state.seq, state.head) : null;
    drawCanvas(document.getElementById("baseline-canvas"), b, T, false);
    drawCanvas(document.getElementById("ablated-canvas"), q, T, false);
    let diff = null, scale = 1;
    if (b && q) {
      diff = new Float32Array(T * T);
      for (let k = 0; k < T * T; k++) { diff[k] = q[k] - b[k]; scale = Math.max(scale, Math.abs(diff[k])); }
    }
    drawCanvas(document.getElementById("diff-canvas"), diff, T, scale);
    for (const figure of document.querySelectorAll(".abl-patterns figure")) {
      drawTokenAxes(figure, T);
      const slot = figure.querySelector(".legend-slot");
      slot.replaceChildren();
      const full = scale / 255;
      // The same white -> pure red / blue ramps drawCanvas paints with, in probability units.
      const colour = figure.dataset.kind === "diff"
        ? d3.scaleLinear().domain([-full, 0, full]).range(["rgb(0,0,255)", "rgb(255,255,255)", "rgb(255,0,0)"])
        : PROBABILITY;
      SV.colorLegend(slot, colour, { title: figure.dataset.kind === "diff" ? "ablated − baseline" : "attention probability", width: 200 });
    }
    text(document.getElementById("diff-caption"), `ablated − baseline (red +, blue −; full colour = ${SV.format(scale / 255, 2)})`);
    text(caption, L === null || !base ? "No attention patterns in this page for this ablation (see the .npz file)."
      : `Layer ${L}, head ${state.head}, sequence ${state.seq}: rows = query token, columns = key token.` +
        (q ? "" : " No ablated pattern in this page for this layer."));
  }

  function drawKl() {
    const a = ablations[state.selected];
    const root = d3.select("#kl-positions");
    root.selectAll("*").remove();
    const values = (a.kl_per_position[state.seq] || []);
    const tokens = data.tokens[state.seq] || [];
    const T = values.length, width = Math.max(300, Math.min(1100, T * 14)), height = 80, below = 64;
    const x = d3.scaleBand().domain(d3.range(T)).range([40, width]).padding(0.1);
    const y = d3.scaleLinear([0, d3.max(values, (v) => v || 0) || 1], [height, 5]);
    const svg = root.append("svg").attr("width", width + 10).attr("height", height + below + 14);
    svg.append("g").selectAll("rect").data(values).join("rect")
      .attr("x", (v, t) => x(t)).attr("width", x.bandwidth()).attr("y", (v) => y(v || 0)).attr("height", (v) => height - y(v || 0))
      .attr("fill", "#3b6fd8")
      .each(function (v, t) {
        d3.select(this).on("mousemove", (event) => tooltip.show(event, `position ${t}: ${SV.tokenLabel(tokens[t] ?? "")} → next\nKL ${SV.format(v)}`));
      })
      .on("mouseleave", () => tooltip.hide());
    svg.append("g").attr("transform", "translate(40,0)").call(d3.axisLeft(y).ticks(3));
    // The input token under each bar (every n-th when they would overlap).
    const every = Math.max(1, Math.ceil(LABEL_PX / x.step()));
    svg.append("g").attr("class", "x-tokens").selectAll("text").data(d3.range(0, T, every)).join("text")
      .attr("class", "tok-label").attr("data-position", (t) => t)
      .attr("transform", (t) => `translate(${x(t) + x.bandwidth() / 2},${height + 6}) rotate(-60)`)
      .attr("dy", "0.35em").attr("text-anchor", "end").attr("font-size", 10)
      .text((t) => { const s = SV.tokenLabel(tokens[t] ?? ""); return s.length > 10 ? s.slice(0, 9) + "…" : s; });
    svg.append("text").attr("x", width).attr("y", height + below + 10).attr("text-anchor", "end").attr("font-size", 11)
      .attr("fill", "#667085").text("input token (KL of the prediction made there)");
  }

  function drawPredictions() {
    const a = ablations[state.selected];
    const root = document.getElementById("predictions");
    root.replaceChildren();
    const preds = a.predictions.filter((p) => p.seq === state.seq);
    if (!preds.length) { make("p", root, "No prediction table for this sequence.").className = "muted"; return; }
    for (const p of preds) {
      make("div", root, `Position ${p.position} (input token “${SV.tokenLabel(p.token)}”); baseline top-1 keeps p = ${SV.format(p.top1_prob_after, 3)} after ablation`).className = "muted";
      const table = make("table", root); table.className = "abl-pred";
      const head = make("tr", make("thead", table));
      for (const h of ["rank", "before", "p", "after", "p"]) make("th", head, h);
      const body = make("tbody", table);
      for (let r = 0; r < p.before.length; r++) {
        const tr = make("tr", body);
        make("td", tr, String(r + 1));
        make("td", tr, SV.tokenLabel(p.before[r].token)).className = "tok";
        make("td", tr, SV.format(p.before[r].prob, 3));
        make("td", tr, SV.tokenLabel(p.after[r].token)).className = "tok";
        make("td", tr, SV.format(p.after[r].prob, 3));
      }
    }
  }

  function drawDetail() {
    drawPatterns(); drawKl(); drawPredictions();
  }

  function select(i) {
    state.selected = i;
    const a = ablations[i];
    for (const [j, tr] of rows) tr.classList.toggle("selected", j === i);
    d3.selectAll("#heatmap rect.cell, #sweep rect.bar").classed("selected", (d) => d.i === i);
    text(document.getElementById("detail-title"),
      `Ablation ${a.name}: KL ${SV.format(a.kl_divergence)}, top-1 changed ${SV.format(a.frac_top1_changed, 3)}` +
      (a.reconstruction_kl !== undefined ? `, reconstruction KL ${SV.format(a.reconstruction_kl)}` : ""));
    layerSelect.replaceChildren();
    const layers = a.pattern_layers.length ? a.pattern_layers : Object.keys(data.baseline).map(Number);
    for (const L of layers) { const o = make("option", layerSelect, `layer ${L}`); o.value = String(L); }
    state.layer = layers.length ? layers[0] : null;
    if (state.layer !== null) layerSelect.value = String(state.layer);
    drawDetail();
  }

  if (singles.length) drawHeatmap();
  select(best);
  SV.markReady();
})();
