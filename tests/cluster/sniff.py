"""A packet capture on the bed's bridge without tcpdump: an AF_PACKET raw socket (root), and its reading.

    python sniff.py --iface BRIDGE --out FILE

It opens the socket, prints ``ready``, appends every frame it sees to FILE (a 4-byte length, a byte of
packet type, the frame) until SIGTERM, then prints one JSON line: ``frames``, ``bytes`` and ``drops``
(frames the kernel could not queue for it: a capture that dropped some may have missed a marker).

A bridge forwards frames between its ports without passing them up to its own device, so a socket on
the bridge would only see the traffic to and from the bridge's address. The socket joins the bridge's
promiscuous membership (as tcpdump does; undone when the socket closes): the bridge then hands a copy
of every frame it forwards up to its device, and the capture sees the hosts' traffic with each other.

:func:`tcp_streams` turns FILE into the TCP byte streams it carried, one per direction, in sequence
order (what a reader of the wire can reassemble); :func:`tls_walk` and :func:`zmtp_walk` check that a
stream is TLS records, or ZMTP frames of the CURVE mechanism, from its first byte to its last.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33
HEADER = struct.Struct("!IB")  # frame length, packet type (PACKET_HOST, ..., PACKET_OUTGOING)


def capture(iface: str, out: Path) -> int:
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    s.bind((iface, ETH_P_ALL))
    mreq = struct.pack("iHH8s", socket.if_nametoindex(iface), PACKET_MR_PROMISC, 0, b"")
    s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
    s.settimeout(0.1)
    frames = total = 0
    with out.open("wb") as f:
        print("ready", flush=True)
        while not stopping:
            try:
                frame, addr = s.recvfrom(1 << 18)
            except TimeoutError:
                continue
            except OSError:  # the bridge went away (teardown)
                break
            f.write(HEADER.pack(len(frame), addr[2]) + frame)
            frames += 1
            total += len(frame)
    _, drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    s.close()
    print(json.dumps({"frames": frames, "bytes": total, "drops": drops}), flush=True)
    return 0


# -- reading a capture ------------------------------------------------------------------------


def read_frames(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    pos = 0
    while pos + HEADER.size <= len(data):
        n, _ = HEADER.unpack_from(data, pos)
        pos += HEADER.size
        yield data[pos : pos + n]
        pos += n


Flow = tuple[str, int, str, int]  # source address, source port, destination address, destination port


@dataclass
class Stream:
    """One direction of one TCP connection as the capture saw it."""

    flow: Flow
    data: bytes = b""
    started: bool = False  #: the capture saw its SYN: ``data`` begins at the stream's first byte
    missing: int = 0  #: bytes the capture never saw (holes between the segments it did)
    segments: dict[int, bytes] = field(default_factory=dict, repr=False)  # relative seq -> payload
    first_seq: int | None = field(default=None, repr=False)

    def add(self, seq: int, syn: bool, payload: bytes) -> None:
        if self.first_seq is None:
            self.first_seq = seq
        rel = (seq - self.first_seq + (1 << 31)) % (1 << 32) - (1 << 31)
        if syn:
            self.started, rel = True, rel + 1
            self.segments.setdefault(rel, b"")
        if payload and len(payload) > len(self.segments.get(rel, b"")):
            self.segments[rel] = payload

    def assemble(self) -> None:
        parts, pos = [], None
        for rel in sorted(self.segments):
            seg = self.segments[rel]
            if pos is None:
                pos = rel
            if rel > pos:
                self.missing += rel - pos
                pos = rel
            if rel + len(seg) > pos:
                parts.append(seg[pos - rel :])
                pos = rel + len(seg)
        self.data = b"".join(parts)
        self.segments.clear()


def tcp_streams(path: Path) -> dict[Flow, Stream]:
    """Every TCP stream of the capture (IPv4), reassembled in sequence order, per direction."""
    streams: dict[Flow, Stream] = {}
    for frame in read_frames(path):
        eth_type, off = struct.unpack_from("!H", frame, 12)[0], 14
        if eth_type == 0x8100:  # a VLAN tag
            eth_type, off = struct.unpack_from("!H", frame, 16)[0], 18
        if eth_type != 0x0800 or len(frame) < off + 20:
            continue
        ihl = (frame[off] & 0x0F) * 4
        if frame[off + 9] != 6:  # not TCP
            continue
        total = struct.unpack_from("!H", frame, off + 2)[0]
        end = off + total if total else len(frame)
        src, dst = socket.inet_ntoa(frame[off + 12 : off + 16]), socket.inet_ntoa(frame[off + 16 : off + 20])
        t = off + ihl
        sport, dport, seq = struct.unpack_from("!HHI", frame, t)
        doff, flags = (frame[t + 12] >> 4) * 4, frame[t + 13]
        flow = (src, sport, dst, dport)
        stream = streams.get(flow)
        if stream is None:
            stream = streams[flow] = Stream(flow)
        stream.add(seq, bool(flags & 0x02), frame[t + doff : end])
    for stream in streams.values():
        stream.assemble()
    return streams


@dataclass
class Walk:
    """How much of a stream a protocol's framing accounts for."""

    plain_prefix: int = 0  #: bytes before the framing starts (NATS's INFO line, sent before TLS)
    units: int = 0  #: records (TLS) or frames (ZMTP) read
    covered: int = 0  #: bytes they span, from the start of the framing
    truncated: bool = False  #: the last one is cut short by the end of the capture
    left: int = 0  #: bytes after the last whole unit that are no unit at all
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def whole(self) -> bool:
        """The framing accounts for every byte (but, perhaps, a last unit the capture ended in)."""
        return self.left == 0 or self.truncated


