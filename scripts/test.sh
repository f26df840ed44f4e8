#!/usr/bin/env bash
# The test command: bootstrap (venv, Redis, NATS, Postgres), then lint, format check, types,
# import layers, generated-code check and pytest, in that order, stopping at the first failure.
# Arguments go to pytest, e.g. `scripts/test.sh tests/test_services.py -x`.
# With CI=true (or 1), tests that need a service that is not reachable fail instead of skipping.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -v CI ]]; then export CI; fi

BIN="$ROOT/.venv/bin"
step() { printf '\n==> %s\n' "$*"; }

step "bootstrap --postgres"
bash scripts/bootstrap.sh --postgres

step "ruff check"
"$BIN/ruff" check .

step "ruff format --check"
"$BIN/ruff" format --check .

# Packages that have code yet (a .py file other than __init__.py).
PACKAGES=(mfh_models mfh_client mfh_core mfh_tasks mfh_api schedules)
typed=()
for pkg in "${PACKAGES[@]}"; do
    if [[ -d "$pkg" ]] && [[ -n "$(find "$pkg" -name '*.py' ! -name '__init__.py' -print -quit)" ]]; then
        typed+=("$pkg")
    fi
done
if ((${#typed[@]})); then
    step "mypy --strict ${typed[*]}"
    "$BIN/mypy" --strict "${typed[@]}"
else
    step "mypy: no package has code yet, skipped"
fi

step "lint-imports"
"$BIN/lint-imports"

if [[ -f scripts/gen_proto.py ]]; then
    step "gen_proto --check"
    "$BIN/python" scripts/gen_proto.py --check
fi

step "pytest -q $*"
rc=0
# A hung test run (a socket left open by a failed test can block interpreter exit) must fail, not
# hold CI to its limit: per test, pytest-timeout; for the whole run, timeout(1).
# Test files run in parallel (pytest-xdist, a file at a time per worker: most of the suite waits on
# processes, timers and the network, not the CPU); MFH_TEST_WORKERS=0 runs them in this process. Each
# worker claims its own pair of Redis test databases (tests/conftest.py: five pairs). The suites that
# kill, cut off or restart services and time the recovery (tests/faults, tests/cluster,
# tests/test_outages.py), and the fairness tests that time a caller beside a flood
# (tests/test_fairness.py) and the front's failover drill, which times how fast a killed replica is
# dropped and sends 800 requests at once through one replica (tests/test_zmq_front.py), run
# afterwards on their own, so no other test's load skews their clocks; they run even when the first phase failed (the exit code is then the first one's).
workers="${MFH_TEST_WORKERS:-3}"
parallel=()
if [[ "$workers" != 0 ]]; then parallel=(-n "$workers" --dist loadfile); fi
timed=(tests/faults tests/cluster tests/test_outages.py tests/test_fairness.py tests/test_zmq_front.py)
run_pytest() {
    timeout --signal=TERM --kill-after=60 "${MFH_TEST_TIMEOUT:-45m}" "$BIN/pytest" -q --durations=10 "$@"
}
if (($#)); then
    run_pytest "${parallel[@]}" "$@" || rc=$?
else
    ignore=()
    for t in "${timed[@]}"; do ignore+=("--ignore=$t"); done
    run_pytest "${parallel[@]}" "${ignore[@]}" || rc=$?
    step "pytest -q ${timed[*]} (on their own)"
    timed_rc=0
    run_pytest "${timed[@]}" || timed_rc=$?
    if [[ $rc -eq 0 ]]; then rc=$timed_rc; fi
fi
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "test.sh: FAILED: pytest did not finish within ${MFH_TEST_TIMEOUT:-45m}" >&2
fi
if [[ $rc -eq 5 ]]; then
    echo "test.sh: FAILED: pytest collected no tests (arguments: ${*:-none})" >&2
fi
exit "$rc"
