"""deploy/: the container file (parsed with Docker's own parser, from the PyPI
``dockerfile`` package, since Docker does not run here), the Prometheus config and
alerting rules (checked and unit-tested with ``promtool``), and the Grafana dashboard.

The metrics the rules and the dashboard may use are read from a running skyroute's
``/metrics``, never from a list kept by hand.
"""

from __future__ import annotations

import glob
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import dockerfile
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .conftest import CALL_TIMEOUT_S, client_for, eventually, routing_yaml, upstream_yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"

#: Metrics a panel may query before skyroute exports them; such a panel says "Stays empty
#: until" in its description. Take a name out when skyroute exports it (the dashboard
#: test fails until then). Empty since the response cache (issue 15).
NOT_YET_EXPORTED: set[str] = set()

#: Series Prometheus itself adds for every scrape target.
PROMETHEUS_SERIES = {"up"}

#: The series names each metric type puts on /metrics, from its family name.
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}

PROMQL_WORDS = {
    # aggregations, functions, keywords
    "sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk",
    "quantile", "count_values", "by", "without", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "bool", "offset", "inf", "nan",
    "rate", "irate", "increase", "delta", "idelta", "histogram_quantile", "abs", "clamp_min",
    "clamp_max", "time", "vector", "scalar", "label_values", "label_replace", "absent",
    "max_over_time", "min_over_time", "avg_over_time", "sum_over_time", "round", "sort_desc",
}


# --------------------------------------------------------------------- container file


def _stages() -> list[list[Any]]:
    stages: list[list[Any]] = []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            stages.append([])
        assert stages, f"{command.original!r} comes before the first FROM"
        stages[-1].append(command)
    return stages


def test_dockerfile_is_multi_stage_on_slim_python() -> None:
    stages = _stages()
    assert len(stages) >= 2, "build and runtime stages"
    for stage in stages:
        assert stage[0].value[0] == "python:3.11-slim", stage[0].original


def test_dockerfile_copies_only_paths_that_exist() -> None:
    copies = [c for stage in _stages() for c in stage if c.cmd in ("COPY", "ADD")]
    assert copies
    for command in copies:
        if any(flag.startswith("--from") for flag in command.flags):
            continue
        *sources, _dest = command.value
        for source in sources:
            assert not re.match(r"^[a-z]+://", source), f"remote source in {command.original}"
            matches = glob.glob(str(REPO / source))
            assert matches, (f"{DOCKERFILE.name}:{command.start_line}: {source!r} does not "
                             f"exist in the repository (build context = repo root)")


def test_dockerfile_final_stage_runs_skyroute_as_non_root() -> None:
    final = _stages()[-1]
    users = [c for c in final if c.cmd == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].value[0].split(":")[0]
    assert user.isdigit() and int(user) > 0, f"USER {user} must be a numeric non-root uid"
    (entrypoint,) = [c for c in final if c.cmd == "ENTRYPOINT"]
    assert entrypoint.json and list(entrypoint.value) == ["skyroute"]
    (cmd,) = [c for c in final if c.cmd == "CMD"]
    assert cmd.json and list(cmd.value) == ["run", "--config", "/etc/skyroute/routing.yaml"]
    assert not [c for c in final if c.cmd in ("RUN",) and "pip" in c.value[0]], \
        "no installing in the runtime stage: it only copies the built venv"


def test_dockerfile_installs_with_the_readme_command() -> None:
    runs = [c.value[0] for stage in _stages() for c in stage if c.cmd == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    # The image carries the cloud identity libraries (provider: azure | vertex | bedrock).
    assert installs == ["pip install '.[clouds]'"], installs
    readme = REPO / "README.md"
    assert readme.is_file(), "README.md is missing (the image copies it and pyproject needs it)"
    assert "pip install 'skyroute[clouds]'" in readme.read_text(encoding="utf-8"), \
        "the README must name the extra the image installs: skyroute[clouds]"
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"uvloop' in pyproject, "uvloop must be a package dependency (the image relies on it)"


# --------------------------------------------------------------------- what skyroute exports


@pytest.fixture
async def exported_metrics(standin, skyroute) -> set[str]:
    """Every series name a real skyroute puts on /metrics, all its optional parts on.

    ``sync`` registers the state sync metrics, ``latency.prometheus`` the latency source
    gauge, and one served request the labelled request series.
    """
    up = await standin("us-east")
    # Any HTTP server stands in for the latency Prometheus: its 404s make
    # skyroute_prometheus_source_up 0, and the gauge is registered all the same.
    extra = (f"sync:\n  token: deploy-files-test\n"
             f"latency:\n  prometheus:\n    url: http://127.0.0.1:{up.port}\n"
             f"    interval: 100ms\n    timeout: 1s\n")
    server = await skyroute(routing_yaml([upstream_yaml(up)], extra=extra))
    async with client_for(server) as client:
        await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}])
    text = ""
    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:

        async def latency_source_reported() -> bool:
            nonlocal text
            async with http.get(f"{server.url}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            return "skyroute_prometheus_source_up " in text

        await eventually(latency_source_reported, timeout=30)
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        # A labelled family nothing has counted yet has its # TYPE line but no series.
        names |= {family.name + suffix for suffix in SERIES_SUFFIXES[family.type]}
        names |= {sample.name for sample in family.samples}
    assert {"skyroute_requests_total", "skyroute_sync_lag_seconds_bucket",
            "skyroute_prometheus_source_up"} <= names, sorted(names)
    return names


# --------------------------------------------------------------------- Prometheus


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's prometheus package "
                    "(tests/run.sh does)", pytrace=False)
    return path


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([promtool, *args], cwd=DEPLOY, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_prometheus_config_is_valid(promtool: str) -> None:
    _promtool(promtool, "check", "config", "prometheus.yml")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"skyroute", "upstream"} <= jobs
    assert "alerts.yml" in config["rule_files"]


