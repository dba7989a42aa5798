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
  format(x, digits = 4) { return x === null || x === undefined ? "n/a" : Number(x).toPrecision(digits); },
  // Tells the browser tests (tests/browser.py) and benchmarks that the first render is done.
  // The performance mark times navigation -> first render (bench/bench_report_load.py).
  markReady() { performance.mark("sv-ready"); document.body.dataset.ready = "1"; },
};
