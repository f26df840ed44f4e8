"""The bench suite: discover the scripts in bench/, run each as a subprocess, keep its last line.

Every bench script ends its output with one line of ``name=value`` figures; the suite runs the
scripts one after another (never two at once: they would measure each other), parses that line,
and writes a JSON result file, PNG plots and the generated section of docs/performance.md
(bench/_report.py). It knows the arguments of the scripts it ships with (a full run and a
``--quick`` smoke run, and which Redis database each may use); a script it does not know runs with
its defaults, with ``--quick`` when its ``--help`` lists that option, and with ``--redis-url``
(the Redis server URL as given) when it lists that one.

    python -m bench all                  # every bench, full length (10-15 min); updates docs/
    python -m bench all --quick          # a smoke run (about 2 min); results under var/bench/ only
    python -m bench replay sizing        # some of them (or: all --only replay,sizing)
    python -m bench --list               # what would run, and each one's baseline
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
NOT_BENCHES = {"locustfile"}  # Locust's input, run by locust_run.py
ALIASES = {"locust": "locust_run"}

Figure = float | bool | str | None


@dataclass(frozen=True)
class Spec:
    """How the suite runs one script it knows."""

    full: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    redis_option: str | None = None  # the script's option for the Redis URL
    redis_db: int | None = None  # appended to the server URL; None: the server URL itself
    baseline: str = ""  # what the script measures beside MFH in the same run ("" = nothing)


# Order is the order of the run. Redis databases as the scripts' own defaults, except sizing,
# which flushes its database: 11, so that it never empties what another script reads.
KNOWN: dict[str, Spec] = {
    "read_latency": Spec(
        full=("--rates", "500,1000,1500,2000", "--duration", "5", "--rounds", "2", "--closed-loop", "16,64"),
        quick=("--rates", "500,1000", "--duration", "1", "--closed-loop", "16", "--closed-loop-seconds", "1"),
        redis_option="--redis-url",
        redis_db=15,
        baseline="the naive peer: a grpc.aio server doing one redis.asyncio GET per call",
    ),
    "write_pipeline": Spec(
        quick=("--writes", "1000", "--single-writes", "200", "--rounds", "1"),
        redis_option="--redis-url",
        redis_db=12,
        baseline="the same pipeline with one Dramatiq message per write",
    ),
    "replication_lag": Spec(quick=("--seconds", "3"), redis_option="--redis-url", redis_db=None),
    "replay": Spec(
        quick=("--events", "10000", "--keys", "2000"),
        baseline="the same events applied from memory (SqlStore.apply_batch, no reading)",
    ),
    "audit": Spec(
        full=("--events", "200000", "--keys", "50000"),
        quick=("--events", "20000", "--keys", "5000"),
        baseline="the full audit of the same store",
    ),
    "fairness": Spec(
        quick=("--duration", "1", "--watches", "50"),
        redis_option="--redis-url",
        redis_db=15,
        baseline="the same well-behaved clients without the flood",
    ),
    "sizing": Spec(quick=("--records", "1000"), redis_option="--redis", redis_db=11),
    "locust_run": Spec(
        quick=("--run-time", "3", "--users", "10"),
        redis_option="--redis-url",
        redis_db=15,
        baseline="the naive peer under the same Locust run",
    ),
}


@dataclass
class Result:
    """One script's run, as it goes into the JSON file."""

    name: str
    command: list[str]
    baseline: str
    status: str = "not run"  # ok | exit N (figures, non-zero exit: often a target missed) | no figures | timeout
    returncode: int | None = None
    seconds: float = 0.0
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    figures: dict[str, Figure] = field(default_factory=dict)
    final_line: str = ""
    output_tail: list[str] = field(default_factory=list)
    note: str = ""


# -- discovery -----------------------------------------------------------------------------------------


