"""Network namespaces, a bridge, veth pairs and TAP links for the cluster bed (iproute2, as root).

Every name carries the run id, so two runs never collide and :func:`remove_leftovers` can clean a
crashed run. All addresses are in one private /24 that only these namespaces and the bridge use.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "m13"  # every namespace and interface the bed makes starts with this


class NetError(RuntimeError):
    pass


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise NetError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


def why_unsupported() -> str | None:
    """None when namespaces can be made here, else the reason (not root, no iproute2, ...)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the cluster bed needs root (ip netns, veth, bridge)"
    if shutil.which("ip") is None:
        return "iproute2 (the ip command) is not installed"
    probe = f"{PREFIX}probe{os.getpid() % 100000}"
    try:
        ip("netns", "add", probe)
    except NetError as e:
        return f"ip netns does not work here: {e}"
    try:
        ip("link", "add", f"{probe}b", "type", "bridge")
        ip("link", "del", f"{probe}b")
    except NetError as e:
        return f"cannot create a bridge: {e}"
    finally:
        ip("netns", "del", probe, check=False)
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing (needed for the netem stand-in)"
    return None


def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (checked on lo inside a throwaway namespace)."""
    probe = f"{PREFIX}nq{os.getpid() % 100000}"
    try:
        ip("netns", "add", probe)
        ip("link", "set", "lo", "up", ns=probe)
        r = subprocess.run(
            ["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True,
            check=False,
        )
        return r.returncode == 0
    except (NetError, FileNotFoundError):
        return False
    finally:
        ip("netns", "del", probe, check=False)


def _used_subnets() -> set[int]:
    used = set()
    for line in ip("-4", "route", "show", "table", "all").splitlines() + ip("-4", "addr").splitlines():
        for word in line.split():
            if word.startswith("10.213."):
                with contextlib.suppress(ValueError, IndexError):
                    used.add(int(word.split(".")[2]))
    return used


@dataclass
class Net:
    """One bridge and one namespace per host; host i gets 10.213.<s>.<i+1>, the bridge .254."""

    run_id: str
    hosts: list[str]
    relay_script: Path
    workdir: Path
    subnet: int = 0
    relays: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    created: list[tuple[str, str]] = field(default_factory=list)  # ("netns"|"link", name), for teardown

    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.run_id}br"

    def ns(self, host: str) -> str:
        return f"{PREFIX}-{self.run_id}-{host}"

    def addr(self, host: str) -> str:
        return f"10.213.{self.subnet}.{self.hosts.index(host) + 1}"

    @property
    def bridge_addr(self) -> str:
        return f"10.213.{self.subnet}.254"

    def _ifname(self, host: str, end: str) -> str:
        return f"{PREFIX}{self.run_id}{self.hosts.index(host)}{end}"

    def up(self, impaired: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Make the namespaces and links; hosts in ``impaired`` are wired through the netem stand-in."""
        free = [s for s in range(16, 250) if s not in _used_subnets()]
        self.subnet = random.choice(free)
        ip("link", "add", self.bridge, "type", "bridge")
        self.created.append(("link", self.bridge))
        ip("addr", "add", f"{self.bridge_addr}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for host in self.hosts:
            ns = self.ns(host)
            ip("netns", "add", ns)
            self.created.append(("netns", ns))
            ip("link", "set", "lo", "up", ns=ns)
            inner, outer = self._ifname(host, "i"), self._ifname(host, "o")
            if host in impaired:
                self._tap_link(host, inner, outer)
            else:
                ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                self.created.append(("link", outer))
                ip("link", "set", inner, "netns", ns)
            ip("link", "set", outer, "master", self.bridge)
            ip("link", "set", outer, "up")
            ip("addr", "add", f"{self.addr(host)}/24", "dev", inner, ns=ns)
            ip("link", "set", inner, "up", ns=ns)

    def _tap_link(self, host: str, inner: str, outer: str) -> None:
        for name in (inner, outer):
            ip("tuntap", "add", "dev", name, "mode", "tap")
            self.created.append(("link", name))
        control = self.workdir / f"netem-{host}.json"
        control.write_text("{}")
        log = (self.workdir / f"netem-{host}.log").open("ab")
        p = subprocess.Popen(
            [sys.executable, str(self.relay_script), "--inner", inner, "--outer", outer, "--control", str(control)],
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
        self.relays[host] = p
        assert p.stdout is not None
        if p.stdout.readline().strip() != b"ready":
            raise NetError(f"netem relay for {host} did not start (see {log.name})")
        ip("link", "set", inner, "netns", self.ns(host))

    def impair(self, host: str, *, delay_ms: float = 0, loss: float = 0, both_ways: bool = False) -> None:
        """Like ``tc qdisc replace dev <host's link> root netem delay D loss P`` (loss 1.0 cuts it off)."""
        p = self.relays.get(host)
        if p is None:
            raise NetError(f"{host} was not wired for impairment (Net.up(impaired=...))")
        import json

        control = self.workdir / f"netem-{host}.json"
        ack = Path(f"{control}.ack")
        cfg = {"delay_ms": delay_ms, "loss": loss, "both_ways": both_ways}
        ack.unlink(missing_ok=True)
        control.write_text(json.dumps(cfg))
        p.send_signal(10)  # SIGUSR1
        deadline = time.monotonic() + 5
        while not (ack.exists() and json.loads(ack.read_text() or "{}") == cfg):
            if time.monotonic() > deadline or p.poll() is not None:
                raise NetError(f"netem relay for {host} did not take {cfg}")
            time.sleep(0.01)

    def link(self, host: str, *, up: bool) -> None:
        """Cut a host off (its bridge port down) or bring it back."""
        ip("link", "set", self._ifname(host, "o"), "up" if up else "down")

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def pids(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns(host)], capture_output=True, text=True, check=False)
        return [int(x) for x in out.stdout.split()]

    def down(self) -> None:
        """Kill what still runs in the namespaces (all started by this bed), then remove every device."""
        for host in self.hosts:
            for pid in self.pids(host):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        for p in self.relays.values():
            if p.poll() is None:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
            if p.poll() is None:
                p.kill()
                p.wait()
        for kind, name in reversed(self.created):
            if kind == "netns":
                ip("netns", "del", name, check=False)
            else:
                ip("link", "del", name, check=False)
        self.created.clear()


def remove_leftovers() -> list[str]:
    """Remove namespaces and links of earlier runs of the bed (names starting with the bed's prefix)."""
    removed = []
    for line in ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(f"{PREFIX}-"):
            out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
            for pid in out.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            ip("netns", "del", name, check=False)
            removed.append(name)
    for line in ip("-o", "link", "show", check=False).splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name.startswith(PREFIX) and not name.startswith(f"{PREFIX}-"):
                ip("link", "del", name, check=False)
                removed.append(name)
    return removed
