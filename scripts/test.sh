#!/usr/bin/env bash
# Set up (if needed), unpack the shared real-image data into a cache outside the repo, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/unpack_data.sh || echo "test: shared data not available; real-data tests will be skipped" >&2
export VLPROMPT_DATA=${VLPROMPT_DATA:-$HOME/.cache/vlprompt-data}
exec .venv/bin/python -m pytest -q "$@"
