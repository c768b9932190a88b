#!/bin/bash
# `consort` from a frozen copy of a commit (default: HEAD), installed once under /tmp, so that an
# evaluation running for hours never imports files that are being edited in the working tree.
#
#   CONSORT=bench/runs/frozen_consort.sh bash bench/runs/members_alone.sh
#   FROZEN_COMMIT=abc1234 bench/runs/frozen_consort.sh eval --help
#   bench/runs/frozen_consort.sh -m bench.answer_curves --help   (a module of the frozen tree's bench/)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
commit="$(git -C "$root" rev-parse --short "${FROZEN_COMMIT:-HEAD}")"
target="/tmp/consort-frozen-$commit"
if [ ! -f "$target/.installed" ]; then
  tree="$(mktemp -d)"
  git -C "$root" archive "$commit" | tar -x -C "$tree"
  "$root/.venv/bin/pip" install -q --no-deps --no-build-isolation --target "$target" "$tree"
  # bench/ is not part of the package: keep the commit's copy beside it for `-m bench.*`.
  cp -r "$tree/bench" "$target/bench"
  rm -rf "$tree"
  touch "$target/.installed"
fi
# -S: no site-packages .pth files, so the editable install of the working tree cannot win.
# `-m MODULE` runs that module of the frozen tree; anything else goes to `consort` itself.
module=consort
if [ "${1:-}" = "-m" ]; then
  module="$2"
  shift 2
fi
exec "$root/.venv/bin/python" -S -c "
import runpy, sys
sys.path[:0] = ['$target', '$root/.venv/lib/python3.11/site-packages']
sys.argv[0] = '$module'
runpy.run_module('$module', run_name='__main__', alter_sys=True)
" "$@"
