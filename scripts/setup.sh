#!/usr/bin/env bash
# Create .venv with the registry builds of torch/torchvision (the machine's pip configuration points
# at a local torch wheel whose torchvision fails to import, so it is switched off here) and install
# vlprompt in editable mode. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
pipi() { env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null .venv/bin/pip install -q --disable-pip-version-check "$@"; }
if ! .venv/bin/python -c "import torch, torchvision, open_clip" 2>/dev/null; then
    echo "setup: installing torch 2.13.0 / torchvision 0.28.0 / open_clip into .venv (a minute or two)" >&2
    pipi torch==2.13.0 torchvision==0.28.0 open_clip_torch
fi
if ! .venv/bin/python -c "import vlprompt, pytest" 2>/dev/null || [ pyproject.toml -nt .venv/.vlprompt-installed ]; then
    pipi -e ".[test]"
    touch .venv/.vlprompt-installed
fi