TLS_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}


def tls_walk(data: bytes) -> Walk:
    """Walk TLS records from the start of ``data`` (after NATS's plain-text INFO line, if it has one)."""
    w = Walk()
    if data.startswith(b"INFO "):
        w.plain_prefix = data.index(b"\r\n") + 2 if b"\r\n" in data else len(data)
    pos = w.plain_prefix
    while pos < len(data):
        head = data[pos : pos + 5]
        if len(head) < 5:
            w.truncated = True
            break
        kind, major, minor, length = head[0], head[1], head[2], int.from_bytes(head[3:5], "big")
        if kind not in TLS_TYPES or major != 3 or minor > 4 or length > (1 << 14) + 2048:
            break
        if pos + 5 + length > len(data):
            w.truncated = True
            break
        w.units += 1
        w.kinds[TLS_TYPES[kind]] = w.kinds.get(TLS_TYPES[kind], 0) + 1
        pos += 5 + length
    w.covered = pos - w.plain_prefix
    w.left = len(data) - pos
    return w


CURVE_COMMANDS = (b"HELLO", b"WELCOME", b"INITIATE", b"READY", b"MESSAGE", b"ERROR")


def zmtp_mechanism(data: bytes) -> bytes:
    """The security mechanism a ZMTP 3 greeting names (b"CURVE", b"NULL", ...); b"" if it is no greeting."""
    if len(data) < 64 or data[0] != 0xFF or data[9] != 0x7F or data[10] < 3:
        return b""
    return data[12:32].rstrip(b"\0")


def zmtp_walk(data: bytes) -> Walk:
    """Walk the ZMTP frames after the greeting; ``kinds`` counts each frame by the CURVE command its body
    starts with (``"other"``: a frame that is none, i.e. a message in the clear)."""
    w = Walk(plain_prefix=64)
    pos = 64
    while pos < len(data):
        if pos + 2 > len(data):
            w.truncated = True
            break
        flags = data[pos]
        if flags & 0x02:
            if pos + 9 > len(data):
                w.truncated = True
                break
            size, body = int.from_bytes(data[pos + 1 : pos + 9], "big"), pos + 9
        else:
            size, body = data[pos + 1], pos + 2
        if flags & ~0x07:
            break
        if body + size > len(data):
            w.truncated = True
            break
        name = data[body + 1 : body + 1 + data[body]] if size else b""
        kind = name.decode() if name in CURVE_COMMANDS else "other"
        w.units += 1
        w.kinds[kind] = w.kinds.get(kind, 0) + 1
        pos = body + size
    w.covered = pos - 64
    w.left = len(data) - pos
    return w


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iface", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    return capture(args.iface, args.out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
