// Shared helpers of every sparse_viz report. Untrusted strings reach the DOM only via
// textContent / d3 .text(); nothing here builds markup from data.
"use strict";
const SV = {
  data: JSON.parse(document.getElementById("report-data").textContent),
  // Visible form of a token: whitespace made visible, text never interpreted as markup.
  tokenLabel(text) {
    return String(text).replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/ /g, "\u00b7");
  },
  tooltip() {
    let tip = document.querySelector(".tooltip");
    if (!tip) { tip = document.createElement("div"); tip.className = "tooltip"; document.body.appendChild(tip); }
    return {
      show(event, text) { tip.textContent = text; tip.style.display = "block"; tip.style.left = (event.clientX + 12) + "px"; tip.style.top = (event.clientY + 12) + "px"; },
      hide() { tip.style.display = "none"; },
    };
  },
  // Text colour for text drawn on `background` (any colour d3.rgb parses): black or white,
  // whichever has the higher WCAG 2 contrast ratio with it. The larger of the two ratios is
  // at least 4.58 for every opaque background (the worst case, relative luminance ~0.18, is
  // equally far from both), so token text stays readable (WCAG AA, 4.5:1) on every shade of
  // every colour scale; a fixed lightness cut-off (white below L* 55) gives 3.7:1 near the cut.
  textColourOn(background) {
    const c = d3.rgb(background);
    const linear = (v) => { const x = v / 255; return x <= 0.04045 ? x / 12.92 : ((x + 0.055) / 1.055) ** 2.4; };
    const luminance = 0.2126 * linear(c.r) + 0.7152 * linear(c.g) + 0.0722 * linear(c.b);
    return (1 + 0.05) / (luminance + 0.05) > (luminance + 0.05) / (0 + 0.05) ? "#ffffff" : "#000000";
  },
  format(x, digits = 4) { return x === null || x === undefined ? "n/a" : Number(x).toPrecision(digits); },
  // A colour scale drawn as a gradient bar with a labelled axis, appended to `parent` (a DOM
  // element). `scale` is a d3 sequential/diverging scale; its first and last domain values are
  // the bar's ends and are recorded in data-min / data-max so tests can read what is shown.
  colorLegend(parent, scale, { title = "", width = 180 } = {}) {
    const domain = scale.domain();
    const lo = domain[0], hi = domain[domain.length - 1];
    const top = title ? 14 : 2;
    const svg = d3.select(parent).append("svg").attr("class", "color-legend")
      .attr("width", Math.max(width + 24, 14 + 6.2 * title.length)).attr("height", top + 26).attr("data-min", lo).attr("data-max", hi)
      .attr("data-title", title);
    SV._legendCount = (SV._legendCount || 0) + 1;
    const id = `sv-legend-${SV._legendCount}`;
    const gradient = svg.append("defs").append("linearGradient").attr("id", id);
    for (let i = 0; i <= 20; i++) {
      gradient.append("stop").attr("offset", `${i * 5}%`).attr("stop-color", scale(lo + (hi - lo) * i / 20));
    }
    if (title) svg.append("text").attr("x", 10).attr("y", 10).attr("font-size", 11).attr("fill", "#344054").text(title);
    svg.append("rect").attr("x", 10).attr("y", top).attr("width", width).attr("height", 10).attr("fill", `url(#${id})`);
    const axis = d3.scaleLinear([lo, hi], [10, 10 + width]);
    svg.append("g").attr("transform", `translate(0,${top + 10})`)
      .call(d3.axisBottom(axis).ticks(4).tickSize(3).tickFormat((v) => String(Number(Number(v).toPrecision(3)))))
      .call((g) => g.select(".domain").remove());
    return svg;
  },
  // Token text along a (T x T) matrix drawn `px` pixels square: rows (queries) in the SVG
  // `left`, columns (keys) in the SVG `bottom`, every n-th token when they would overlap. Each
  // label is a <text class="tok-label" data-position=t>, its text set with .text() (never markup).
  tokenAxes(left, bottom, tokens, T, px) {
    const band = d3.scaleBand().domain(d3.range(T)).range([0, px]);
    const every = Math.max(1, Math.ceil(11 / band.step()));
    const shown = d3.range(0, T, every);
    const size = Math.min(10, band.step() * every - 1);
    const label = (t) => { const s = SV.tokenLabel(tokens[t] ?? ""); return s.length > 10 ? s.slice(0, 9) + "\u2026" : s; };
    d3.select(left).selectAll("*").remove();
    d3.select(left).selectAll("text").data(shown).join("text")
      .attr("class", "tok-label").attr("data-position", (t) => t)
      .attr("x", 76).attr("y", (t) => band(t) + band.bandwidth() / 2).attr("dy", "0.35em")
      .attr("text-anchor", "end").attr("font-size", size).text(label);
    d3.select(bottom).selectAll("*").remove();
    d3.select(bottom).selectAll("text").data(shown).join("text")
      .attr("class", "tok-label").attr("data-position", (t) => t)
      .attr("transform", (t) => `translate(${band(t) + band.bandwidth() / 2},4) rotate(-60)`)
      .attr("dy", "0.35em").attr("text-anchor", "end").attr("font-size", size).text(label);
  },
  // Tells the browser tests (tests/browser.py) and benchmarks that the first render is done.
  // The performance mark times navigation -> first render (bench/bench_report_load.py).
  markReady() { performance.mark("sv-ready"); document.body.dataset.ready = "1"; },
};
