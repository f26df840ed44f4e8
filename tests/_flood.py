"""Hostile and well-behaved ZeroMQ peers in a process of their own (run by tests/test_fairness.py).

    python tests/_flood.py ENDPOINT COUNT SIZE [--good] [--ready]

Floods ENDPOINT with COUNT requests of about SIZE bytes from one DEALER that never reads. With
``--good``, a second, well-behaved peer in the same process sends one request once 2,000 flood
messages are out and times its reply. Prints one JSON object: ``flood_done`` (monotonic time the
last flood message was handed to libzmq) and, with --good, ``good_sent`` / ``good_answered``.
With ``--ready``, a line ``{"flooding": true}`` comes first, once 2,000 messages are out. A SIZE
of 120 or less sends well-formed Gets (each one runs); a larger one pads them with a field the
server refuses (INVALID_ARGUMENT) to reach SIZE.
Out of the test's process, so a server that starves its event loop cannot starve the peers too.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import zmq


def flood_body(i: int, size: int) -> bytes:
    payload = {"namespace": "flood", "key": "k"} | ({"pad": "x" * (size - 120)} if size > 120 else {})
    return json.dumps({"v": 1, "id": f"f{i}", "action": "get", "payload": payload}).encode()


def main() -> None:
    endpoint, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    good = "--good" in sys.argv
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    out: dict[str, float | None] = {}
    started = threading.Event()

    def good_peer() -> None:
        peer = ctx.socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(endpoint)
        started.wait(60)
        body = {"v": 1, "id": "good", "action": "get", "payload": {"namespace": "good", "key": "k"}}
        out["good_sent"] = time.monotonic()
        peer.send_multipart([b"", json.dumps(body).encode()])
        out["good_answered"] = time.monotonic() if peer.poll(30_000) else None
        peer.close()

    helper = threading.Thread(target=good_peer) if good else None
    if helper is not None:
        helper.start()
    for i in range(count):
        sock.send_multipart([b"", flood_body(i, size)])
        if i == 2000:
            started.set()
            if "--ready" in sys.argv:
                print(json.dumps({"flooding": True}), flush=True)
    out["flood_done"] = time.monotonic()
    started.set()
    if helper is not None:
        helper.join()
    print(json.dumps(out), flush=True)
    time.sleep(3600)  # never read, never close: the flood stays unanswered until the test kills us


if __name__ == "__main__":
    main()
