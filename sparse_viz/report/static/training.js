// The training report: which keys each probe query selected, per snapshot and layer, and how the
// recorded metrics evolved. Payload layout: sparse_viz/report/training.py. Untrusted text (token
// strings) reaches the DOM only through textContent / d3 .text().
(function () {
  "use strict";
  const data = SV.data;
  const views = data.views;
  const tip = SV.tooltip();

  // ------------------------------------------------------------------ decoding
  function decode(b64, Type) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Type(bytes.buffer);
  }
  // Each snapshot's arrays travel as their own base64 strings and are decoded the first time the
  // page shows that snapshot: the page is ready after one snapshot's work, however many exist.
  const V = views ? {
    S: views.S, L: views.L, T: views.T, k: views.k, pad: views.pad, steps: views.steps,
  } : null;
  const decoded = new Map();
  function snapshotArrays(index) {
    if (!decoded.has(index)) {
      decoded.set(index, {
        sel: decode(views.sel[index], Uint16Array), denseTop: decode(views.dense_top[index], Uint16Array),
        score: decode(views.score[index], Uint8Array), scoreLo: decode(views.score_lo[index], Float32Array),
        scoreHi: decode(views.score_hi[index], Float32Array), attn: decode(views.attn[index], Uint8Array),
        dense: decode(views.dense[index], Uint8Array), mass: decode(views.mass[index], Float32Array),
      });
    }
    return decoded.get(index);
  }

  const sliderSteps = V ? V.steps : data.steps;
  const nLayers = V ? V.L : Math.max(1, data.run.n_layers || 1);
  const state = { index: sliderSteps.length - 1, layer: 0, shade: "score", hover: null, pinned: null };
  if (state.index < 0) state.index = 0;

  const stepOf = () => sliderSteps[state.index];
  const historyIndex = () => data.steps.indexOf(stepOf());
  const rowBase = (t) => state.layer * V.T + t;  // row of query t in the shown snapshot's arrays
  const query = () => (state.pinned !== null ? state.pinned : state.hover);

  // Values of the selected slots of query t: [{key, score, attn, dense, shade}], shade in [0, 1].
  function selectionOf(t) {
    const A = snapshotArrays(state.index), base = rowBase(t);
    const lo = A.scoreLo[base], hi = A.scoreHi[base];
    const out = [];
    for (let j = 0; j < V.k; j++) {
      const key = A.sel[base * V.k + j];
      if (key === V.pad) continue;
      const s = A.score[base * V.k + j] / 255, a = A.attn[base * V.k + j] / 255, d = A.dense[base * V.k + j] / 255;
      out.push({
        key, score: lo + s * (hi - lo), attn: a * a, dense: d * d,
        shade: state.shade === "score" ? s : state.shade === "attn" ? a : d,
      });
    }
    return out;
  }
  function denseTopOf(t) {
    const A = snapshotArrays(state.index), base = rowBase(t) * V.k, out = new Set();
    for (let j = 0; j < V.k; j++) { const key = A.denseTop[base + j]; if (key !== V.pad) out.add(key); }
    return out;
  }
  // Ground truth of a task that has it (associative recall): answer position t -> [key pos, value pos].
  const answers = new Map((data.answers || []).map(([t, key, value]) => [t, [key, value]]));
  const colour = (v) => d3.interpolateBlues(0.15 + 0.85 * Math.max(0, Math.min(1, v)));

  // ------------------------------------------------------------------ header and controls
  const run = data.run;
  document.getElementById("summary").textContent =
    `selector ${run.selector ?? "?"} · k = ${run.top_k ?? "?"} · ${nLayers} layers · probe of ${run.probe_rows ?? "?"} × ${run.seq_len ?? "?"} tokens · ${data.steps.length} snapshots (every ${run.every_n_steps ?? "?"} steps)` +
    (V && V.S < data.steps.length ? ` · per-query views of ${V.S} of them, evenly spaced (the curves have all)` : "");

  const slider = document.getElementById("step-slider");
  slider.max = String(Math.max(0, sliderSteps.length - 1));
  slider.value = String(state.index);
  slider.addEventListener("input", () => { state.index = Number(slider.value); update(); });

  const layerSelect = document.getElementById("layer-select");
  for (let l = 0; l < nLayers; l++) {
    const option = document.createElement("option");
    option.value = String(l); option.textContent = `layer ${l}`;
    layerSelect.appendChild(option);
  }
  layerSelect.addEventListener("change", () => { state.layer = Number(layerSelect.value); buildCharts(); update(); });
  const shadeSelect = document.getElementById("shade-select");
  shadeSelect.addEventListener("change", () => { state.shade = shadeSelect.value; update(); });

  let timer = null;
  const play = document.getElementById("play");
  play.addEventListener("click", () => {
    if (timer) { clearInterval(timer); timer = null; play.textContent = "Play"; return; }
    if (state.index >= sliderSteps.length - 1) state.index = 0;
    play.textContent = "Pause";
    timer = setInterval(() => {
      state.index += 1;
      if (state.index >= sliderSteps.length - 1) { state.index = sliderSteps.length - 1; clearInterval(timer); timer = null; play.textContent = "Play"; }
      slider.value = String(state.index);
      update();
    }, 700);
  });

  // ------------------------------------------------------------------ tokens
  const tokenBox = document.getElementById("tokens");
  const info = document.getElementById("query-info");
  const spans = data.tokens.map((text, t) => {
    const span = document.createElement("span");
    span.className = "token";
    span.textContent = SV.tokenLabel(text);
    span.dataset.t = String(t);
    span.addEventListener("mouseenter", (event) => {
      if (state.pinned === null) { state.hover = t; updateTokens(); drawHeatmap(); }
      else if (V) showKeyTip(event, t);
    });
    span.addEventListener("mousemove", (event) => { if (state.pinned !== null && V) showKeyTip(event, t); });
    span.addEventListener("mouseleave", () => tip.hide());
    span.addEventListener("click", () => { state.pinned = state.pinned === t ? null : t; state.hover = t; updateTokens(); drawHeatmap(); });
    tokenBox.appendChild(span);
    return span;
  });

  function showKeyTip(event, s) {
    const t = query();
    const hit = selectionOf(t).find((x) => x.key === s);
    const name = JSON.stringify(String(data.tokens[s] ?? ""));
    tip.show(event, hit
      ? `key ${s} ${name}\nindexer score ${SV.format(hit.score)}\nattention used ${SV.format(hit.attn, 3)}\ndense attention ${SV.format(hit.dense, 3)}`
      : `key ${s} ${name}\nnot selected by query ${t}`);
  }

  function updateTokens() {
    for (const span of spans) { span.className = "token"; span.style.background = ""; span.style.color = ""; }
    const t = query();
    if (!V || t === null || t >= V.T) {
      info.textContent = V ? "Hover a token to see the keys it selected; click to pin it." : "No snapshot arrays were recorded for this run.";
      return;
    }
    const chosen = selectionOf(t), top = denseTopOf(t);
    for (let s = t + 1; s < spans.length; s++) spans[s].classList.add("future");
    // Each selected key is shaded by the chosen measure, its text black or white by contrast with
    // the shade. The query keeps its own fill (yellow, as the legend says) even when it selected
    // itself: the line above says whether it did.
    for (const x of chosen) {
      spans[x.key].classList.add("selected-key");
      if (x.key === t) continue;
      spans[x.key].style.background = colour(x.shade);
      spans[x.key].style.color = SV.textColourOn(colour(x.shade));
    }
    for (const s of top) spans[s].classList.add("dense-top");
    spans[t].classList.add("query");
    const truth = answers.get(t);
    let truthLine = "";
    if (truth) {
      const picked = new Set(chosen.map((x) => x.key));
      const [key, value] = truth;
      spans[key].classList.add("ground-truth"); spans[value].classList.add("ground-truth");
      truthLine = `\nground truth: key ${key} ${JSON.stringify(String(data.tokens[key] ?? ""))} (${picked.has(key) ? "selected" : "not selected"}), ` +
        `value ${value} ${JSON.stringify(String(data.tokens[value] ?? ""))} (${picked.has(value) ? "selected" : "not selected"})`;
    }
    let overlap = 0;
    for (const x of chosen) if (top.has(x.key)) overlap += 1;
    const mass = snapshotArrays(state.index).mass[rowBase(t)];
    const h = historyIndex();
    info.textContent =
      `query t = ${t} ${JSON.stringify(String(data.tokens[t] ?? ""))} · layer ${state.layer} · step ${stepOf()} (${data.stages[h] ?? ""}, selection from ${data.source[h] ?? ""})\n` +
      `${chosen.length} keys selected of ${t + 1} visible${chosen.some((x) => x.key === t) ? " (itself among them)" : " (not itself)"} · dense-attention mass on the selection (mass@k) ${mass < 0 ? "n/a" : SV.format(mass, 3)} · ` +
      `${overlap}/${top.size} of the dense top-k selected${state.pinned !== null ? " · pinned (click again to release)" : ""}` + truthLine;
  }

  // ------------------------------------------------------------------ heatmap
  const canvas = document.getElementById("heatmap");
  const ctx = canvas.getContext("2d");
  const cell = V ? Math.max(1, Math.floor(512 / V.T)) : 1;
  if (V) { canvas.width = V.T * cell; canvas.height = V.T * cell; }
  canvas.addEventListener("click", (event) => {
    if (!V) return;
    const rect = canvas.getBoundingClientRect();
    const t = Math.floor((event.clientY - rect.top) / rect.height * V.T);
    if (t >= 0 && t < V.T) { state.pinned = t; state.hover = t; updateTokens(); drawHeatmap(); }
  });
  canvas.addEventListener("mousemove", (event) => {
    if (!V) return;
    const rect = canvas.getBoundingClientRect();
    const t = Math.floor((event.clientY - rect.top) / rect.height * V.T);
    const s = Math.floor((event.clientX - rect.left) / rect.width * V.T);
    if (t < 0 || s < 0 || t >= V.T || s >= V.T) return tip.hide();
    const hit = s <= t ? selectionOf(t).find((x) => x.key === s) : null;
    tip.show(event, `query ${t}, key ${s}` + (s > t ? " (future)" : hit
      ? `\nselected · score ${SV.format(hit.score)} · attn ${SV.format(hit.attn, 3)} · dense ${SV.format(hit.dense, 3)}` : "\nnot selected"));
  });
  canvas.addEventListener("mouseleave", () => tip.hide());

  function drawHeatmap() {
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!V) return;
    document.getElementById("heatmap-title").textContent = `Selection matrix (query × key), layer ${state.layer}, step ${stepOf()}`;
    ctx.fillStyle = "#eaecf0";
    ctx.beginPath(); ctx.moveTo(0, 0); ctx.lineTo(cell, 0); ctx.lineTo(V.T * cell, (V.T - 1) * cell);
    ctx.lineTo(V.T * cell, V.T * cell); ctx.lineTo(0, V.T * cell); ctx.closePath(); ctx.fill();
    let drawn = 0;
    for (let t = 0; t < V.T; t++) {
      for (const x of selectionOf(t)) { ctx.fillStyle = colour(x.shade); ctx.fillRect(x.key * cell, t * cell, cell, cell); drawn++; }
    }
    // A run without a key selection (the dense baseline) has nothing to colour: say so, and
    // drop the colour scale rather than show one for an empty matrix.
    const note = document.getElementById("heatmap-note");
    note.hidden = drawn > 0;
    note.textContent = drawn ? "" : "No key selection recorded at this snapshot and layer: this run's attention is dense " +
      "(every visible key, shown grey), so there is nothing to colour.";
    if (drawn) drawHeatmapScale(); else document.getElementById("heatmap-scale").replaceChildren();
    const t = query();
    if (t !== null && t < V.T) {
      ctx.strokeStyle = "#d92d20"; ctx.lineWidth = 1;
      ctx.strokeRect(0.5, t * cell + 0.5, canvas.width - 1, Math.max(cell - 1, 1));
    }
  }

  // The heatmap's colour scale in the units of the chosen measure: attention shades are
  // sqrt(p) (so small probabilities stay visible), the axis is in p; indexer scores are shaded
  // within each query row, from the row's lowest to its highest selected score.
  function drawHeatmapScale() {
    const slot = document.getElementById("heatmap-scale");
    slot.replaceChildren();
    const byScore = state.shade === "score";
    const scale = byScore ? (v) => colour(v) : (p) => colour(Math.sqrt(p));
    scale.domain = () => [0, 1];
    const title = byScore ? "indexer score within the query's row (0 = its lowest, 1 = its highest)"
      : `${state.shade === "attn" ? "attention used" : "dense attention"} probability on the key (shade ∝ √p)`;
    SV.colorLegend(slot, scale, { title, width: 260 });
  }

  // ------------------------------------------------------------------ top tokens
  function updateTopTokens() {
    const list = document.getElementById("top-tokens");
    list.replaceChildren();
    const entries = ((data.top_tokens[historyIndex()] || [])[state.layer]) || [];
    if (!entries.length) { const li = document.createElement("li"); li.textContent = "no selection recorded"; list.appendChild(li); return; }
    for (const [text, count] of entries.slice(0, 10)) {
      const li = document.createElement("li");
      li.textContent = `${SV.tokenLabel(text)}  ×${count}`;
      list.appendChild(li);
    }
  }

  // ------------------------------------------------------------------ evolution charts
  const CHARTS = [
    { title: "mass@k: indexer vs baselines", series: [
      ["mass_at_k", "indexer", "#3b6fd8"], ["mass_at_k_oracle", "oracle", "#2e7d32"],
      ["mass_at_k_sink_local", "sink+local", "#8e44ad"], ["mass_at_k_local", "local", "#e67e22"],
      ["mass_at_k_random", "random", "#7f8c8d"]] },
    { title: "recall@k of the dense top-k", why: "no key selection in this run (dense attention keeps every key)", series: [["recall_at_k", "recall@k", "#c0392b"]] },
    { title: "KL(p ‖ softmax(I)) (nats)", why: "no Lightning Indexer in this run (this selector does not use one)", series: [["indexer_kl", "KL", "#3b6fd8"]] },
    { title: "attention entropy (nats)", series: [["entropy_sparse", "used", "#3b6fd8"], ["entropy_dense", "dense", "#7f8c8d"]] },
    { title: "Jaccard with the previous snapshot", why: "needs two snapshots with a key selection", series: [["jaccard_prev", "Jaccard", "#3b6fd8"]] },
    { title: "selection biases", why: "no key selection in this run (dense attention keeps every key)", series: [["sink_share", "sink share", "#8e44ad"], ["local_share", "local-window share", "#e67e22"]] },
    { title: "indexer score mean", why: "no Lightning Indexer in this run (this selector does not use one)", series: [["score_mean", "mean", "#3b6fd8"], ["score_std", "std", "#7f8c8d"]] },
    { title: "validation loss", global: true, why: "no validation has run yet (it runs every trainer.val_check_interval steps)", series: [["val_loss", "val loss", "#101828"]] },
    { title: "training tokens/s", global: true, why: "measured from the second snapshot on", series: [["tokens_per_s", "tokens/s", "#101828"]] },
  ];
  if (answers.size) {
    CHARTS.unshift(
      { title: "ground-truth hit@k: selection vs baselines", series: [
        ["gt_hit_at_k", "selection", "#3b6fd8"], ["gt_hit_at_k_oracle", "oracle", "#2e7d32"],
        ["gt_hit_at_k_sink_local", "sink+local", "#8e44ad"], ["gt_hit_at_k_local", "local", "#e67e22"],
        ["gt_hit_at_k_random", "random", "#7f8c8d"]] },
      { title: "attention mass on the ground-truth value", series: [
        ["gt_mass", "dense", "#c0392b"], ["gt_attn_mass", "used", "#3b6fd8"]] },
      { title: "answer accuracy (probe)", global: true, series: [["answer_accuracy", "accuracy", "#101828"]] });
  }
  const markers = [];
  function column(name, global) {
    const key = global ? name : `L${state.layer}/${name}`;
    return data.history[key] || (global ? null : data.history[name]) || null;
  }
  function buildCharts() {
    const box = d3.select("#charts");
    box.selectAll("*").remove();
    markers.length = 0;
    const width = 320, height = 154, margin = { top: 8, right: 10, bottom: 34, left: 46 };
    const x = d3.scaleLinear().domain(d3.extent(data.steps)).range([margin.left, width - margin.right]);
    if (data.steps.length === 1) x.domain([data.steps[0] - 1, data.steps[0] + 1]);
    for (const chart of CHARTS) {
      const series = chart.series.map(([name, label, colour]) => ({ label, colour, values: column(name, chart.global) }))
        .filter((s) => s.values && s.values.some((v) => v !== null));
      const div = box.append("div").attr("class", "tr-chart");
      div.append("h3").text(chart.title);
      if (!series.length) { div.append("p").attr("class", "tr-legend not-recorded").text(`not recorded: ${chart.why || "this run has no such value"}`); continue; }
      const all = series.flatMap((s) => s.values.filter((v) => v !== null));
      let [lo, hi] = d3.extent(all);
      if (lo === hi) { lo -= 0.5; hi += 0.5; }
      const y = d3.scaleLinear().domain([lo, hi]).nice().range([height - margin.bottom, margin.top]);
      const svg = div.append("svg").attr("width", width).attr("height", height);
      svg.append("g").attr("class", "axis").attr("transform", `translate(0,${height - margin.bottom})`).call(d3.axisBottom(x).ticks(5));
      svg.append("text").attr("class", "x-label").attr("x", (margin.left + width - margin.right) / 2).attr("y", height - 4)
        .attr("text-anchor", "middle").text("training step");
      svg.append("rect").attr("class", "plot-area").attr("x", margin.left).attr("y", margin.top)
        .attr("width", width - margin.left - margin.right).attr("height", height - margin.top - margin.bottom).attr("fill", "none");
      svg.append("g").attr("class", "axis").attr("transform", `translate(${margin.left},0)`).call(d3.axisLeft(y).ticks(4));
      const marker = svg.append("line").attr("class", "marker").attr("y1", margin.top).attr("y2", height - margin.bottom);
      markers.push({ marker, x });
      series.forEach((s, i) => {
        const points = data.steps.map((step, j) => ({ step, value: s.values[j], stage: data.stages[j] }));
        const line = d3.line().defined((p) => p.value !== null).x((p) => x(p.step)).y((p) => y(p.value));
        svg.append("path").datum(points).attr("fill", "none").attr("stroke", s.colour).attr("stroke-width", 1.6).attr("d", line);
        svg.append("g").selectAll("circle").data(points.filter((p) => p.value !== null)).join("circle")
          .attr("cx", (p) => x(p.step)).attr("cy", (p) => y(p.value)).attr("r", 2.6).attr("fill", s.colour)
          .on("mouseenter", (event, p) => tip.show(event, `${s.label} · step ${p.step} (${p.stage}): ${SV.format(p.value)}`))
          .on("mouseleave", () => tip.hide());
      });
      // The legend is a row under the chart, never drawn over the curves.
      if (series.length > 1) {
        const legend = div.append("div").attr("class", "chart-legend");
        for (const s of series) {
          const item = legend.append("span").attr("class", "legend-item");
          item.append("span").attr("class", "swatch").style("background", s.colour);
          item.append("span").text(s.label);
        }
      }
    }
  }
  function updateMarkers() {
    for (const { marker, x } of markers) marker.attr("x1", x(stepOf())).attr("x2", x(stepOf()));
  }

  // ------------------------------------------------------------------ definitions
  const definitions = document.getElementById("definitions");
  for (const [term, text] of data.definitions) {
    const dt = document.createElement("dt"); dt.textContent = term;
    const dd = document.createElement("dd"); dd.textContent = text;
    definitions.append(dt, dd);
  }

  // ------------------------------------------------------------------ one update for all views
  function update() {
    const h = historyIndex();
    document.getElementById("step-label").textContent =
      `step ${stepOf()} · ${data.stages[h] ?? ""} stage · ${data.attention[h] ?? ""} attention`;
    updateTokens();
    drawHeatmap();
    updateTopTokens();
    updateMarkers();
  }

  if (V && state.hover === null) state.hover = answers.size ? Math.min(V.T - 1, [...answers.keys()][0])
    : Math.min(V.T - 1, Math.max(V.k, Math.floor(V.T / 2)));
  buildCharts();
  update();
  SV.markReady();
})();