def discover(bench_dir: Path = BENCH_DIR) -> list[str]:
    """Bench script names in run order: the known ones first, then any other ``*.py`` by name.

    Helpers (``_*.py``), ``__main__`` and Locust's input are not benches.
    """
    found = {p.stem for p in bench_dir.glob("*.py") if not p.name.startswith("_") and p.stem not in NOT_BENCHES}
    return [n for n in KNOWN if n in found] + sorted(found - set(KNOWN))


def select(available: Sequence[str], wanted: Sequence[str], skip: Sequence[str] = ()) -> list[str]:
    """The benches to run, in run order; an unknown name is an error (nothing runs)."""
    names = [ALIASES.get(n, n) for n in wanted]
    skipped = [ALIASES.get(n, n) for n in skip]
    unknown = sorted({n for n in [*names, *skipped] if n != "all" and n not in available})
    if unknown:
        raise SystemExit(f"bench: no such bench: {', '.join(unknown)} (there are: {', '.join(available)})")
    chosen = list(available) if not names or "all" in names else [n for n in available if n in names]
    return [n for n in chosen if n not in skipped]


# -- the name=value line -------------------------------------------------------------------------------

_PAIR = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)=(\S*)")


def parse_value(text: str) -> Figure:
    """``"12.5"`` -> 12.5, ``"3"`` -> 3.0, ``"True"`` -> True, ``"nan"``/``"n/a"`` -> None, else the text."""
    if text in ("True", "False"):
        return text == "True"
    if text.lower() in ("nan", "n/a", "none", ""):
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else None


def parse_figures(output: str) -> dict[str, Figure] | None:
    """The figures of a bench's output: its last non-empty line, if every token there is ``name=value``."""
    for line in reversed(output.splitlines()):
        tokens = line.split()
        if not tokens:
            continue
        pairs = [_PAIR.fullmatch(t) for t in tokens]
        if not all(pairs):
            return None
        return {m.group(1): parse_value(m.group(2)) for m in pairs if m is not None}
    return None


# -- running -------------------------------------------------------------------------------------------


def redis_url(server: str, db: int | None) -> str:
    """``redis://host:port`` (any path dropped) with ``/db`` appended when a database is given."""
    m = re.fullmatch(r"(rediss?://[^/?#]+)(/\d*)?", server.rstrip("/"))
    if m is None:
        raise SystemExit(f"bench: --redis-url must look like redis://host:port, not {server!r}")
    return m.group(1) if db is None else f"{m.group(1)}/{db}"


def _help_text(script: Path) -> str:
    try:
        out = subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, check=False
        )
    except subprocess.TimeoutExpired:
        return ""
    return out.stdout + out.stderr


def command_for(
    name: str, *, quick: bool, server: str, bench_dir: Path = BENCH_DIR, args: Sequence[str] | None = None
) -> tuple[list[str], str]:
    """The command line for one bench and a note on how it was chosen (``args``: instead of the suite's)."""
    script = bench_dir / f"{name}.py"
    cmd = [sys.executable, str(script)]
    spec = KNOWN.get(name)
    if args is not None:
        cmd += list(args)
        if spec is not None and spec.redis_option:
            cmd += [spec.redis_option, redis_url(server, spec.redis_db)]
        return cmd, "arguments from --args"
    if spec is not None:
        cmd += list(spec.quick if quick else spec.full)
        if spec.redis_option:
            cmd += [spec.redis_option, redis_url(server, spec.redis_db)]
        return cmd, ""
    help_text = _help_text(script)
    note = "not known to the suite: its defaults"
    if quick:
        if "--quick" in help_text:
            cmd.append("--quick")
        else:
            note += " (it has no --quick: a full-length run)"
    if "--redis-url" in help_text:
        cmd += ["--redis-url", redis_url(server, None)]
    return cmd, note


