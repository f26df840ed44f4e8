#!/usr/bin/env bash
# The cluster test bed by hand (tests/cluster/bed.py; needs root and iproute2).
#
#   scripts/cluster.sh up      three hosts in network namespaces + a three-node NATS cluster; Ctrl-C tears down
#   scripts/cluster.sh up --secure   the same with TLS, CURVE, scoped keys and NATS TLS + passwords (docs/security.md)
#   scripts/cluster.sh clean   remove namespaces, links and processes a crashed run left behind
#   scripts/cluster.sh test    run the scenarios and the security checks (pytest -m cluster tests/cluster)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || { echo "cluster: run scripts/bootstrap.sh first" >&2; exit 1; }
case "${1:-}" in
    up | clean) exec "$PY" tests/cluster/bed.py "$@" ;;
    test)
        shift
        exec "$ROOT/.venv/bin/pytest" -q -m cluster tests/cluster "$@"
        ;;
    *)
        sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
