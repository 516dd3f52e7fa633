"""tests/chart_check.py's schema check, on hand-written manifests: the chart tests are only
as strict as it is, so what it must reject is pinned here (no helm needed)."""

from __future__ import annotations

import textwrap

import pytest

from .chart_check import ChartCheckFailed, KubernetesSchemas, validate_manifest


@pytest.fixture(scope="module")
def schemas() -> KubernetesSchemas:
    return KubernetesSchemas.load("1.29.0")


def _problems(manifest: str, schemas: KubernetesSchemas) -> str:
    with pytest.raises(ChartCheckFailed) as failed:
        validate_manifest(textwrap.dedent(manifest), schemas)
    return str(failed.value)


def test_validate_manifest_accepts_a_valid_object_and_skips_custom_resources(
        schemas: KubernetesSchemas) -> None:
    """Built-in kinds are validated; a custom resource is passed over and listed as such."""
    checked = validate_manifest(textwrap.dedent("""\
        ---
        # Source: demo/templates/cm.yaml
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: routing, annotations: {built: 2024-01-01}}
        data: {routing.yaml: "listen: 0.0.0.0:8080"}
        ---
        # Source: demo/templates/sm.yaml
        apiVersion: monitoring.coreos.com/v1
        kind: ServiceMonitor
        metadata: {name: skyroute}
        spec: {anything: goes}
        """), schemas)
    assert [o["kind"] for o in checked.objects] == ["ConfigMap", "ServiceMonitor"]
    assert checked.skipped == [
        "demo/templates/sm.yaml: ServiceMonitor/skyroute "
        "(monitoring.coreos.com/v1: custom resource, no schema)"]
    assert checked.kube_version == "1.29"


def test_validate_manifest_lists_every_problem_of_every_object(
        schemas: KubernetesSchemas) -> None:
    """Unknown fields, wrong types, an API the version does not serve, a missing name and a
    duplicate object are all reported together, each with its template."""
    message = _problems("""\
        ---
        # Source: demo/templates/deployment.yaml
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web, labelz: {}}
        spec:
          replicas: "3"
          selector: {matchLabels: {app: web}}
          template:
            metadata: {labels: {app: web}}
            spec:
              containers: [{name: web, image: web, ports: [{containerPort: http}]}]
        ---
        # Source: demo/templates/pdb.yaml
        apiVersion: policy/v1beta1
        kind: PodDisruptionBudget
        metadata: {name: web}
        ---
        # Source: demo/templates/svc.yaml
        apiVersion: v1
        kind: Service
        metadata: {}
        ---
        # Source: demo/templates/again.yaml
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        spec: {selector: {}, template: {}}
        """, schemas)
    for expected in [
        "6 problem(s)",
        "demo/templates/deployment.yaml: Deployment/web: metadata: Additional properties are "
        "not allowed ('labelz' was unexpected)",
        "Deployment/web: spec.replicas: '3' is not of type 'integer'",
        "Deployment/web: spec.template.spec.containers.0.ports.0.containerPort: 'http' is not "
        "of type 'integer'",
        "demo/templates/pdb.yaml: PodDisruptionBudget/web: policy/v1beta1 PodDisruptionBudget "
        "is not served by Kubernetes 1.29",
        "demo/templates/svc.yaml: Service/<no name>: metadata.name: required",
        "demo/templates/again.yaml: Deployment/web: the same kind, namespace and name as an "
        "object from demo/templates/deployment.yaml",
    ]:
        assert expected in message, f"{expected!r} not in:\n{message}"


def test_validate_manifest_rejects_duplicate_keys(schemas: KubernetesSchemas) -> None:
    """A key given twice is an error, as in kubectl's strict decoding, not a silent last-wins."""
    message = _problems("""\
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: a}
        data: {k: one, k: two}
        """, schemas)
    assert "duplicate key 'k'" in message, message


def test_validate_manifest_rejects_an_empty_manifest(schemas: KubernetesSchemas) -> None:
    """A chart that renders nothing is a failure, not a pass."""
    assert "holds no objects" in _problems("---\n# Source: demo/templates/none.yaml\n", schemas)


def test_KubernetesSchemas_refuses_a_version_older_than_the_bundled_ones() -> None:
    """Asking for schemas that were never bundled says which versions there are."""
    with pytest.raises(ChartCheckFailed, match=r"no schemas for Kubernetes 1\.10\.0 \(has 1\.25"):
        KubernetesSchemas.load("1.10.0")
