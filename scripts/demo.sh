#!/usr/bin/env bash
# Set up (if needed) and run the built-in default job: zero-shot then CoOp on a generated image set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/vlprompt demo "$@"
