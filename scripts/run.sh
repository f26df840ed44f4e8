#!/usr/bin/env bash
# Run the hub on this host: bootstrap (venv, Redis, NATS), then every process of the Procfile
# under honcho. Arguments go to `honcho start`, e.g. `scripts/run.sh -f Procfile.pc2` or
# `scripts/run.sh api worker`. Paths are relative to the repository root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/bootstrap.sh
# The hub's data (SQLite files, snapshots, audit reports) stays in the checkout's var/, as before.
export MFH_DATA_DIR="${MFH_DATA_DIR:-$ROOT/var}"

procfile_given=0
for arg in "$@"; do
    case "$arg" in -f | --procfile | -f?* | --procfile=*) procfile_given=1 ;; esac
done
if [[ $procfile_given -eq 0 && ! -f Procfile ]]; then
    echo "run.sh: there is no Procfile in $ROOT yet" >&2
    exit 1
fi
exec .venv/bin/honcho start -f Procfile "$@"
