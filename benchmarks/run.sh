#!/usr/bin/env bash
# Set up (if needed), unpack the shared images, then run every benchmark section and keep the figures.
# Takes about an hour on a 2-core CPU (the end-to-end Caltech-101 run is most of it); pass options through,
# e.g. `bash benchmarks/run.sh --sections machine,text,precision,methods` for the 15-minute part.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/unpack_data.sh || echo "bench: shared data not available; the end-to-end section will be skipped" >&2
export VLPROMPT_DATA=${VLPROMPT_DATA:-$HOME/.cache/vlprompt-data}
mkdir -p benchmarks/results
exec .venv/bin/python benchmarks/bench.py --json benchmarks/results/latest.json "$@"
