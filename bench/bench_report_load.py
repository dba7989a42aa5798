"""How fast a token-masking report of seed 000's size loads in headless Chromium.

    python bench/bench_report_load.py [--layers 28] [--tokens 109] [--heads 16] [--steps 3] [--repeats 5]

Default size: 28 layers x (2 + 16) variants x 3 generation steps over 109, 110, 111 tokens
= 166,320 rows (seed 000 reports 165k rows taking 2-3 s to load as JSON).

Measured, interleaved, medians over --repeats:
- report:      navigation -> the page's "ready" mark (payload parsed, indexed, first heatmap,
               bars and sequence built), read from `performance` inside the page; the goal is
               < 1 s; also navigation -> the first frame painted after it (layout + paint);
- parse only:  JSON.parse of the report's columnar payload;
- seed format: JSON.parse of the same rows as a list of row objects (seed 000's
               masking_results.json), which its viewer must parse before drawing anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sparse_viz.report.masking import render_masking_report

from browser import launch, load_report, open_ready, require_chromium  # bench/browser.py

# Marks the first frame painted after the page says it is ready: rAF runs just before that
# frame's paint, the task queued from it just after.
AFTER_PAINT_SCRIPT = """
new MutationObserver((changes, observer) => {
  if (document.body && document.body.dataset.ready === "1") {
    observer.disconnect();
    requestAnimationFrame(() => setTimeout(() => performance.mark("sv-painted"), 0));
  }
}).observe(document, {attributes: true, subtree: true, attributeFilter: ["data-ready"]});
"""

# Synchronous re-render time of one control change (the page redraws inside the change event).
TIME_CHANGE = """([selector, value]) => {
  const control = document.querySelector(selector);
  const t0 = performance.now();
  control.value = value;
  control.dispatchEvent(new Event("change"));
  return performance.now() - t0;
}"""
INTERACTIONS = {
    "switch to all heads": ("#variant-select", "__all_heads__"),
    "switch to step 0": ("#step-select", "0"),
    "switch back to Full": ("#variant-select", "0"),
}

PARSE_PAGE = """<!DOCTYPE html><html><body>
<script type="application/json" id="payload">{payload}</script>
<script>
const text = document.getElementById("payload").textContent;
const t0 = performance.now();
const rows = JSON.parse(text);
window.parseMs = performance.now() - t0;
window.parsedLength = Array.isArray(rows) ? rows.length : rows.rows.l2.length;
document.body.dataset.ready = "1";
</script></body></html>"""


def synthetic_results(layers: int, tokens: int, heads: int, steps: int, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Random long-format results shaped like a real run (token strings, growing sequence)."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array([" the", " of", " capital", " France", " is", " Paris", ",", ".", " and", "\n", " a"])
    sequence = ["<|im_start|>"] + rng.choice(vocabulary, size=tokens + steps - 2).tolist()
    variants = ["Full", "Attn"] + [f"Head_{h}" for h in range(heads)]
    frames = []
    for step in range(steps):
        length = tokens + step
        g, l, p, v = np.meshgrid([step], np.arange(layers), np.arange(length), np.arange(len(variants)), indexing="ij")
        n = g.size
        frames.append(pd.DataFrame({
            "generation_step": g.ravel(),
            "layer": l.ravel(),
            "token_masked": np.array(sequence[:length], dtype=object)[p.ravel()],
            "token_position": p.ravel(),
            "variant": np.array(variants, dtype=object)[v.ravel()],
            "l2_distance": rng.gamma(1.0, 0.5, n) * np.where(p.ravel() == 0, 20.0, 1.0),
            "cosine_distance": rng.beta(1.0, 20.0, n),
        }))
    metadata = {
        "model": "synthetic (bench_report_load)",
        "prompt": "".join(sequence[1:tokens]),
        "generated_text": "".join(sequence[tokens:]),
        "num_layers": layers,
        "num_heads": heads,
        "steps": [{"generation_step": s, "tokens": sequence[: tokens + s]} for s in range(steps)],
    }
    return pd.concat(frames, ignore_index=True), metadata


def seed_format_page(results: pd.DataFrame) -> str:
    """The rows as seed 000's JSON (a list of objects, full float precision) inside a page."""
    records = json.dumps(results.to_dict(orient="records"), separators=(",", ":"))
    return PARSE_PAGE.format(payload=records.replace("<", "\\u003c"))


