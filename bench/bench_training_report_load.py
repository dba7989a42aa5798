"""How fast the training report of a 50 snapshots x 4 layers x 256-token probe loads in headless Chromium.

    python bench/bench_training_report_load.py [--snapshots 50] [--layers 4] [--tokens 256] [--top-k 32] [--repeats 5]
    python bench/bench_training_report_load.py --report results/<run>/report.html   # a real run's report

A synthetic run directory of that size is written through `RunStore` (random selections and
values with the real array shapes; no model), rendered with `render_training_report`, and
loaded --repeats times. Measured, interleaved, medians:
- report:        navigation -> the page's ready mark (payload parsed, typed arrays decoded,
                 tokens, heatmap, charts and definitions built); goal < 1 s;
- step change:   synchronous re-render after moving the step slider (tokens + heatmap + charts);
- nested JSON:   JSON.parse of the same per-query selections as nested JSON lists (the obvious
                 encoding, which the page would have to parse before drawing anything), for
                 comparison with the base64 typed-array payload the report uses.
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

from sparse_viz.report.training import render_training_report
from sparse_viz.tracking.store import RunStore

from browser import launch, load_report, open_ready, require_chromium  # bench/browser.py

TIME_SLIDER = """(value) => {
  const slider = document.getElementById("step-slider");
  const t0 = performance.now();
  slider.value = String(value);
  slider.dispatchEvent(new Event("input"));
  return performance.now() - t0;
}"""
PARSE_PAGE = """<!DOCTYPE html><html><body>
<script type="application/json" id="payload">{payload}</script>
<script>
const text = document.getElementById("payload").textContent;
const t0 = performance.now();
const rows = JSON.parse(text);
window.parseMs = performance.now() - t0;
document.body.dataset.ready = "1";
</script></body></html>"""


def synthetic_run(run_dir: Path, snapshots: int, layers: int, tokens: int, k: int, seed: int = 0) -> dict:
    """Write a run directory with the report's arrays at full size; returns the nested-list view."""
    rng = np.random.default_rng(seed)
    store = RunStore(run_dir)
    words = [" the", " of", " king", ",", ".", "\n", " and", " Romeo", " 1599", " thou"]
    store.write_probe({"tokens": [words[i] for i in rng.integers(0, len(words), tokens)], "top_k": k,
                       "n_layers": layers, "seq_len": tokens, "probe_rows": 4, "selector": "topk",
                       "every_n_steps": 50, "run_name": "bench"})
    nested = []
    t = np.arange(tokens)
    for i in range(snapshots):
        keys = np.argsort(rng.random((layers, tokens, tokens)) + np.tril(np.ones((tokens, tokens))) * 2, axis=-1)
        selected = keys[..., ::-1][..., :k].copy()  # (L, T, k) visible keys first
        selected[np.broadcast_to(np.arange(k)[None, None, :] > t[None, :, None], selected.shape)] = -1
        values = rng.random((layers, tokens, k)).astype(np.float32)
        arrays = {
            "show_selected": selected.astype(np.int16), "show_dense_top": selected[..., ::-1].astype(np.int16),
            "show_score": values * 3 - 1, "show_attn": values / k, "show_dense": values / (2 * k),
            "show_mass": rng.random((layers, tokens)).astype(np.float32),
        }
        record = {"step": 50 * i, "stage": "sparse", "attention": "sparse", "selection_source": "attention",
                  "val_loss": 5.0 - i * 0.02, "tokens_per_s": 4000.0}
        for name in ("mass_at_k", "mass_at_k_oracle", "mass_at_k_random", "mass_at_k_local", "mass_at_k_sink_local",
                     "recall_at_k", "indexer_kl", "entropy_sparse", "entropy_dense", "jaccard_prev", "sink_share",
                     "local_share", "score_mean", "score_std"):
            for layer in range(layers):
                record[f"L{layer}/{name}"] = float(rng.random())
            record[name] = float(rng.random())
        record["top_tokens"] = [[[w, int(rng.integers(1, 500))] for w in words] for _ in range(layers)]
        store.append(record, arrays)
        nested.append({"selected": selected.tolist(), "score": np.round(values, 4).tolist(),
                       "attn": np.round(values / k, 5).tolist(), "dense": np.round(values / (2 * k), 5).tolist()})
    return {"snapshots": nested}


