"""The files an operator installs: alert rules (promtool), systemd units (systemd-analyze), runbook links.

Whether every metric the dashboard and the alerts name is exported is checked against running
processes in tests/test_status.py.
"""

from __future__ import annotations

import getpass
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from services import unavailable

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docs" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "docs" / "grafana" / "mfh.json"
UNITS = ROOT / "docs" / "systemd"
OPERATIONS = ROOT / "docs" / "operations.md"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not found (Debian package {'prometheus' if name == 'promtool' else 'systemd'})")
    return path


def test_alert_rules_pass_promtool() -> None:
    # Given the shipped alert rules  When promtool checks them  Then they pass
    out = subprocess.run([_tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings of a Markdown page."""
    out = set()
    for line in markdown.splitlines():
        if m := re.match(r"^#{1,6} (.+)$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def test_every_alert_links_to_a_runbook_section_that_exists() -> None:
    # Given the alert rules and docs/operations.md
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    anchors = _anchors(OPERATIONS.read_text())
    # Then each rule has a runbook link to a heading of that page
    assert len(rules) >= 10
    for rule in rules:
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == "docs/operations.md" and anchor in anchors, (rule["alert"], url)


def test_dashboard_covers_transports_backlog_replication_and_audits() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in (
        "mfh_api_requests_total",
        "mfh_api_request_seconds_bucket",
        "mfh_dirty_entries",
        "mfh_queue_depth",
        "mfh_dead_letters",
        "mfh_replication_lag_seconds_bucket",
        "mfh_last_audit_ok",
        "mfh_last_snapshot_timestamp_seconds",
    ):
        assert metric in exprs, metric


def _procfile_roles() -> list[str]:
    roles = []
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, command = line.partition(":")
            assert f"mfh {name.strip()} " in command, line
            roles.append(name.strip())
    return roles


def test_a_systemd_unit_for_each_procfile_line_passes_systemd_analyze(tmp_path: Path) -> None:
    # Given the units, made concrete for this checkout (its venv, this user) as an operator would install them
    tool = _tool("systemd-analyze")
    roles = _procfile_roles()
    assert roles == ["api", "worker", "replicator", "scheduler"]
    user = getpass.getuser()
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/opt/mfh/.venv/bin/mfh", str(Path(sys.executable).parent / "mfh"))
        text = text.replace("/opt/mfh", str(ROOT)).replace("User=mfh", f"User={user}").replace("Group=mfh", "")
        (tmp_path / unit.name).write_text(text)
    for role in roles:
        unit = (UNITS / f"mfh-{role}@.service").read_text()
        assert f"ExecStart=/opt/mfh/.venv/bin/mfh {role} --host %i" in unit and "KillMode=mixed" in unit
    target = (UNITS / "mfh@.target").read_text()
    assert all(f"mfh-{role}@%i.service" in target for role in roles)
    # and one for mfh front (Procfile.replicas), which an operator adds to the host's target by enabling it
    front = (UNITS / "mfh-front@.service").read_text()
    assert "ExecStart=/opt/mfh/.venv/bin/mfh front --host %i" in front and "KillMode=mixed" in front
    assert "WantedBy=mfh@%i.target" in front and "PartOf=mfh@%i.target" in front
    assert "mfh-front@" not in target  # optional: the api must move off 5713 first
    # When systemd-analyze verifies an instance of each, and the target
    names = [f"mfh-{role}@main_pc.service" for role in [*roles, "front"]] + ["mfh@main_pc.target"]
    out = subprocess.run([tool, "verify", *names], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    # Then there is nothing to complain about
    assert out.returncode == 0, out.stdout + out.stderr
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if "mfh" in line]
    assert complaints == [], complaints
