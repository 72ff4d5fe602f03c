#!/usr/bin/env bash
# Unpack $VLPROMPT_SHARED_DATA/*.tar.gz (default ../shared/data, relative to the repository root) into
# $VLPROMPT_DATA (default ~/.cache/vlprompt-data), once. Exits non-zero, its last stderr line saying why,
# when there is no such folder, no archive in it, or an archive does not unpack.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${VLPROMPT_SHARED_DATA:-../shared/data}
dst=${VLPROMPT_DATA:-$HOME/.cache/vlprompt-data}
[ -d "$src" ] || { echo "unpack: no folder $src" >&2; exit 1; }
shopt -s nullglob
archives=("$src"/*.tar.gz)
[ ${#archives[@]} -gt 0 ] || { echo "unpack: no *.tar.gz archive in $src" >&2; exit 1; }
mkdir -p "$dst" || { echo "unpack: cannot create $dst" >&2; exit 1; }
for f in "${archives[@]}"; do
    name=$(basename "$f" .tar.gz)
    if [ ! -e "$dst/.$name.done" ]; then
        echo "unpack: $f -> $dst" >&2
        tar -xzf "$f" -C "$dst" || { echo "unpack: cannot unpack $f into $dst" >&2; exit 1; }
        touch "$dst/.$name.done"
    fi
done
