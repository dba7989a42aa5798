#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the `device` tool), about 6 minutes. The machine has torch
# but an older transformers and no jsonargparse: carry their wheels (made here, once, in the repo root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 jsonargparse
# with `.whl/` in .git/info/exclude) and run
#   run(command="bash bench/device_checks.sh", carry=[".whl"], timeout_s=540)
# SmolLM2's weights exceed what travels; the timings use random weights of the same shapes.
# Prints, and keeps in $OUT/device_checks.log: the CUDA equality tests (sweeps, DSA's non-CPU
# paths), the long-context step ratio (DSA sparse stage vs dense fused SDPA, fp32 and bf16, with
# absolute times and allocator peaks), and the head-sweep ratios.
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/tests" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/device_checks.log"
{
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # DSA's non-CPU path (gathered copies, blockwise indexer) and the sweeps against the references.
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_sparse_attention.py tests/test_model_indexer_blocks.py \
    tests/test_cuda_sweeps.py
  # The long-context step: DSA's sparse stage vs the dense model with fused SDPA, each in its own process.
  # (each candidate is a fresh process that initialises CUDA: ~8 s apiece; these two took 78 s and 54 s)
  timeout 150 python3 bench/bench_long_context.py --device cuda --seq-lens 4096 8192 16384 --rounds 1 --steps 10 \
    --indexer-at 8192
  timeout 100 python3 bench/bench_long_context.py --device cuda --dtype bfloat16 --seq-lens 8192 32768 --rounds 1 --steps 10 \
    --indexer-at
  # the same step with one key/value head shared by the 4 query heads (MQA, as DeepSeek runs DSA)
  timeout 80 python3 bench/bench_long_context.py --device cuda --seq-lens 8192 16384 --rounds 1 --steps 10 --indexer-at \
    --kv-heads 1
  timeout 60 python3 bench/bench_head_sweep.py --random-init --device cuda --batch-size 54 --repeats 3
  timeout 60 python3 bench/bench_head_sweep.py --random-init --device cuda --batch-size 54 --repeats 3 --dtype bfloat16 \
    --methods one_per_head,batched+prefix
} 2>&1 | tee "$log"
