"""The reading of a bridge capture (sniff.py), on frames made here: needs neither root nor the bed.

test_cluster_security.py trusts it to find a marker in any TCP stream and to tell TLS and CURVE from
plain text, so: segments out of order, repeated, overlapping or missing; real TLS records (Python's
ssl, over memory BIOs, with make_certs.sh's certificates); ZMTP greetings and frames.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from pathlib import Path

from cluster.sniff import HEADER, tcp_streams, tls_walk, zmtp_mechanism, zmtp_walk

A, B = ("10.9.9.1", 40000), ("10.9.9.2", 5714)


def frame(src: tuple[str, int], dst: tuple[str, int], seq: int, payload: bytes = b"", *, syn: bool = False) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], seq, 0, 5 << 4, 0x02 if syn else 0x18, 65535, 0, 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, socket.inet_aton(src[0]), socket.inet_aton(dst[0])
    )
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp


def write(path: Path, frames: list[bytes]) -> Path:
    path.write_bytes(b"".join(HEADER.pack(len(f), 0) + f for f in frames))
    return path


def test_segments_out_of_order_repeated_and_overlapping_reassemble(tmp_path: Path) -> None:
    isn = (1 << 32) - 3  # the sequence numbers wrap inside the stream
    data = b"the-marker-is-split-across-three-segments"
    segs = [
        frame(A, B, isn, syn=True),
        frame(A, B, (isn + 1 + 20) % (1 << 32), data[20:]),
        frame(A, B, isn + 1, data[:12]),
        frame(A, B, (isn + 1 + 8) % (1 << 32), data[8:25]),  # overlaps both
        frame(A, B, isn + 1, data[:12]),  # a retransmission
    ]
    s = tcp_streams(write(tmp_path / "cap", segs))[(*A, *B)]
    assert s.data == data and s.started and s.missing == 0


def test_a_segment_the_capture_missed_is_counted(tmp_path: Path) -> None:
    segs = [frame(A, B, 100, syn=True), frame(A, B, 101, b"abcd"), frame(A, B, 109, b"ijkl")]
    s = tcp_streams(write(tmp_path / "cap", segs))[(*A, *B)]
    assert s.data == b"abcdijkl" and s.missing == 4


def tls_bytes(certs: Path) -> tuple[bytes, bytes]:
    """A real TLS handshake and a few records each way: (client to server, server to client)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    bios = [ssl.MemoryBIO() for _ in range(4)]  # client in/out, server in/out
    client = client_ctx.wrap_bio(bios[0], bios[1], server_hostname="localhost")
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    c2s, s2c = bytearray(), bytearray()

    def pump() -> None:
        out = bios[1].read()
        c2s.extend(out)
        bios[2].write(out)
        out = bios[3].read()
        s2c.extend(out)
        bios[0].write(out)

    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        pump()
    for i in range(3):
        client.write(b"secret-marker " * 100 * (i + 1))
        pump()
        server.read(100_000)
        server.write(b"reply")
        pump()
    return bytes(c2s), bytes(s2c)


def test_tls_records_are_walked_to_the_last_byte_and_plain_text_is_not(certs: Path) -> None:
    c2s, s2c = tls_bytes(certs)
    for data in (c2s, s2c):
        w = tls_walk(data)
        assert w.whole and w.units > 3 and w.kinds["application_data"] >= 3 and b"secret-marker" not in data
    # NATS's plain-text INFO line before the handshake; a last record the capture ended in
    info = b'INFO {"server_id":"x","tls_required":true}\r\n'
    w = tls_walk(info + s2c)
    assert w.whole and w.plain_prefix == len(info)
    assert tls_walk(c2s[:-7]).whole and tls_walk(c2s[:-7]).truncated
    # Anything else is not TLS: a CONNECT line, plain text in the middle of the records
    assert not tls_walk(b'CONNECT {"user":"mfh","pass":"pw"}\r\nPING\r\n').whole
    w = tls_walk(c2s + b"PUB mfh.events.x 5\r\nhello\r\n" + c2s)
    assert not w.whole and w.left > 20


def greeting(mechanism: bytes) -> bytes:
    return b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x01" + mechanism.ljust(20, b"\0") + b"\0" + b"\0" * 31


def command(name: bytes, body: bytes, *, flags: int = 0x04) -> bytes:
    data = bytes([len(name)]) + name + body
    if len(data) > 255:
        return bytes([flags | 0x02]) + len(data).to_bytes(8, "big") + data
    return bytes([flags, len(data)]) + data


def test_zmtp_curve_frames_are_commands_and_a_message_in_clear_is_not() -> None:
    curve = greeting(b"CURVE") + command(b"HELLO", b"\0" * 194) + command(b"INITIATE", b"\0" * 300)
    curve += command(b"MESSAGE", b"\x01" * 80, flags=0)  # libzmq sends MESSAGE as a data frame
    w = zmtp_walk(curve)
    assert zmtp_mechanism(curve) == b"CURVE" and w.whole and w.kinds == {"HELLO": 1, "INITIATE": 1, "MESSAGE": 1}
    plain = greeting(b"NULL") + command(b"READY", b"\x0bSocket-Type\0\0\0\x06DEALER") + b"\x00\x0bsecret-data"
    w = zmtp_walk(plain)
    assert zmtp_mechanism(plain) == b"NULL" and w.kinds.get("other") == 1
    assert zmtp_mechanism(b"GET / HTTP/1.1\r\n" * 5) == b""
