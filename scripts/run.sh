#!/usr/bin/env bash
# Run the hub on this host: bootstrap (venv, the hub's Redis, NATS), then every process of the
# Procfile under honcho. Arguments go to `honcho start`, e.g. `scripts/run.sh -f Procfile.pc2` or
# `scripts/run.sh api worker`. Paths are relative to the repository root.
#
# The hub's Redis must keep an append-only file (scripts/hub_redis.py): when nothing answers at the
# configured URL (by default 127.0.0.1:6380) the hub's own is started there (files in var/redis-6380);
# a Redis that answers but keeps nothing on disk stops this script, unless --allow-volatile-redis
# (first argument) accepts that a Redis crash loses the writes not yet in SQL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

boot=(--hub)
if [[ "${1:-}" == "--allow-volatile-redis" ]]; then
    boot+=(--allow-volatile-redis)
    shift
fi
bash scripts/bootstrap.sh "${boot[@]}"
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
