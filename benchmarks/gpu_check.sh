#!/usr/bin/env bash
# The accelerator check (302 s on one H100, before the 1,500-step run without deterministic kernels
# was added): the seed recipe in bfloat16 for all 5,000 steps, sampling at batch 1 and 16 in each
# weight type, and the PyTorch reference (seed code; fused + torch.compile).
#
#   bash benchmarks/gpu_check.sh [--json FILE]     # on the GPU/TPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --smoke           # a tiny CPU version of every step (tests run it)
#
# The machine may be offline and lack packages: whatever wheels are in .whl/ are installed into a
# temporary directory first (never into the machine's Python), and ../shared's bench/ and data/ are
# read from .shared/ when that exists (../shared does not travel). Preparing both:
# benchmarks/README.md, "The accelerator check".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE=${TMPDIR:-/tmp}/orpheus-jax-site
  "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
SHARED=../shared
[ -d .shared ] && SHARED=.shared
export ORPHEUS_DATA=${ORPHEUS_DATA:-$SHARED/data/iliad.txt}
exec "$PYTHON" benchmarks/gpu_check.py --torch_reference "$SHARED/bench/torch_reference.py" "$@"
