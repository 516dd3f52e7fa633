"""The Helm chart, rendered by the real ``helm`` and validated against the strict
Kubernetes schemas by tests/chart_check.py (helm and the schemas are installed by
tests/run.sh, from npm and PyPI; nothing here uses the network).

Every values file in helm/examples/ must render and validate; every file in
helm/tests/ must FAIL, with each of its ``# expect:`` lines in the message.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from skyroute.routing.config import Config, parse_config

from .chart_check import ChartCheckFailed, check_chart, installed_helm

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
BAD_VALUES = sorted((CHART / "tests").glob("*.yaml"))
MONITORING_API = ["monitoring.coreos.com/v1"]


@pytest.fixture(scope="session", autouse=True)
def helm_installed() -> None:
    try:
        installed_helm()
    except ChartCheckFailed as exc:
        pytest.fail(str(exc), pytrace=False)


def _render(*, values: list[Path] | None = None, sets: list[str] | None = None,
            api_versions: list[str] | None = None, namespace: str = "default",
            ) -> list[dict[str, Any]]:
    try:
        checked = check_chart(CHART, values=values or [], sets=sets or [],
                              api_versions=api_versions or [], namespace=namespace)
    except ChartCheckFailed as exc:
        pytest.fail(f"the chart must render and validate:\n{exc}", pytrace=False)
    return checked.objects


def _failure(*, values: list[Path] | None = None, sets: list[str] | None = None,
             api_versions: list[str] | None = None) -> str:
    with pytest.raises(ChartCheckFailed) as failed:
        check_chart(CHART, values=values or [], sets=sets or [],
                    api_versions=api_versions or [])
    return str(failed.value)


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


def test_default_values_render_and_validate() -> None:
    objects = _render()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                            "PodDisruptionBudget", "Service", "Service", "ServiceAccount"])
    assert not [o for o in objects if o["kind"] == "Secret"], "the chart must not hold secrets"


@pytest.mark.parametrize("values", EXAMPLES, ids=lambda p: p.name)
def test_example_values_render_and_validate(values: Path) -> None:
    objects = _render(values=[values], api_versions=MONITORING_API)
    assert _one(objects, "Deployment")


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"region-us.yaml", "region-eu.yaml"} <= names, names
    assert BAD_VALUES, "helm/tests/ must hold values files that have to fail"


@pytest.mark.parametrize("values", BAD_VALUES, ids=lambda p: p.name)
def test_bad_values_fail_with_a_clear_message(values: Path) -> None:
    expected = re.findall(r"^# expect: (.+)$", values.read_text(), flags=re.MULTILINE)
    assert expected, f"{values.name} has no '# expect: <message>' line"
    output = _failure(values=[values], api_versions=MONITORING_API)
    for message in expected:
        assert message.strip() in output, f"{values.name}: {message!r} not in:\n{output}"


def test_service_monitor_without_the_operator_api_fails_clearly() -> None:
    output = _failure(sets=["serviceMonitor.enabled=true"])
    assert "no monitoring.coreos.com/v1 API" in output, output


def test_optional_objects_render_when_enabled() -> None:
    objects = _render(sets=["networkPolicy.enabled=true", "serviceMonitor.enabled=true"],
                      api_versions=MONITORING_API)
    assert _one(objects, "NetworkPolicy")
    assert _one(objects, "ServiceMonitor")["spec"]["endpoints"][0]["path"] == "/metrics"


# --------------------------------------------------------------------- what the pods get


def test_deployment_is_hardened_and_drains() -> None:
    objects = _render()
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
    assert container["args"] == ["run", "--config", "/etc/skyroute/routing.yaml",
                                 "--workers", "1"]

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


def test_routing_config_and_peer_discovery() -> None:
    objects = _render(namespace="llm")
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
    objects = _render(values=[values])
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


def test_regions_peer_with_each_other() -> None:
    us = _render(values=[CHART / "examples" / "region-us.yaml"], api_versions=MONITORING_API)
    eu = _render(values=[CHART / "examples" / "region-eu.yaml"], api_versions=MONITORING_API)

    def sync_url(objects: list[dict[str, Any]]) -> str:
        ingress = _one(objects, "Ingress", "-sync")
        (rule,) = ingress["spec"]["rules"]
        assert [p["path"] for p in rule["http"]["paths"]] == ["/sync"]
        return f"wss://{rule['host']}/sync"

    assert sync_url(us) in _routing(eu)["sync"]["peers"]
    assert sync_url(eu) in _routing(us)["sync"]["peers"]


@pytest.mark.parametrize("values", [None, *EXAMPLES],
                         ids=lambda p: "default" if p is None else p.name)
def test_rendered_routing_is_accepted_by_skyroute(values: Path | None) -> None:
    """The ConfigMap is a routing file skyroute itself loads, with the pod's env."""
    objects = _render(values=[values] if values else [], api_versions=MONITORING_API)
    config, env = _loaded_config(objects)
    assert config.instance_id == env["SKYROUTE_INSTANCE_ID"]
    assert config.upstreams


def test_jobs_get_a_data_claim_and_the_redis_url() -> None:
    """jobs.enabled: a kept PersistentVolumeClaim mounted as the data volume, and a jobs
    section in the routing file with data_dir on it and the shared Redis queue."""
    objects = _render(sets=["jobs.enabled=true", "jobs.redisUrl=redis://redis:6379/0",
                            "jobs.persistence.accessModes={ReadWriteMany}",
                            "jobs.persistence.size=20Gi"])
    claim = _one(objects, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    config, _ = _loaded_config(objects)
    assert config.jobs is not None
    assert config.jobs.data_dir == "/var/lib/skyroute/jobs"
    assert config.jobs.redis is not None and config.jobs.redis.url == "redis://redis:6379/0"


def test_jobs_on_one_pod_need_no_redis() -> None:
    """One pod (no autoscaler) keeps the SQLite queue on a ReadWriteOnce claim."""
    objects = _render(sets=["jobs.enabled=true", "replicaCount=1", "autoscaling.enabled=false",
                            "routing.jobs.max_retries=3"])
    assert _one(objects, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    config, _ = _loaded_config(objects)
    assert config.jobs is not None and config.jobs.redis is None
    assert config.jobs.max_retries == 3