def run_one(name: str, cmd: list[str], *, baseline: str, timeout: float, log_dir: Path, echo: bool) -> Result:
    """Run one bench (its output echoed live), keep its last ``name=value`` line."""
    res = Result(name=name, command=cmd, baseline=baseline, load_before=list(os.getloadavg()))
    log_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    t0 = time.monotonic()
    with open(log_dir / f"{name}.stderr.log", "w") as err:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1, start_new_session=True
        )
        assert proc.stdout is not None
        expired = threading.Event()

        def stop() -> None:  # the deadline passed: SIGINT first, so that the bench's finally blocks stop its servers
            expired.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
                if proc.poll() is None:
                    time.sleep(30)
                    os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout, stop)
        watchdog.daemon = True
        watchdog.start()
        try:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if echo:
                    print(f"[{name}] {line}", end="", flush=True)
            proc.wait()
        finally:
            watchdog.cancel()
        if expired.is_set():
            res.status = "timeout"
    res.seconds = round(time.monotonic() - t0, 1)
    res.returncode = proc.returncode
    res.load_after = list(os.getloadavg())
    (log_dir / f"{name}.stdout.log").write_text("\n".join(lines) + "\n")
    res.output_tail = lines[-15:]
    figures = parse_figures("\n".join(lines))
    if figures is not None:
        res.figures = figures
        res.final_line = next(line for line in reversed(lines) if line.strip())
    if res.status != "timeout":
        res.status = "no figures" if figures is None else ("ok" if proc.returncode == 0 else f"exit {proc.returncode}")
    if res.status != "ok":
        tail = (log_dir / f"{name}.stderr.log").read_text().splitlines()[-10:]
        res.output_tail += ["-- stderr --", *tail]
    return res


# -- the result file -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on (no host name, no paths)."""
    cpu = ""
    mem_gb = None
    try:
        cpu = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in ln
            ),
            "",
        )
        kb = next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        mem_gb = round(int(kb) / 1024 / 1024, 1)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "."))}