def columnar_page(report_html: str) -> str:
    payload = report_html.split('<script type="application/json" id="report-data">', 1)[1].split("</script>", 1)[0]
    return PARSE_PAGE.format(payload=payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--tokens", type=int, default=109)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    require_chromium("bench_report_load")
    from playwright.sync_api import sync_playwright

    results, metadata = synthetic_results(args.layers, args.tokens, args.heads, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        report = render_masking_report(folder, results, metadata)
        render_s = time.perf_counter() - start
        seed_page = folder / "seed_format.html"
        seed_page.write_text(seed_format_page(results), encoding="utf-8")
        parse_page = folder / "columnar_parse.html"
        parse_page.write_text(columnar_page(report.read_text(encoding="utf-8")), encoding="utf-8")
        sizes = {p.name: p.stat().st_size for p in (report, seed_page, parse_page)}

        timings: dict[str, list[float]] = {"report": [], "report_painted": [], "report_wall": [], "columnar_parse": [], "seed_parse": [], **{k: [] for k in INTERACTIONS}}
        with sync_playwright() as playwright:
            browser = launch(playwright)
            for _ in range(args.repeats):  # interleaved: each repetition loads all three pages
                page, errors, wall_ms, ready_ms = load_report(browser, report, AFTER_PAINT_SCRIPT)
                timings["report_wall"].append(wall_ms)
                timings["report"].append(ready_ms)
                page.wait_for_function("() => performance.getEntriesByName('sv-painted').length > 0", polling=5)
                timings["report_painted"].append(page.evaluate("() => performance.getEntriesByName('sv-painted')[0].startTime"))
                for key, (selector, value) in INTERACTIONS.items():
                    timings[key].append(page.evaluate(TIME_CHANGE, [selector, value]))
                if errors:
                    sys.exit(f"bench_report_load: the report threw: {errors[0]}")
                page.close()
                for key, path in (("columnar_parse", parse_page), ("seed_parse", seed_page)):
                    page = open_ready(browser, path)
                    assert page.evaluate("() => window.parsedLength") == len(results)
                    timings[key].append(page.evaluate("() => window.parseMs"))
                    page.close()
            version = browser.version
            browser.close()

    med = {k: statistics.median(v) for k, v in timings.items()}
    mib = 1024 * 1024
    print(f"rows: {len(results):,} ({args.layers} layers x {args.heads + 2} variants x {args.steps} steps of "
          f"{args.tokens}..{args.tokens + args.steps - 1} tokens); Chromium {version}; medians of {args.repeats}")
    print(f"{'python render_masking_report:':<38}{render_s * 1000:7.0f} ms")
    line = lambda label, text: print(f"{label:<38}{text}")  # noqa: E731
    line("report.html size:", f"{sizes['report.html'] / mib:7.2f} MiB (payload alone {sizes['columnar_parse.html'] / mib:.2f} MiB)")
    line("seed-format JSON (row objects):", f"{sizes['seed_format.html'] / mib:7.2f} MiB "
         f"({sizes['seed_format.html'] / sizes['columnar_parse.html']:.1f}x the columnar payload)")
    line("report load, navigation -> ready:", f"{med['report']:7.1f} ms (goal < 1000 ms; wall time incl. "
         f"Playwright round trips {med['report_wall']:.1f} ms)")
    line("  navigation -> first frame painted:", f"{med['report_painted']:7.1f} ms")
    line("  JSON.parse, columnar payload:", f"{med['columnar_parse']:7.1f} ms")
    line("  JSON.parse, seed row objects:", f"{med['seed_parse']:7.1f} ms ({med['seed_parse'] / med['columnar_parse']:.1f}x "
         f"the columnar parse; {med['seed_parse'] / med['report']:.2f}x the whole columnar report load)")
    for key in INTERACTIONS:
        line(f"  re-render, {key}:", f"{med[key]:7.1f} ms")

if __name__ == "__main__":
    main()
