#!/usr/bin/env bash
# The GPU benchmark (benchmarks/bench_gpu.py): one prepared script that prints, in a few minutes on a machine with
# a CUDA GPU, the text step, image encoding, one epoch and the projected 16-shot ImageNet run of CoOp on 1,000
# classes in fp16, bf16 and fp32, each against the straightforward 77-token computation on the same GPU.
# Needs a Python with a CUDA build of torch and open_clip (PYTHON=..., default .venv/bin/python, else python3);
# vlprompt is taken from src/ (no install). Options go to bench_gpu.py. Figures: benchmarks/README.md, GPU section.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import torch, open_clip" 2>/dev/null; then
    echo "gpu.sh: $PY cannot import torch and open_clip (bash scripts/setup.sh, or PYTHON=...)" >&2
    exit 1
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PY" benchmarks/bench_gpu.py "$@"