def time_existing_report(report: Path, repeats: int) -> None:
    """Load a rendered report `repeats` times; print its size and the median time to ready."""
    from playwright.sync_api import sync_playwright

    if not report.is_file():
        sys.exit(f"bench_training_report_load: no report at {report}")
    ready, walls = [], []
    with sync_playwright() as playwright:
        browser = launch(playwright)
        for _ in range(repeats):
            page, errors, wall_ms, ready_ms = load_report(browser, report.resolve())
            if errors:
                sys.exit(f"bench_training_report_load: the report threw: {errors[0]}")
            ready.append(ready_ms)
            walls.append(wall_ms)
            page.close()
        version = browser.version
        browser.close()
    print(f"{report} ({report.stat().st_size / 1024 / 1024:.2f} MiB); Chromium {version}; medians of {repeats}")
    print(f"  navigation -> ready:  {statistics.median(ready):8.0f} ms   (goal < 1000 ms)")
    print(f"  wall (load + ready):  {statistics.median(walls):8.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snapshots", type=int, default=50)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--report", type=Path, help="time this report.html instead of a synthetic run's")
    args = parser.parse_args()
    require_chromium("bench_training_report_load")
    from playwright.sync_api import sync_playwright

    if args.report is not None:
        time_existing_report(args.report, args.repeats)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        nested = synthetic_run(folder / "run", args.snapshots, args.layers, args.tokens, args.top_k)
        start = time.perf_counter()
        report = render_training_report(folder / "run")
        render_s = time.perf_counter() - start
        nested_page = folder / "nested.html"
        nested_page.write_text(PARSE_PAGE.format(payload=json.dumps(nested, separators=(",", ":"))), encoding="utf-8")
        del nested
        sizes = {p.name: p.stat().st_size for p in (report, nested_page)}

        timings: dict[str, list[float]] = {"report": [], "wall": [], "step_change": [], "nested_parse": []}
        with sync_playwright() as playwright:
            browser = launch(playwright)
            for _ in range(args.repeats):
                page, errors, wall_ms, ready_ms = load_report(browser, report)
                timings["wall"].append(wall_ms)
                timings["report"].append(ready_ms)
                timings["step_change"].append(page.evaluate(TIME_SLIDER, args.snapshots // 2))
                if errors:
                    sys.exit(f"bench_training_report_load: the report threw: {errors[0]}")
                page.close()
                page = open_ready(browser, nested_page)
                timings["nested_parse"].append(page.evaluate("() => window.parseMs"))
                page.close()
            version = browser.version
            browser.close()

    med = {key: statistics.median(values) for key, values in timings.items()}
    mib = 1024 * 1024
    print(f"{args.snapshots} snapshots x {args.layers} layers x {args.tokens} tokens, k={args.top_k}; "
          f"Chromium {version}; medians of {args.repeats}")
    print(f"  python render_training_report:          {render_s * 1000:8.0f} ms")
    print(f"  report.html size:                       {sizes['report.html'] / mib:8.2f} MiB "
          f"(nested-JSON selections alone {sizes['nested.html'] / mib:.2f} MiB)")
    print(f"  report load, navigation -> ready:       {med['report']:8.1f} ms (goal < 1000 ms; wall incl. "
          f"Playwright round trips {med['wall']:.1f} ms)")
    print(f"  step slider re-render:                  {med['step_change']:8.1f} ms")
    print(f"  JSON.parse of nested-list selections:   {med['nested_parse']:8.1f} ms "
          f"(ratio to the whole report load: {med['nested_parse'] / med['report']:.2f}x)")


if __name__ == "__main__":
    main()
