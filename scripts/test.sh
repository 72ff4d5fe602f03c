#!/usr/bin/env bash
# Set up (if needed), unpack the shared real-image data into a cache outside the repo, run the tests
# (arguments go to pytest).
#
# The shared data is required, and its absence an error (exit 1, one line), when ../shared/data (or
# $VLPROMPT_SHARED_DATA) exists, or when CI or VLPROMPT_REQUIRE_DATA=1 is set; pytest then runs with
# VLPROMPT_REQUIRE_DATA=1, so a real-data test fails instead of skipping. Otherwise (a developer without
# the data) a notice says the real-data tests will be skipped, and the rest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLPROMPT_SHARED_DATA=${VLPROMPT_SHARED_DATA:-../shared/data}
export VLPROMPT_DATA=${VLPROMPT_DATA:-$HOME/.cache/vlprompt-data}
why=""
if [ -d "$VLPROMPT_SHARED_DATA" ]; then
    why="$VLPROMPT_SHARED_DATA exists"
elif [ -n "${CI:-}" ] && [ "${CI}" != "false" ] && [ "${CI}" != "0" ]; then
    why="CI is set"
elif [ "${VLPROMPT_REQUIRE_DATA:-}" = 1 ]; then
    why="VLPROMPT_REQUIRE_DATA=1"
fi
if log=$(bash scripts/unpack_data.sh 2>&1); then
    [ -z "$log" ] || printf '%s\n' "$log" >&2
    [ -z "$why" ] || export VLPROMPT_REQUIRE_DATA=1
elif [ -n "$why" ]; then
    echo "test: error: the shared data is required ($why) but is not available: ${log##*$'\n'}" >&2
    exit 1
else
    echo "test: notice: no shared data at $VLPROMPT_SHARED_DATA (and neither CI nor VLPROMPT_REQUIRE_DATA=1 is set): real-data tests will be skipped" >&2
    unset VLPROMPT_REQUIRE_DATA
fi
exec .venv/bin/python -m pytest -q "$@"
