#!/usr/bin/env bash
# Make a test CA and the keys a hub and its clients need for TLS (gRPC, NATS) and CURVE (ZeroMQ).
#
#   scripts/make_certs.sh [--ca CA_DIR] DIR [NAME ...]
#
# DIR gets: ca.pem / ca.key (the CA), server.pem / server.key (the gRPC server certificate, valid for
# localhost, 127.0.0.1, ::1 and every NAME given: host names or IP addresses of the hub), client.pem /
# client.key (a client certificate of the same CA, for server.tls_client_ca_file), and for ZeroMQ
# curve/server.key + curve/server.key_secret and curve/clients/client.key + curve/client.key_secret
# (zmq.auth certificate files), nats-server.pem / nats-server.key (a certificate for nats-server, valid for
# the same names) and nats-client.pem / nats-client.key (a NATS client certificate, for `verify: true`).
# With --ca, the CA lives in CA_DIR (made there on the first run) and DIR gets only its ca.pem: run it once
# per host of a deployment, each with that host's names and addresses, and every host's certificates
# chain to one CA whose key never leaves CA_DIR (docs/security.md, "Several hosts").
# Existing files are kept: delete DIR to start again.
# For production, issue server and client certificates from your own CA (docs/security.md).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
CA_DIR=""
if [[ "$1" == --ca ]]; then
    [[ $# -ge 3 ]] || { echo "make_certs.sh: --ca needs CA_DIR and DIR" >&2; exit 2; }
    CA_DIR="$2"
    shift 2
fi
DIR="$1"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${MFH_PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
command -v openssl >/dev/null || { echo "make_certs.sh: openssl is needed (apt-get install openssl)" >&2; exit 1; }

umask 077
mkdir -p "$DIR"
if [[ -n "$CA_DIR" ]]; then
    mkdir -p "$CA_DIR"
    CA_DIR="$(cd "$CA_DIR" && pwd)"
fi
cd "$DIR"
CA="${CA_DIR:-$PWD}"
if [[ -n "$CA_DIR" && -f ca.key && ! ca.key -ef "$CA/ca.key" ]]; then
    echo "make_certs.sh: $PWD has a CA of its own (ca.key): use another DIR with --ca" >&2
    exit 1
fi

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then san+=",IP:$name"; else san+=",DNS:$name"; fi
done

if [[ ! -f "$CA/ca.pem" ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=MFH test CA" \
        -keyout "$CA/ca.key" -out "$CA/ca.pem" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
[[ "$CA/ca.pem" -ef ca.pem ]] || cp "$CA/ca.pem" ca.pem

issue() {  # issue NAME CN EXTENSIONS...
    local name="$1" cn="$2"
    shift 2
    [[ -f "$name.pem" ]] && return 0
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$cn" -keyout "$name.key" -out "$name.csr" 2>/dev/null
    printf '%s\n' "$@" > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA "$CA/ca.pem" -CAkey "$CA/ca.key" -CAserial "$CA/ca.srl" -CAcreateserial \
        -days 825 -extfile "$name.ext" -out "$name.pem" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
}
issue server "${1:-localhost}" "subjectAltName=$san" "extendedKeyUsage=serverAuth" "keyUsage=digitalSignature,keyEncipherment"
issue client "mfh-client" "extendedKeyUsage=clientAuth" "keyUsage=digitalSignature,keyEncipherment"
# nats-server presents this one to clients and, in a cluster, to the other servers on its routes.
issue nats-server "${1:-localhost}" "subjectAltName=$san" "extendedKeyUsage=serverAuth,clientAuth" \
    "keyUsage=digitalSignature,keyEncipherment"
issue nats-client "mfh-nats-client" "extendedKeyUsage=clientAuth" "keyUsage=digitalSignature,keyEncipherment"

if [[ ! -f curve/server.key_secret ]]; then
    mkdir -p curve/clients
    "$PY" - <<'PY'
import os
import zmq.auth

zmq.auth.create_certificates("curve", "server")
zmq.auth.create_certificates("curve", "client")
os.replace("curve/client.key", "curve/clients/client.key")
PY
fi
chmod 644 ca.pem server.pem client.pem nats-server.pem nats-client.pem curve/server.key curve/clients/client.key
echo "made in $(pwd): ca.pem server.pem/.key client.pem/.key nats-server.pem/.key nats-client.pem/.key curve/server.key(_secret) curve/clients/ curve/client.key_secret"
