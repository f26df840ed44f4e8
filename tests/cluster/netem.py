"""A userspace stand-in for ``tc qdisc ... netem delay D loss P`` on one host's link.

Some kernels (this test bed's CI VM among them) ship without the netem qdisc. The bed then wires
the impaired host through two TAP devices instead of a veth pair: ``inner`` goes into the host's
namespace, ``outer`` into the bridge, and this process copies Ethernet frames between them,
delaying and dropping the frames that leave the host (what netem on the host's interface does).

    python netem.py --inner TAP --outer TAP --control FILE

It opens both devices (they must exist), prints ``ready`` and relays until SIGTERM; the fds stay
attached when the bed then moves ``inner`` into the namespace. On SIGUSR1 it reads FILE, JSON
``{"delay_ms": 200, "loss": 0.05, "both_ways": false}``, and applies it to frames read from then
on (``loss`` 1.0 cuts the host off, like ``netem loss 100%``); it answers by rewriting FILE + ".ack".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import random
import signal
import struct

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_FRAME = 65536


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class Link:
    """One direction: frames read from ``src`` reach ``dst`` after ``delay_s``, or are lost with ``loss``."""

    def __init__(self, src: int, dst: int, *, delay_s: float, loss: float, rng: random.Random) -> None:
        self.src, self.dst, self.delay_s, self.loss, self.rng = src, dst, delay_s, loss, rng
        self.loop = asyncio.get_running_loop()
        self.passed = self.dropped = 0

    def on_readable(self) -> None:
        while True:
            try:
                frame = os.read(self.src, MAX_FRAME)
            except BlockingIOError:
                return
            except OSError:  # the device went away (teardown)
                self.loop.remove_reader(self.src)
                return
            if self.loss and self.rng.random() < self.loss:
                self.dropped += 1
                continue
            self.passed += 1
            if self.delay_s:
                self.loop.call_later(self.delay_s, self.send, frame)
            else:
                self.send(frame)

    def send(self, frame: bytes) -> None:
        with contextlib.suppress(OSError):  # a full or vanished device drops the frame, as a NIC would
            os.write(self.dst, frame)


def configure(out: Link, back: Link, control: str) -> None:
    with open(control) as f:
        cfg = json.load(f)
    delay_s, loss, both = float(cfg.get("delay_ms", 0)) / 1000, float(cfg.get("loss", 0)), bool(cfg.get("both_ways"))
    out.delay_s, out.loss = delay_s, loss
    back.delay_s, back.loss = (delay_s, loss) if both else (0.0, 0.0)
    with open(control + ".ack", "w") as f:
        json.dump(cfg, f)


async def relay(args: argparse.Namespace) -> None:
    inner, outer = open_tap(args.inner), open_tap(args.outer)
    rng = random.Random(args.seed)
    out = Link(inner, outer, delay_s=0, loss=0, rng=rng)
    back = Link(outer, inner, delay_s=0, loss=0, rng=rng)
    configure(out, back, args.control)
    loop = asyncio.get_running_loop()
    loop.add_reader(inner, out.on_readable)
    loop.add_reader(outer, back.on_readable)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, configure, out, back, args.control)
    print("ready", flush=True)
    await stop.wait()
    print(f"out passed={out.passed} dropped={out.dropped} back passed={back.passed} dropped={back.dropped}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inner", required=True)
    p.add_argument("--outer", required=True)
    p.add_argument("--control", required=True, help="JSON file read at start and on SIGUSR1")
    p.add_argument("--seed", type=int, default=13)
    asyncio.run(relay(p.parse_args()))


if __name__ == "__main__":
    main()
