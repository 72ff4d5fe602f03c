#!/usr/bin/env bash
# Create .venv with the registry builds of torch/torchvision (the machine's pip configuration points
# at a local torch wheel whose torchvision fails to import, so it is switched off here) and install
# vlprompt in editable mode. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# open_clip in the tested range, read from pyproject.toml's dependencies (one place to change it).
OPEN_CLIP=$(grep -o '"open_clip_torch[^"]*"' pyproject.toml | tr -d '"') || {
    echo "setup: no open_clip_torch requirement in pyproject.toml" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# --no-cache-dir: a cached copy of the torch wheel would double the disk this needs.
pipi() { env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null .venv/bin/pip install -q --disable-pip-version-check --no-cache-dir "$@"; }
if ! .venv/bin/python -c "import torch, torchvision, open_clip" 2>/dev/null; then
    echo "setup: installing torch 2.13.0 / torchvision 0.28.0 / $OPEN_CLIP into .venv (a minute or two)" >&2
    pipi torch==2.13.0 torchvision==0.28.0 "$OPEN_CLIP"
fi
# The test extra, Ray for the ray executor's tests, transformers for the Hugging Face checkpoints' tests.
if ! .venv/bin/python -c "import vlprompt, pytest, ray, transformers" 2>/dev/null || [ pyproject.toml -nt .venv/.vlprompt-installed ]; then
    pipi -e ".[test,ray,hf]"  # also brings an open_clip already installed outside the range into it
    touch .venv/.vlprompt-installed
fi
