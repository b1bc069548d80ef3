"""What the deploy tests read: ``deploy/``'s Compose file and Kubernetes objects as data (no docker or kustomize
binary here), and the farm's settings."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from farm.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise to work on (policy/v1, batch/v1 ttl …)
SETTINGS = {f"FARM_{name.upper()}" for name in Settings.model_fields}
FARM_VAR = re.compile(r"\bFARM_[A-Z0-9_]+")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


def kustomize_docs(folder: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The objects of a kustomization's resources (no kustomize binary here: its files are read one by one)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        path = folder / resource
        assert path.is_file(), f"{folder / 'kustomization.yaml'} lists {resource}, which does not exist"
        for doc in load_all(path):
            yield path, doc


def all_k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = list(kustomize_docs(DEPLOY)) + list(kustomize_docs(DEPLOY / "k8s" / "backing"))
    docs += [(DEPLOY / "k8s" / "secrets.example.yaml", d) for d in load_all(DEPLOY / "k8s" / "secrets.example.yaml")]
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in all_k8s_docs() if doc["kind"] == kind]


# --- Compose


def compose_validator() -> Any:
    """The compose-spec schema (the copy vendored by check-jsonschema), with the draft it declares."""
    schema = json.loads(resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
                        .read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment as Kubernetes makes it: its ConfigMaps' and Secrets' keys, then its env."""
    sources = {(d["kind"], d["metadata"]["name"]): {**d.get("data", {}), **d.get("stringData", {})}
               for d in by_kind("ConfigMap") + by_kind("Secret")}
    env: dict[str, str] = {}
    for e in container.get("envFrom", []):
        kind, ref = ("ConfigMap", e["configMapRef"]) if "configMapRef" in e else ("Secret", e["secretRef"])
        env.update(sources[(kind, ref["name"])])
    env.update({e["name"]: e.get("value", "<from a reference>") for e in container.get("env", [])})
    return env


def secret_keys() -> dict[str, set[str]]:
    """The keys each Secret of the manifests holds."""
    return {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {})) for d in by_kind("Secret")}
