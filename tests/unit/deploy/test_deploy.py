"""deploy/ stays deployable: manifests validate against the Kubernetes schemas, overlays render, the
compose file and systemd units only name commands, settings and queues that exist."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.cli import main as cli
from service.core import task_names
from service.core.settings import Settings

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"
CLI_COMMANDS = set(cli.commands)  # type: ignore[attr-defined]
SETTINGS_ENV = {f"CXR_{name.upper()}" for name in Settings.model_fields} | {"CXR_CONFIG"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    """A small kustomize: resources (files or bases), then strategic-merge patches by kind/name."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    out: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        target = directory / res
        out.extend(_kustomize(target) if target.is_dir() else _docs(target))
    for patch in k.get("patches", []):
        for p in _docs(directory / patch["path"]):
            key = (p["kind"], p["metadata"]["name"])
            matches = [r for r in out if (r["kind"], r["metadata"]["name"]) == key]
            assert len(matches) == 1, f"patch {patch['path']} matches {len(matches)} resources"
            _merge(matches[0], p)
    if "namespace" in k:
        for r in out:
            if r["kind"] != "Namespace":
                r["metadata"]["namespace"] = k["namespace"]
    return out


def _merge(base: Any, patch: Any) -> Any:
    for key, value in patch.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        elif key in {"containers", "env"} and isinstance(base.get(key), list):
            by_name = {item["name"]: item for item in base[key]}
            for item in value:
                if item["name"] in by_name:
                    _merge(by_name[item["name"]], item)
                else:
                    base[key].append(copy.deepcopy(item))
        else:
            base[key] = copy.deepcopy(value)
    return base


OVERLAYS = [K8S / "base", *sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())]


@pytest.mark.parametrize("directory", OVERLAYS, ids=lambda p: p.name)
def test_manifests_validate_against_kubernetes_schemas(directory: Path) -> None:
    resources = _kustomize(directory)
    kinds = {r["kind"] for r in resources}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ScaledObject"} <= kinds
    for r in resources:
        if r["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked below
        kubernetes_validate.validate(r, K8S_VERSION, strict=True)


@pytest.mark.parametrize("directory", OVERLAYS, ids=lambda p: p.name)
def test_workloads_run_real_commands_and_queues(directory: Path) -> None:
    resources = _kustomize(directory)
    deployments = {r["metadata"]["name"]: r for r in resources if r["kind"] == "Deployment"}
    for dep in deployments.values():
        for c in dep["spec"]["template"]["spec"]["containers"]:
            assert c["args"][0] in CLI_COMMANDS
            for env in c.get("env", []):
                assert env["name"] in SETTINGS_ENV, env["name"]
                if env["name"] == "CXR_WORKER_QUEUES":
                    assert set(yaml.safe_load(env["value"])) <= set(task_names.TASK_QUEUES.values())
    services = {r["metadata"]["name"]: r for r in resources if r["kind"] == "Service"}
    listener = services["cxr-listener"]
    assert listener["spec"]["ports"][0]["port"] == 11112
    scaled = next(r for r in resources if r["kind"] == "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] in deployments
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == task_names.INFERENCE_QUEUE
    inference = deployments["cxr-worker-inference"]["spec"]["template"]["spec"]["containers"][0]
    gpu = inference["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpu is None) == (directory.name == "cpu-only")


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    services = compose["services"]
    expected = {"listener", "dashboard", "worker-gpu", "worker-cpu", "redis", "postgres", "orthanc"}
    assert expected <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        if svc.get("image", "").startswith("cxr-gateway"):
            assert svc["command"][0] in CLI_COMMANDS
            for key, value in svc.get("environment", {}).items():
                assert key in SETTINGS_ENV, key
                if key == "CXR_WORKER_QUEUES":
                    assert set(yaml.safe_load(value)) <= set(task_names.TASK_QUEUES.values())
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "noeviction" in redis_cmd
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia"


def test_systemd_units_and_dockerfiles() -> None:
    for unit in (DEPLOY / "systemd").glob("*.service"):
        exec_start = re.search(r"^ExecStart=(.+)$", unit.read_text(), re.M)
        assert exec_start is not None
        assert exec_start.group(1).split()[-1] in CLI_COMMANDS
    repo = DEPLOY.parent
    for dockerfile in (DEPLOY / "docker").glob("Dockerfile*"):
        for src in re.findall(r"^COPY (\S+)", dockerfile.read_text(), re.M):
            assert (repo / src).exists(), f"{dockerfile.name}: COPY {src}"


def test_a_worker_that_ended_by_itself_is_restarted_whatever_its_exit_status() -> None:
    """A worker whose broker stayed away past its reconnection attempts exits (non-zero, not marked
    stopped): every way of deploying it must start it again."""
    for name in ("cxr-gateway-worker.service", "cxr-gateway-listener.service"):
        assert re.search(r"^Restart=always$", (DEPLOY / "systemd" / name).read_text(), re.M), name
    services = yaml.safe_load((DEPLOY / "compose.yml").read_text())["services"]
    for name, service in services.items():
        if "worker" in name:
            assert service.get("restart") in {"always", "unless-stopped"}, name
    for path in (K8S / "base").glob("worker-*.yaml"):
        for doc in _docs(path):
            if doc["kind"] == "Deployment":
                # Deployments only allow Always (the default).
                assert doc["spec"]["template"]["spec"].get("restartPolicy", "Always") == "Always"
