#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the `device` tool), about 5 minutes, nothing to install
# and no checkpoint to carry (SmolLM2's weights exceed what travels; timings do not depend on them):
#   run(command="bash bench/device_checks.sh", timeout_s=540)
# Prints the CUDA sweep and sparse-attention tests and the head-sweep ratios (the sweep's >= 5x goal is a GPU number),
# and keeps the log in $OUT/device_checks.log.
set -uo pipefail
export PYTHONPATH="$PWD:$PWD/tests" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/device_checks.log"
{
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_sweeps.py tests/test_head_ablation.py
  # DSA's non-CPU path (gathered copies, blockwise indexer) against the references, and a T=8192 step.
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_sparse_attention.py tests/test_model_indexer_blocks.py
  python3 bench/bench_head_sweep.py --random-init --device cuda --batch-size 54 --repeats 3
  python3 bench/bench_head_sweep.py --random-init --device cuda --batch-size 270 --repeats 3 --methods one_per_head,batched+prefix
  python3 bench/bench_head_sweep.py --random-init --device cuda --batch-size 54 --repeats 3 --dtype bfloat16 --methods one_per_head,batched+prefix
} 2>&1 | tee "$log"