def write_results(doc: dict[str, Any], out_dir: Path) -> Path:
    """``results-<UTC timestamp>.json`` and a copy as ``latest.json``; the path of the first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = doc["started"].replace("-", "").replace(":", "").split(".")[0]
    path = out_dir / f"results-{stamp}.json"
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    shutil.copyfile(path, out_dir / "latest.json")
    return path


# -- the command ---------------------------------------------------------------------------------------


def _shown(path: Path) -> str:
    """A path relative to the repository root when it is inside it."""
    return os.path.relpath(path, ROOT) if path.resolve().is_relative_to(ROOT) else str(path)


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def _bench_args(value: str) -> tuple[str, list[str]]:
    name, sep, rest = value.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=ARGS, e.g. 'replay=--events 2000', not {value!r}")
    return ALIASES.get(name.strip(), name.strip()), shlex.split(rest)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Run from the repository root with the venv's python.",
    )
    ap.add_argument("benches", nargs="*", default=["all"], help="'all' (the default) or bench names")
    ap.add_argument("--only", type=_names, default=[], metavar="A,B", help="run only these (with 'all')")
    ap.add_argument("--skip", type=_names, default=[], metavar="A,B", help="leave these out")
    ap.add_argument(
        "--args",
        type=_bench_args,
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="run bench NAME with ARGS instead of the suite's arguments (its Redis URL is still added); repeatable",
    )
    ap.add_argument("--quick", action="store_true", help="a short smoke run of each (figures mean little)")
    ap.add_argument("--list", action="store_true", help="list the benches and their baselines, run nothing")
    ap.add_argument(
        "--redis-url",
        default=os.environ.get("MFH_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
        help="the Redis server the benches use (their databases 11-15 are theirs to flush; "
        "default $MFH_TEST_REDIS_URL or redis://127.0.0.1:6379)",
    )
    ap.add_argument("--out-dir", type=Path, default=ROOT / "var" / "bench", help="JSON results and logs")
    ap.add_argument(
        "--docs",
        type=Path,
        help="the markdown file whose generated section is rewritten (default: docs/performance.md for a full "
        "run of every bench; OUT_DIR/performance.md for --quick or a subset)",
    )
    ap.add_argument("--img-dir", type=Path, help="where the PNG plots go (default: docs/img, or OUT_DIR/img)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS.json",
        help="run nothing: write the markdown section and plots (default docs/) from a result file",
    )
    ap.add_argument("--timeout", type=float, help="seconds per bench before it is stopped (default 1800; quick 300)")
    ap.add_argument("--quiet", action="store_true", help="do not echo each bench's output")
    return ap.parse_args(argv)


def _render(results: Path, docs: Path, img_dir: Path | None, no_plots: bool) -> int:
    from bench._report import render_markdown, update_markdown, write_plots

    doc = json.loads(results.read_text())
    plots = {} if no_plots else write_plots(doc, img_dir or ROOT / "docs" / "img")
    update_markdown(docs, render_markdown(doc, plots, docs.parent))
    print(f"markdown: {_shown(docs)} from {_shown(results)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from bench._report import render_markdown, update_markdown, write_plots

    args = parse_args(argv)
    available = discover()
    wanted = args.only or args.benches  # `all --only a,b`: just a and b
    if args.only and any(n != "all" for n in args.benches):
        raise SystemExit("bench: name the benches or use --only with 'all', not both")
    names = select(available, wanted, args.skip)
    overrides = dict(args.args)
    select(available, list(overrides))  # an --args for a bench that does not exist is an error too
    server = redis_url(args.redis_url, None)  # a bad URL stops here, before anything runs
    if args.render is not None:  # the page and plots again from a result file, nothing run
        return _render(args.render, args.docs or ROOT / "docs" / "performance.md", args.img_dir, args.no_plots)
    if args.list:
        for n in available:
            spec = KNOWN.get(n)
            base = spec.baseline if spec else "(not known to the suite)"
            print(f"{n:16s} {'*' if n in names else ' '} baseline: {base or 'none in the same run'}")
        return 0
    publish = not args.quick and names == available and not overrides
    docs = args.docs or (ROOT / "docs" / "performance.md" if publish else args.out_dir / "performance.md")
    img_dir = args.img_dir or (ROOT / "docs" / "img" if publish else args.out_dir / "img")
    timeout = args.timeout or (300.0 if args.quick else 1800.0)
    started = dt.datetime.now(dt.UTC)
    doc: dict[str, Any] = {
        "suite": 1,
        "started": started.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "quick": args.quick,
        "git": git_commit(),
        "machine": machine(),
        "load_before": list(os.getloadavg()),
        "benches": [],
    }
    log_dir = args.out_dir / "logs"
    results: list[Result] = []
    for n in names:
        cmd, note = command_for(n, quick=args.quick, server=server, args=overrides.get(n))
        spec = KNOWN.get(n)
        shown = ["python", *(_shown(Path(c)) if c.startswith(str(ROOT)) else c for c in cmd[1:])]
        print(f"== {n}: {' '.join(shown)}", flush=True)
        res = run_one(
            n, cmd, baseline=spec.baseline if spec else "", timeout=timeout, log_dir=log_dir, echo=not args.quiet
        )
        res.note = note
        res.command = shown
        results.append(res)
        print(f"== {n}: {res.status} in {res.seconds:.0f} s (exit {res.returncode})", flush=True)
    doc["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    doc["load_after"] = list(os.getloadavg())
    doc["benches"] = [asdict(r) for r in results]
    path = write_results(doc, args.out_dir)
    print(f"results: {_shown(path)} (and latest.json)")
    plots: dict[str, Path] = {} if args.no_plots else write_plots(doc, img_dir)
    for p in plots.values():
        print(f"plot: {_shown(p)}")
    update_markdown(docs, render_markdown(doc, plots, docs.parent))
    print(f"markdown: {_shown(docs)}")
    failed = [r.name for r in results if r.status != "ok"]
    if failed:
        print(f"bench: not ok: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
