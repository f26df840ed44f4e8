#!/usr/bin/env bash
# The cluster test bed by hand (tests/cluster/bed.py; needs root and iproute2).
#
#   scripts/cluster.sh up      three hosts in network namespaces + a three-node NATS cluster; Ctrl-C tears down
#   scripts/cluster.sh clean   remove namespaces, links and processes a crashed run left behind
#   scripts/cluster.sh test    run the scenarios (pytest -m cluster tests/cluster)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || { echo "cluster: run scripts/bootstrap.sh first" >&2; exit 1; }
case "${1:-}" in
    up | clean) exec "$PY" tests/cluster/bed.py "$1" ;;
    test)
        shift
        exec "$ROOT/.venv/bin/pytest" -q -m cluster tests/cluster "$@"
        ;;
    *)
        sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
