#!/usr/bin/env bash
# Unpack ../shared/data/*.tar.gz into $VLPROMPT_DATA (default ~/.cache/vlprompt-data), once.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${VLPROMPT_SHARED_DATA:-../shared/data}
dst=${VLPROMPT_DATA:-$HOME/.cache/vlprompt-data}
[ -d "$src" ] || { echo "unpack: no $src" >&2; exit 1; }
mkdir -p "$dst"
for f in "$src"/*.tar.gz; do
    name=$(basename "$f" .tar.gz)
    if [ ! -e "$dst/.$name.done" ]; then
        echo "unpack: $f -> $dst" >&2
        tar -xzf "$f" -C "$dst"
        touch "$dst/.$name.done"
    fi
done
