"""deploy/k8s: every manifest is valid against the Kubernetes OpenAPI schemas, and the
pieces refer to each other correctly.

* Core kinds: ``kubernetes-validate`` (its schemas ship inside the package; no network) in
  strict mode, so an unknown or misspelt field fails, for the oldest and the newest
  Kubernetes we support.
* CRDs (ServiceMonitor, KEDA's ScaledObject and TriggerAuthentication): the cloudcoil
  models generated from those projects' CRD schemas. They ignore unknown fields, so the
  test also requires that a round trip keeps every field given (the strict check).
* Cross references: selectors match pod labels, the ServiceMonitor finds the Service's
  port, KEDA scales the worker Deployment, ConfigMaps exist, the ConfigMap's
  ``datasync.toml`` loads with datasync's own settings loader, and every container's
  arguments parse as a datasync command.
"""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pydantic
import pytest
import typer
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

from datasync.cli import app
from datasync.config import load_settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# Pod scheduling gates are GA from 1.30 (the docs suggest them); the newest the package has.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
CRD_MODELS: dict[tuple[str, str], type[pydantic.BaseModel]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
    ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TriggerAuthentication,
}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


DOCS = _documents()


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def _one(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in _by_kind(kind) if d["metadata"]["name"] == name]
    return doc


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for label, doc in DOCS:
        if doc["kind"] in {"Deployment", "Job"}:
            out.append((label, doc["spec"]["template"]))
    return out


def test_every_expected_piece_is_there() -> None:
    kinds = sorted({doc["kind"] for _, doc in DOCS})
    assert kinds == [
        "ConfigMap", "Deployment", "Job", "ScaledObject", "Service", "ServiceAccount",
        "ServiceMonitor", "TriggerAuthentication",
    ]  # fmt: skip


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("label", "doc"), DOCS, ids=[label for label, _ in DOCS])
def test_manifest_is_valid(label: str, doc: dict[str, Any], version: str) -> None:
    model = CRD_MODELS.get((doc["apiVersion"], doc["kind"]))
    if model is None:
        kubernetes_validate.validate(doc, version, strict=True)
        return
    parsed = model.model_validate(doc)
    # Unknown fields are dropped silently by the models: a round trip must keep them all.
    assert parsed.model_dump(mode="json", by_alias=True, exclude_unset=True) == doc


def test_validators_refuse_broken_manifests() -> None:
    """The checks above can fail: a misspelt field, a wrong type, a missing field."""
    deployment = _one("Deployment", "datasync-worker")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)
    monitor = yaml.safe_load(yaml.safe_dump(_one("ServiceMonitor", "datasync")))
    monitor["spec"]["endpoints"][0]["port"] = 8750
    with pytest.raises(pydantic.ValidationError):
        ServiceMonitor.model_validate(monitor)
    monitor["spec"]["endpoints"][0] = {"port": "http", "intervall": "30s"}
    dumped = ServiceMonitor.model_validate(monitor).model_dump(
        mode="json", by_alias=True, exclude_unset=True
    )
    assert dumped != monitor
    scaled = yaml.safe_load(yaml.safe_dump(_one("ScaledObject", "datasync-worker")))
    del scaled["spec"]["scaleTargetRef"]
    with pytest.raises(pydantic.ValidationError):
        ScaledObject.model_validate(scaled)


def test_selectors_and_references_agree() -> None:
    for deployment in _by_kind("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), deployment["metadata"]["name"]
    service = _one("Service", "datasync")
    server = _one("Deployment", "datasync-server")
    assert (
        service["spec"]["selector"].items()
        <= server["spec"]["template"]["metadata"]["labels"].items()
    )
    container_ports = {
        p["name"] for p in server["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    monitor = _one("ServiceMonitor", "datasync")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]
    }
    scaled = _one("ScaledObject", "datasync-worker")
    assert _one("Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    for trigger in scaled["spec"]["triggers"]:
        assert _one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    configmaps = {doc["metadata"]["name"] for doc in _by_kind("ConfigMap")}
    accounts = {doc["metadata"]["name"] for doc in _by_kind("ServiceAccount")}
    for label, template in _pod_templates():
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, label
        if "serviceAccountName" in template["spec"]:
            assert template["spec"]["serviceAccountName"] in accounts, label
        containers = template["spec"].get("initContainers", []) + template["spec"]["containers"]
        volumes = {v["name"] for v in template["spec"].get("volumes", [])}
        for container in containers:
            assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes, label


def test_kustomization_lists_the_deployment() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # training-job.yaml is an example for users' namespaces, not part of the service.
    assert listed == on_disk - {"training-job.yaml"}


def test_configmap_is_a_valid_datasync_config(tmp_path: Path) -> None:
    toml = _one("ConfigMap", "datasync-config")["data"]["datasync.toml"]
    path = tmp_path / "datasync.toml"
    path.write_text(toml)
    tomllib.loads(toml)
    settings = load_settings(
        env={"DATASYNC_CONFIG": str(path), "DATASYNC_HOME": str(tmp_path / "home")}
    )
    assert sorted(settings.sites) == ["aws", "gaggle", "gcp"]


def _datasync_argv(container: dict[str, Any]) -> list[str]:
    """The datasync arguments a container runs: its args, or the `datasync ...` command
    inside its shell script."""
    if container.get("command", [None])[0] != "/bin/sh":
        return list(container["args"])
    words = shlex.split(container["args"][0])
    start = words.index("datasync") + 1
    end = next((i for i in range(start, len(words)) if words[i] in {">", "&&", "|"}), len(words))
    return words[start:end]


def test_containers_run_valid_datasync_commands() -> None:
    root = typer.main.get_command(app)
    checked = 0
    for label, template in _pod_templates():
        containers = template["spec"].get("initContainers", []) + template["spec"]["containers"]
        for container in containers:
            if "datasync" not in container["image"]:
                continue
            argv = _datasync_argv(container)
            command = root.commands.get(argv[0])  # type: ignore[attr-defined]
            assert command is not None, f"{label}: no datasync command {argv[0]!r}"
            # Parsing only: an unknown option or a bad value raises a usage error.
            command.make_context(argv[0], argv[1:])
            checked += 1
    assert checked == 3  # the server, the workers and the training Job's initContainer