def test_alert_rules_are_valid_and_cover_the_runbook(promtool: str,
                                                     exported_metrics: set[str]) -> None:
    _promtool(promtool, "check", "rules", "alerts.yml")
    rules = {r["alert"]: r for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    assert rules["SkyrouteRegionSlow"]["for"] == "5m"
    for name in ("SkyrouteRouteAllUpstreamsDown", "SkyrouteSyncPeersDisconnected",
                 "SkyrouteRetryBudgetExhausted", "SkyrouteDegraded"):
        assert name in rules
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
        unknown = _metric_names(rule["expr"]) - exported_metrics - PROMETHEUS_SERIES
        assert not unknown, f"{name} uses series skyroute does not export: {unknown}"


def test_alert_rules_unit_tests_pass(promtool: str) -> None:
    proc = _promtool(promtool, "test", "rules", "alerts.test.yml")
    assert "SUCCESS" in proc.stdout
    tested = set(re.findall(r"alertname: (\w+)",
                            (DEPLOY / "alerts.test.yml").read_text()))
    assert len(tested) >= 2, tested
    # A quantile over the wrong series type matches nothing and never fires: each rule
    # over a histogram is tested with bucket series.
    over_buckets = {r["alert"] for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())
                    ["groups"] for r in g["rules"] if "_bucket" in r["expr"]}
    assert over_buckets <= tested, f"no promtool test for {over_buckets - tested}"


# --------------------------------------------------------------------- Grafana


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana variables allowed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\$\{?\w+\}?", "", text)  # $route, ${var}, $__rate_interval
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        rest = text[match.end():].lstrip()
        if word.lower() in PROMQL_WORDS or rest.startswith("("):
            continue
        if re.fullmatch(r"\d+[smhdwy]", word) or word in ("e",):
            continue
        names.add(word)
    return names


def _dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana-dashboard.json").read_text(encoding="utf-8"))


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return [p for p in panels if p["type"] != "row"]


def test_dashboard_panels_use_only_skyroute_metrics(exported_metrics: set[str]) -> None:
    """Every panel and variable queries series a running skyroute exports.

    The only exception, NOT_YET_EXPORTED, is used only by panels that say so.
    """
    exported_now = NOT_YET_EXPORTED & exported_metrics
    assert not exported_now, f"skyroute exports {exported_now} now: remove from NOT_YET_EXPORTED"
    dashboard = _dashboard()
    panels = _panels(dashboard)
    assert len(panels) >= 7
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = _metric_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            unknown = names - exported_metrics - NOT_YET_EXPORTED
            assert not unknown, f"{panel['title']}: skyroute exports no {unknown}"
            if names & NOT_YET_EXPORTED:
                assert "Stays empty until" in panel["description"], \
                    f"{panel['title']}: say in its description why it is empty"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["definition"])
            assert match, f"variable {variable['name']}: {variable['definition']!r}"
            assert match.group(1) in exported_metrics, variable["definition"]


def test_dashboard_covers_what_operators_watch() -> None:
    exprs = " ".join(t["expr"] for p in _panels(_dashboard()) for t in p["targets"])
    for metric in ("skyroute_requests_total", "skyroute_upstream_ttfb_seconds_bucket",
                   "skyroute_routing_share", "skyroute_failovers_total",
                   "skyroute_cache_requests_total", "skyroute_sync_lag_seconds_bucket",
                   "skyroute_degradation_level"):
        assert metric in exprs, metric
    assert "by (region, le)" in exprs, "latency per region"


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, parses as PromQL."""
    rules = []
    for i, panel in enumerate(_panels(_dashboard())):
        for target in panel["targets"]:
            expr = (target["expr"].replace("$__rate_interval", "1m")
                    .replace("$__interval", "1m").replace("$route", ".*")
                    .replace("$region", ".*"))
            rules.append({"record": f"dashboard:panel{i}:{target['refId']}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
