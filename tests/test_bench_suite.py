"""The bench suite (``python -m bench``): discovery, the name=value line, the JSON file, the markdown section, plots.

The end-to-end test runs a real bench (bench/replay.py, SQLite only, a few thousand events) through
the suite's command line into a temp directory; the rest are unit tests of the same functions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench._report import BEGIN, END, render_markdown, update_markdown, write_plots
from bench._suite import ROOT, command_for, discover, parse_figures, run_one, select, write_results

HAND_WRITTEN = "# Performance\n\nHow to read this page.\n\n"


def _suite(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_a_real_bench_runs_through_the_suite_into_json_markdown_and_a_plot(tmp_path: Path) -> None:
    docs = tmp_path / "performance.md"
    docs.write_text(f"{HAND_WRITTEN}{BEGIN}\nold figures\n{END}\n\nText after the section.\n")
    out = _suite(
        "all",
        "--quick",
        "--only",
        "replay",
        "--args",
        "replay=--events 3000 --keys 500",
        "--out-dir",
        str(tmp_path / "out"),
        "--docs",
        str(docs),
        "--img-dir",
        str(tmp_path / "img"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    latest = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert [b["name"] for b in latest["benches"]] == ["replay"]
    bench = latest["benches"][0]
    assert bench["status"] == "ok" and bench["returncode"] == 0
    figures = bench["figures"]
    assert figures["replay_events_per_s"] > 0 and figures["baseline_apply_batch_events_per_s"] > 0
    assert bench["final_line"].startswith("replay_events_per_s=")
    assert bench["command"][:2] == ["python", "bench/replay.py"]
    assert latest["quick"] is True and latest["machine"]["cores"] >= 1 and len(latest["load_before"]) == 3
    assert list((tmp_path / "out").glob("results-*.json")), "a timestamped copy beside latest.json"
    text = docs.read_text()
    assert text.startswith(HAND_WRITTEN) and text.endswith(f"{END}\n\nText after the section.\n")
    assert "old figures" not in text
    row = next(line for line in text.splitlines() if line.startswith("| Replay into SQLite |"))
    assert f"{figures['replay_events_per_s']:,.0f}/s" in row, row
    assert "| replay | ok |" in text and "![throughput](img/throughput.png)" in text
    assert (tmp_path / "img" / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "img" / "read_latency.png").exists(), "no read_latency figures, no latency plot"
    # The page again from the result file, nothing run.
    again = tmp_path / "again.md"
    out = _suite("--render", str(tmp_path / "out" / "latest.json"), "--docs", str(again), "--no-plots")
    assert out.returncode == 0, out.stderr
    assert row in again.read_text()


def test_bad_names_are_refused_before_anything_runs(tmp_path: Path) -> None:
    for args in (["nosuch"], ["all", "--only", "replay,nosuch"], ["all", "--args", "nosuch=--x 1"]):
        out = _suite(*args, "--out-dir", str(tmp_path))
        assert out.returncode != 0 and "no such bench: nosuch" in out.stderr, out
    out = _suite("all", "--redis-url", "http://x", "--out-dir", str(tmp_path))
    assert out.returncode != 0 and "--redis-url must look like" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_discovery_skips_helpers_and_locust_input_and_runs_unknown_scripts_with_their_quick(tmp_path: Path) -> None:
    for name in ("_helper.py", "locustfile.py", "replay.py", "idle_latency.py", "notes.txt"):
        (tmp_path / name).write_text("")
    assert discover(tmp_path) == ["replay", "idle_latency"], "known ones in run order, then the others by name"
    assert set(discover()) >= {"read_latency", "write_pipeline", "replay", "locust_run"}
    assert select(["replay", "sizing", "audit"], ["sizing", "replay"]) == ["replay", "sizing"]
    assert select(["replay", "sizing"], ["all"], ["sizing"]) == ["replay"]
    assert select(["locust_run"], ["locust"]) == ["locust_run"]
    with pytest.raises(SystemExit, match="no such bench: x"):
        select(["replay"], ["x"])
    # A script the suite does not know: --quick and --redis-url only when its --help offers them.
    (tmp_path / "idle_latency.py").write_text(
        "import argparse\n"
        "ap = argparse.ArgumentParser()\n"
        "ap.add_argument('--quick', action='store_true')\n"
        "ap.add_argument('--redis-url')\n"
        "a = ap.parse_args()\n"
        "print('warming up')\n"
        "print(f'quick={a.quick} url={a.redis_url} idle_p99_ms=12.5 missing=nan')\n"
    )
    cmd, note = command_for("idle_latency", quick=True, server="redis://127.0.0.1:1/3", bench_dir=tmp_path)
    assert cmd[2:] == ["--quick", "--redis-url", "redis://127.0.0.1:1"] and "not known" in note
    res = run_one("idle_latency", cmd, baseline="", timeout=60, log_dir=tmp_path / "logs", echo=False)
    assert res.status == "ok", res
    assert res.figures == {"quick": True, "url": "redis://127.0.0.1:1", "idle_p99_ms": 12.5, "missing": None}
    assert (tmp_path / "logs" / "idle_latency.stdout.log").read_text().startswith("warming up\n")
    (tmp_path / "plain.py").write_text("import sys\nprint('no figures here')\nsys.exit(3)\n")
    cmd, note = command_for("plain", quick=True, server="redis://h:1", bench_dir=tmp_path)
    assert cmd[2:] == [] and "no --quick" in note
    res = run_one("plain", cmd, baseline="", timeout=60, log_dir=tmp_path / "logs", echo=False)
    assert (res.status, res.returncode, res.figures) == ("no figures", 3, {})


def test_the_name_value_line_is_the_last_non_empty_line() -> None:
    assert parse_figures("progress 1/2\na=1 b=2.5 ok=False t=x\n\n") == {"a": 1.0, "b": 2.5, "ok": False, "t": "x"}
    assert parse_figures("a=1\nthe end\n") is None, "a last line that is not name=value: no figures"
    assert parse_figures("") is None
    assert parse_figures("p=nan q=inf r=n/a") == {"p": None, "q": None, "r": None}


def _doc(figures: dict[str, float | bool | str | None]) -> dict[str, object]:
    bench = {
        "name": "read_latency",
        "command": ["python", "bench/read_latency.py"],
        "baseline": "the naive peer",
        "status": "ok",
        "returncode": 0,
        "seconds": 12.0,
        "load_before": [0.5, 0.4, 0.3],
        "load_after": [0.6, 0.4, 0.3],
        "figures": figures,
        "final_line": " ".join(f"{k}={v}" for k, v in figures.items()),
        "output_tail": [],
        "note": "",
    }
    return {
        "suite": 1,
        "started": "2026-12-01T13:00:00Z",
        "finished": "2026-12-01T13:10:00Z",
        "quick": False,
        "git": {"commit": "abc1234", "dirty": False},
        "machine": {"cpu": "cpu", "cores": 2, "memory_gb": 4.0, "system": "Linux", "python": "3.11"},
        "load_before": [0.5, 0.4, 0.3],
        "load_after": [0.6, 0.4, 0.3],
        "benches": [bench],
    }


def test_markdown_targets_verdicts_and_latency_plot(tmp_path: Path) -> None:
    line = (
        "rate=1000 grpc_p99_ms_at_1000=1.50 bare_p99_ms_at_1000=2.40 grpc_p99_ms_at_2000=7.0 "
        "grpc_p50_ms_at_1000=0.9 grpc_p50_ms_at_2000=1.1 bare_p99_ms_at_2000=9.0 zmq_p99_ms_at_1000=nan "
        "grpc_max_per_s=3600 bare_max_per_s=3000"
    )
    figures = parse_figures(line)
    assert figures is not None
    doc = _doc(figures)
    path = write_results(doc, tmp_path / "out")
    assert json.loads(path.read_text())["benches"][0]["figures"]["zmq_p99_ms_at_1000"] is None
    plots = write_plots(doc, tmp_path / "img")
    assert set(plots) == {"read_latency", "throughput"}
    md = render_markdown(doc, plots, tmp_path)
    rows = {r.split(" | ")[0].lstrip("| "): r for r in md.splitlines() if r.startswith("| ")}
    assert rows["gRPC Get p99 at 1,000/s (open loop)"].endswith("| 1.5 ms | 2.4 ms | 0.62x | ≤ 2 ms | yes |")
    assert rows["gRPC Get p99 at 2,000/s"].endswith("| ≤ 5 ms | **no** |")
    assert "| 1.20x | ≥ 1.2x the baseline | yes |" in rows["gRPC Get, max throughput (closed loop, best of c=16/64)"]
    assert rows["ZeroMQ Get p99 at 1,000/s"].split(" | ")[1] == "not measured"
    assert "![read_latency](img/read_latency.png)" in md and "load average" in md.lower()
    assert "busy with other work" not in md
    doc["load_after"] = [5.0, 3.0, 2.0]
    busy = render_markdown(doc, {}, tmp_path)
    assert "busy with other work during this run (load average up to 5.0 on 2 cores)" in busy


def test_a_file_without_markers_is_left_alone(tmp_path: Path) -> None:
    docs = tmp_path / "performance.md"
    docs.write_text(HAND_WRITTEN)
    with pytest.raises(SystemExit, match="markers"):
        update_markdown(docs, "new")
    assert docs.read_text() == HAND_WRITTEN
    fresh = tmp_path / "sub" / "new.md"
    update_markdown(fresh, "section")
    assert f"{BEGIN}\nsection\n{END}" in fresh.read_text()


def test_a_bench_past_its_timeout_is_interrupted_so_that_it_cleans_up(tmp_path: Path) -> None:
    script = tmp_path / "hangs.py"
    script.write_text(
        "import time\nprint('started', flush=True)\n"
        "try:\n    time.sleep(60)\nfinally:\n    print('stopped its servers')\n"
    )
    res = run_one("hangs", [sys.executable, str(script)], baseline="", timeout=1, log_dir=tmp_path, echo=False)
    assert res.status == "timeout" and res.seconds < 30
    assert res.output_tail[:2] == ["started", "stopped its servers"]
