// Token-masking report: heatmap tokens x layers, small multiples over heads, impact per token.
// Payload format: sparse_viz/report/masking.py. Token text is untrusted: it reaches the DOM only
// through textContent / d3 .text() (never innerHTML / .html()).
"use strict";
(function () {
  const data = SV.data;
  const rows = data.rows;
  const layers = data.layers;
  const variants = data.variants;
  const steps = data.steps;
  const ALL_HEADS = "__all_heads__";
  const METRIC_NAMES = { l2: "L2 distance", cosine: "Cosine distance" };
  const headVariants = variants.map((name, code) => ({ name, code })).filter((v) => /^Head_\d+$/.test(v.name));
  const tooltip = SV.tooltip();

  // Row indices per (step, variant), built once: a view then touches only its own rows.
  const blocks = steps.map(() => variants.map(() => []));
  for (let i = 0; i < rows.step.length; i++) blocks[rows.step[i]][rows.variant[i]].push(i);

  const state = { metric: "l2", step: steps.length - 1, variant: String(variants.indexOf("Full") >= 0 ? variants.indexOf("Full") : 0),
                  scale: "linear", cap: "max", agg: "sum", order: "position", excludeFirst: false };

  // Values of one (step, variant, metric) as a grid: values[r * layers.length + c], NaN if absent.
  function grid(stepIndex, variantCode, metric) {
    const step = steps[stepIndex];
    const rowOf = new Map(step.positions.map((p, r) => [p, r]));
    const values = new Float64Array(step.positions.length * layers.length).fill(NaN);
    const column = rows[metric];
    for (const i of blocks[stepIndex][variantCode]) {
      const r = rowOf.get(rows.position[i]);
      const v = column[i];
      if (r !== undefined && v !== null) values[r * layers.length + rows.layer[i]] = v;
    }
    return values;
  }

  function currentGrids() {
    if (state.variant === ALL_HEADS) return headVariants.map((v) => ({ name: v.name, values: grid(state.step, v.code, state.metric) }));
    const code = Number(state.variant);
    return [{ name: variants[code], values: grid(state.step, code, state.metric) }];
  }

  // Sequential YlOrRd scale from 0 (log: top / 10^4) to the view's maximum or a percentile cap.
  // With excludeFirst the top is taken over positions > 0 only: position 0 is usually an
  // attention sink whose value dwarfs every other token's; its cells then saturate (clamped).
  function colourScale(grids) {
    const rowPositions = steps[state.step].positions;
    const counted = (i) => !(state.excludeFirst && rowPositions[Math.floor(i / layers.length)] === 0);
    let count = 0, max = -Infinity;
    for (const g of grids) g.values.forEach((v, i) => { if (Number.isFinite(v) && counted(i)) { count++; if (v > max) max = v; } });
    let top = count ? max : 1;
    if (state.cap !== "max" && count) {
      const sorted = new Float64Array(count);
      let k = 0;
      for (const g of grids) g.values.forEach((v, i) => { if (Number.isFinite(v) && counted(i)) sorted[k++] = v; });
      sorted.sort();
      top = d3.quantileSorted(sorted, state.cap === "p99" ? 0.99 : 0.95);
    }
    if (!(top > 0)) top = 1;
    const interpolator = d3.interpolateYlOrRd;
    let scale;
    if (state.scale === "log") scale = d3.scaleSequentialLog(interpolator).domain([top * 1e-4, top]);
    else if (state.scale === "sqrt") scale = d3.scaleSequentialSqrt(interpolator).domain([0, top]);
    else scale = d3.scaleSequential(interpolator).domain([0, top]);
    scale.clamp(true);
    return { scale, stats: { max: count ? max : NaN, count, top } };
  }

  // Where the largest value of the view sits: the sink note names position 0 when it is there.
  function sinkNote(grids) {
    const step = steps[state.step];
    let best = -Infinity, bestRow = -1;
    for (const g of grids) g.values.forEach((v, i) => { if (Number.isFinite(v) && v > best) { best = v; bestRow = Math.floor(i / layers.length); } });
    const note = d3.select("#sink-note");
    const dominated = bestRow >= 0 && step.positions[bestRow] === 0;
    note.attr("hidden", dominated || state.excludeFirst ? null : true);
    if (state.excludeFirst) {
      note.text("Position 0 is left out of the colour scale: its cells are drawn at the top colour (saturated) and hatched; hover them for their values.");
    } else if (dominated) {
      note.text(`The largest value is at position 0 ("${SV.tokenLabel(step.masked[bestRow])}"), usually an attention sink, and it sets the colour scale. ` +
        "Tick “exclude position 0 from the colour scale” above to see the other tokens, or run the command with --exclude-first-token to not mask it at all.");
    }
  }

  function fill(scale, v) {
    if (!Number.isFinite(v)) return null;
    return scale(state.scale === "log" ? Math.max(v, scale.domain()[0]) : v);
  }

  function tokenAt(stepIndex, r) { return steps[stepIndex].masked[r]; }

  function describe(variantName, stepIndex, r, c, v) {
    const step = steps[stepIndex];
    return `Layer ${layers[c]}  ·  ${variantName}\nMasked token ${step.positions[r]}: "${SV.tokenLabel(tokenAt(stepIndex, r))}"\n` +
           `${METRIC_NAMES[state.metric]}: ${SV.format(Number.isFinite(v) ? v : null, 5)}`;
  }

  // ----- legend -----------------------------------------------------------------------------
  function drawLegend(scale) {
    const width = 260, height = 10, margin = { left: 10, right: 18, top: 14, bottom: 18 };
    const holder = d3.select("#legend");
    holder.selectAll("*").remove();
    const svg = holder.append("svg").attr("width", width + margin.left + margin.right).attr("height", height + margin.top + margin.bottom)
      .attr("class", "color-legend").attr("data-min", scale.domain()[0]).attr("data-max", scale.domain()[1]);
    const id = "legend-gradient";
    const gradient = svg.append("defs").append("linearGradient").attr("id", id);
    const [d0, d1] = scale.domain();
    const axisScale = (state.scale === "log" ? d3.scaleLog() : state.scale === "sqrt" ? d3.scaleSqrt() : d3.scaleLinear())
      .domain([d0, d1]).range([0, width]);
    d3.range(0, 1.0001, 0.05).forEach((t) => {
      gradient.append("stop").attr("offset", `${t * 100}%`).attr("stop-color", scale(axisScale.invert(t * width)));
    });
    svg.append("text").attr("x", margin.left).attr("y", 10).text(`${METRIC_NAMES[state.metric]}${state.cap === "max" ? "" : " (capped at " + state.cap + ")"}` +
      (state.excludeFirst ? ", position 0 excluded" : ""));
    svg.append("rect").attr("x", margin.left).attr("y", margin.top).attr("width", width).attr("height", height).attr("fill", `url(#${id})`);
    const axis = d3.axisBottom(axisScale).tickSize(3).tickFormat(tickLabel);
    // A log axis labels powers of ten only; the others would overlap.
    if (state.scale === "log") axis.tickValues(axisScale.ticks().filter((t) => Math.abs(Math.log10(t) - Math.round(Math.log10(t))) < 1e-9));
    else axis.ticks(5);
    svg.append("g").attr("transform", `translate(${margin.left},${margin.top + height})`)
      .call(axis).call((g) => g.select(".domain").remove());
  }

  // ----- heatmap (one variant) -----------------------------------------------------------------
  function drawHeatmap(g, scale) {
    const step = steps[state.step];
    d3.select("#multiples").attr("hidden", true).selectAll("*").remove();
    const holder = d3.select("#heatmap").attr("hidden", null);
    holder.selectAll("*").remove();
    const table = holder.append("table").attr("class", "heatmap").attr("data-variant", g.name);
    // Cells share the panel's width (between 16 and 40 px each) instead of a fixed narrow column.
    const room = (holder.node().clientWidth || 900) - 280;
    table.style("--cell-w", `${Math.max(16, Math.min(40, Math.floor(room / Math.max(layers.length, 1))))}px`);
    const head = table.append("thead").append("tr");
    head.append("th").attr("class", "row-head").text("pos  token");
    head.selectAll("th.layer").data(layers).join("th").attr("class", "layer").attr("scope", "col").text((l) => l);
    const body = table.append("tbody");
    const tr = body.selectAll("tr").data(step.positions).join("tr").attr("data-position", (p) => p);
    const th = tr.append("th").attr("class", "row-head").attr("scope", "row");
    th.append("span").attr("class", "pos").text((p) => p);
    th.append("span").attr("class", "tok").text((p, r) => SV.tokenLabel(step.masked[r]));
    tr.each(function (p, r) {
      const cells = [];
      for (let c = 0; c < layers.length; c++) cells.push({ r, c, v: g.values[r * layers.length + c] });
      d3.select(this).selectAll("td").data(cells).join("td")
        .attr("data-layer", (d) => layers[d.c])
        .attr("data-value", (d) => (Number.isFinite(d.v) ? d.v : ""))
        .classed("missing", (d) => !Number.isFinite(d.v))
        .classed("saturated", (d) => state.excludeFirst && p === 0 && Number.isFinite(d.v) && d.v > scale.domain()[1])
        .style("background-color", (d) => fill(scale, d.v));
    });
    const showCell = (event) => {
      const cell = event.target.closest("td");
      if (!cell) return tooltip.hide();
      const d = d3.select(cell).datum();
      tooltip.show(event, describe(g.name, state.step, d.r, d.c, d.v));
    };
    table.on("mouseover", showCell).on("mousemove", showCell).on("mouseleave", () => tooltip.hide());
  }

  // ----- small multiples (all heads) -------------------------------------------------------------
  function drawMultiples(grids, scale) {
    const step = steps[state.step];
    d3.select("#heatmap").attr("hidden", true).selectAll("*").remove();
    const holder = d3.select("#multiples").attr("hidden", null);
    holder.selectAll("*").remove();
    const nRows = step.positions.length, nCols = layers.length;
    const cw = Math.max(3, Math.min(14, Math.floor(240 / nCols)));
    const ch = Math.max(2, Math.min(12, Math.floor(360 / Math.max(nRows, 1))));
    const figures = holder.selectAll("figure").data(grids).join("figure").attr("class", "multiple").attr("data-variant", (g) => g.name);
    figures.append("figcaption").text((g) => g.name.replace("_", " "));
    figures.append("canvas").attr("width", nCols * cw).attr("height", nRows * ch)
      .each(function (g) {
        const context = this.getContext("2d");
        let max = -Infinity;
        for (let r = 0; r < nRows; r++) {
          for (let c = 0; c < nCols; c++) {
            const v = g.values[r * nCols + c];
            if (Number.isFinite(v)) max = Math.max(max, v);
            context.fillStyle = fill(scale, v) || "#eef0f3";
            context.fillRect(c * cw, r * ch, cw, ch);
          }
        }
        this.dataset.max = Number.isFinite(max) ? String(max) : "";
      })
      .on("mousemove", function (event, g) {
        const box = this.getBoundingClientRect();
        const c = Math.floor((event.clientX - box.left) / cw), r = Math.floor((event.clientY - box.top) / ch);
        if (r < 0 || r >= nRows || c < 0 || c >= nCols) return tooltip.hide();
        tooltip.show(event, describe(g.name, state.step, r, c, g.values[r * nCols + c]));
      })
      .on("mouseleave", () => tooltip.hide());
  }

  // ----- impact per token ---------------------------------------------------------------------
  function perToken(grids) {
    const nRows = steps[state.step].positions.length, nCols = layers.length;
    const out = new Float64Array(nRows).fill(NaN);
    for (const g of grids) {
      for (let r = 0; r < nRows; r++) {
        for (let c = 0; c < nCols; c++) {
          const v = g.values[r * nCols + c];
          if (!Number.isFinite(v)) continue;
          const prev = out[r];
          out[r] = Number.isNaN(prev) ? v : state.agg === "sum" ? prev + v : Math.max(prev, v);
        }
      }
    }
    return out;
  }

  function drawBars(impact, variantLabel) {
    const step = steps[state.step];
    const items = step.positions.map((p, r) => ({ p, r, token: step.masked[r], v: impact[r] }));
    if (state.order === "impact") items.sort((a, b) => (Number.isFinite(b.v) ? b.v : -1) - (Number.isFinite(a.v) ? a.v : -1));
    const rowH = 16, labelW = 210, valueW = 70, width = 900;
    const x = d3.scaleLinear().domain([0, d3.max(items, (d) => (Number.isFinite(d.v) ? d.v : 0)) || 1]).range([0, width - labelW - valueW]);
    const holder = d3.select("#bars");
    holder.selectAll("*").remove();
    const svg = holder.append("svg").attr("width", width).attr("height", items.length * rowH + 24)
      .attr("aria-label", `Impact per token, ${state.agg} over layers, ${variantLabel}`);
    svg.append("g").attr("transform", `translate(${labelW},${items.length * rowH + 2})`).call(d3.axisBottom(x).ticks(6).tickSize(3).tickFormat(tickLabel));
    const g = svg.selectAll("g.row").data(items).join("g").attr("class", "row")
      .attr("data-position", (d) => d.p).attr("data-value", (d) => (Number.isFinite(d.v) ? d.v : ""))
      .attr("transform", (d, i) => `translate(0,${i * rowH})`);
    g.append("rect").attr("x", 0).attr("width", width).attr("height", rowH).attr("fill", "transparent");
    g.append("text").attr("class", "pos").attr("x", 4).attr("y", rowH - 4).text((d) => d.p);
    g.append("text").attr("class", "tok").attr("x", 44).attr("y", rowH - 4).text((d) => truncate(SV.tokenLabel(d.token), 24));
    g.append("rect").attr("class", "bar").attr("x", labelW).attr("y", 2).attr("height", rowH - 4)
      .attr("width", (d) => (Number.isFinite(d.v) ? x(d.v) : 0));
    g.append("text").attr("class", "value").attr("x", (d) => labelW + (Number.isFinite(d.v) ? x(d.v) : 0) + 4).attr("y", rowH - 4)
      .text((d) => SV.format(Number.isFinite(d.v) ? d.v : null, 4));
    g.on("mousemove", (event, d) => tooltip.show(event,
      `Masked token ${d.p}: "${SV.tokenLabel(d.token)}"\n${state.agg} over layers (${variantLabel}), ${METRIC_NAMES[state.metric]}: ${SV.format(Number.isFinite(d.v) ? d.v : null, 5)}`))
      .on("mouseleave", () => tooltip.hide());
  }

  // 10 not 1e+1, 0.005 not 5m: three significant digits, trailing zeros dropped.
  function tickLabel(v) { return String(Number(Number(v).toPrecision(3))); }

  function truncate(text, n) { return text.length > n ? text.slice(0, n - 1) + "\u2026" : text; }

  // ----- sequence -----------------------------------------------------------------------------
  function drawSequence(impact) {
    const step = steps[state.step];
    const analysed = new Map(step.positions.map((p, r) => [p, r]));
    const tokens = step.sequence || [];
    const length = step.sequence ? tokens.length : (step.positions.length ? step.positions[step.positions.length - 1] + 1 : 0);
    const max = d3.max(impact, (v) => (Number.isFinite(v) ? v : 0)) || 1;
    const scale = d3.scaleSequential(d3.interpolateYlOrRd).domain([0, max]);
    const items = d3.range(length).map((p) => {
      const r = analysed.get(p);
      return { p, text: p < tokens.length ? tokens[p] : r !== undefined ? step.masked[r] : "", v: r !== undefined ? impact[r] : NaN, analysed: r !== undefined };
    });
    d3.select("#sequence-title").text(`Sequence at generation step ${step.step} (${length} tokens)` +
      (step.next_token === null || step.next_token === undefined ? "" : `, next token "${SV.tokenLabel(step.next_token)}"`));
    d3.select("#sequence").selectAll("span.token").data(items).join("span")
      .attr("class", "token").attr("data-position", (d) => d.p)
      .classed("unanalysed", (d) => !d.analysed).classed("final", (d) => d.p === length - 1)
      .style("background-color", (d) => (d.analysed && Number.isFinite(d.v) ? scale(d.v) : null))
      // black or white by WCAG contrast with the cell's colour (SV.textColourOn)
      .style("color", (d) => (d.analysed && Number.isFinite(d.v) ? SV.textColourOn(scale(d.v)) : null))
      .text((d) => SV.tokenLabel(d.text))
      .on("mousemove", (event, d) => tooltip.show(event, `Position ${d.p}: "${SV.tokenLabel(d.text)}"\n` +
        (d.analysed ? `impact (${state.agg} over layers): ${SV.format(Number.isFinite(d.v) ? d.v : null, 5)}` : "not analysed")))
      .on("mouseleave", () => tooltip.hide());
  }

  // ----- everything --------------------------------------------------------------------------
  function render() {
    const grids = currentGrids();
    const { scale, stats } = colourScale(grids);
    const variantLabel = state.variant === ALL_HEADS ? "all heads" : variants[Number(state.variant)];
    drawLegend(scale);
    sinkNote(grids);
    if (state.variant === ALL_HEADS) drawMultiples(grids, scale);
    else drawHeatmap(grids[0], scale);
    d3.select("#heatmap-title").text(`Impact of masking each token, per layer: ${variantLabel}` +
      (state.variant === ALL_HEADS ? ` (${grids.length} heads, one colour scale)` : ""));
    const impact = perToken(grids);
    drawBars(impact, variantLabel);
    drawSequence(impact);
    let best = { v: -Infinity, r: -1, c: -1, name: "" };
    for (const g of grids) g.values.forEach((v, i) => { if (v > best.v) best = { v, r: Math.floor(i / layers.length), c: i % layers.length, name: g.name }; });
    const step = steps[state.step];
    d3.select("#view-summary").text(
      `Step ${step.step} · ${variantLabel} · ${METRIC_NAMES[state.metric]}: ${stats.count} values` +
      (best.r >= 0 ? `, largest ${SV.format(best.v, 4)} at layer ${layers[best.c]} when masking token ${step.positions[best.r]} "${SV.tokenLabel(step.masked[best.r])}"` +
        (state.variant === ALL_HEADS ? ` (${best.name})` : "") : ""));
  }

  function setUpControls() {
    d3.select("#step-select").selectAll("option").data(steps).join("option")
      .attr("value", (d, i) => i)
      .text((d) => `Step ${d.step} (${d.sequence ? d.sequence.length : d.positions.length} tokens)` +
        (d.next_token === null || d.next_token === undefined ? "" : ` \u2192 "${SV.tokenLabel(d.next_token)}"`));
    d3.select("#step-select").property("value", String(state.step));
    const options = variants.map((name, code) => ({ value: String(code), label: name.replace(/^Head_(\d+)$/, "Head $1") }));
    if (headVariants.length) options.push({ value: ALL_HEADS, label: `All heads (${headVariants.length} small multiples)` });
    d3.select("#variant-select").selectAll("option").data(options).join("option").attr("value", (d) => d.value).text((d) => d.label);
    d3.select("#variant-select").property("value", state.variant);
    const bind = (selector, key) => d3.select(selector).on("change", function () { state[key] = this.value; render(); });
    d3.select("#step-select").on("change", function () { state.step = Number(this.value); render(); });
    bind("#variant-select", "variant");
    bind("#scale-select", "scale");
    bind("#cap-select", "cap");
    bind("#agg-select", "agg");
    bind("#order-select", "order");
    d3.select("#exclude-first").on("change", function () { state.excludeFirst = this.checked; render(); });
    d3.selectAll("input[name=metric]").on("change", function () { if (this.checked) { state.metric = this.value; render(); } });
  }

  function fillText() {
    const meta = data.meta;
    d3.select("#summary").text([meta.model || "model not recorded", `${meta.num_layers} layers`, `${meta.num_heads} heads`,
      `${steps.length} generation step${steps.length === 1 ? "" : "s"}`, `${meta.num_rows.toLocaleString("en")} rows`].join("  ·  "));
    d3.select("#prompt-text").text(meta.prompt || "(not recorded)");
    d3.select("#generated-text").text(meta.generated_text || "(not recorded)");
    const defaults = {
      Full: "Layer output minus layer input at the final position (attention and MLP together).",
      Attn: "Attention block output after o_proj at the final position.",
      "Head_N": "Contribution of query head N to the residual stream: its o_proj column block applied to its output z.",
    };
    const given = data.definitions.variants;
    const givenHead = Object.keys(given).some((k) => /^Head_/.test(k));
    const variantDefs = Object.entries(given).concat(Object.entries(defaults).filter(([k]) =>
      !(k in given) && !(k === "Head_N" && givenHead) && (k !== "Head_N" ? variants.includes(k) : headVariants.length > 0)));
    definitionList("#variant-definitions", variantDefs);
    definitionList("#metric-definitions", Object.entries(data.definitions.metrics));
    const details = [["Model", meta.model || "n/a"], ["Layers", String(meta.num_layers)], ["Heads", String(meta.num_heads)],
      ["Rows", meta.num_rows.toLocaleString("en")], ...Object.entries(meta.extra).map(([k, v]) => [k, String(v)])];
    definitionList("#run-details", details);
  }

  function definitionList(selector, entries) {
    const dl = d3.select(selector);
    for (const [term, text] of entries) { dl.append("dt").text(term); dl.append("dd").text(text); }
  }

  setUpControls();
  fillText();
  render();
  SV.markReady();
})();
