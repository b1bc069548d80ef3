"""Offline checks of ``deploy/``: Docker images cannot be built or run on the test machines, so every file is
checked against its schema instead, and against the farm itself.

- ``docker-compose.yml`` against the compose-spec JSON schema (the copy vendored by ``check-jsonschema``);
- Kubernetes objects against the Kubernetes OpenAPI schemas, strictly (``kubernetes-validate``, which ships them);
- KEDA ``ScaledObject`` and Prometheus Operator ``PodMonitor`` objects against the models generated from their CRDs
  (``cloudcoil-models-keda``, ``cloudcoil-models-prometheus-operator``), with unknown fields refused;
- every ``FARM_*`` variable set anywhere is a field of :class:`farm.config.Settings`;
- every path a Dockerfile copies exists; both images run as a non-root user; no weights in an image;
- the KEDA triggers name exactly the Redis lists of their model's work: its lanes (``farm.queues``) and its
  realtime frames (``farm.realtime.lane``);
- what every API replica must share (each setting that is otherwise made per host under the data dir) is set;
- only Prometheus reads ``/metrics`` (``FARM_METRICS_TOKEN`` on both sides, never ``FARM_METRICS_OPEN``); clients
  get S3 URLs they can open (``FARM_S3_PUBLIC_ENDPOINT``); a ``farm bulk worker`` runs ``POST /bulk`` jobs.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from farm.config import Settings
from tests.deploy_files import (
    DEPLOY,
    FARM_VAR,
    ROOT,
    SETTINGS,
    all_k8s_docs,
    by_kind,
    compose,
    container_env,
    secret_keys,
)


def _bulk_root(env: dict[str, str]) -> str:
    return env.get("FARM_BULK_ROOT") or f"{env.get('FARM_DATA_DIR', '/var/lib/farm')}/bulk"


def test_a_bulk_worker_runs_post_bulk_jobs() -> None:
    """POST /bulk only records a job and sends farm.bulk: a `farm bulk worker` must run, see the manifests the API
    writes under FARM_BULK_ROOT, and write datasets to FARM_BULK_S3_URL (in the farm's bucket)."""
    # Compose
    services = compose()["services"]
    bulk = [n for n, s in services.items() if s.get("command", [])[:2] == ["bulk", "worker"]]
    assert len(bulk) == 1, f"one `farm bulk worker` service, not {bulk}"
    worker, api = services[bulk[0]], services["api"]
    assert worker["image"].startswith("lcm-farm-api:") and "profiles" not in worker, "always on, no torch needed"
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for service in (worker, api):
        assert urlparse(service["environment"]["FARM_BULK_S3_URL"]).netloc == \
            urlparse(service["environment"]["FARM_STORAGE_URL"]).netloc, "datasets go to the bucket minio-init made"

    def bulk_volume(service: dict[str, Any]) -> str:
        root = _bulk_root(service["environment"])
        mounts = [v.split(":") for v in service.get("volumes", [])]
        return next(src for src, dst, *_ in mounts if root == dst or root.startswith(dst.rstrip("/") + "/"))

    assert bulk_volume(worker) == bulk_volume(api) and not bulk_volume(api).startswith("."), "one named volume"
    # Kubernetes
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    bulk = [n for n, d in deployments.items() if d["spec"]["template"]["spec"]["containers"][0]["args"][:2]
            == ["bulk", "worker"]]
    assert len(bulk) == 1, f"one `farm bulk worker` Deployment, not {bulk}"
    claims = []
    for name in (bulk[0], "farm-api"):
        pod = deployments[name]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = container_env(container)
        assert env.get("FARM_BULK_S3_URL", "").startswith("s3://"), f"{name}: FARM_BULK_S3_URL is not set"
        assert urlparse(env["FARM_BULK_S3_URL"]).netloc == urlparse(env["FARM_STORAGE_URL"]).netloc
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == _bulk_root(env))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        claims.append(volume["persistentVolumeClaim"]["claimName"])
    assert claims[0] == claims[1], f"the API and the bulk worker must share the bulk root's volume: {claims}"
    (pvc,) = [p for p in by_kind("PersistentVolumeClaim") if p["metadata"]["name"] == claims[0]]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "mounted by pods on several nodes"


# --- what every file sets


def _farm_vars() -> dict[str, set[str]]:
    """Every FARM_* variable set, with where: Compose environments, Dockerfile ENV, Kubernetes env/ConfigMap/Secret."""
    found: dict[str, set[str]] = {}

    def add(names: Any, where: str) -> None:
        for name in names:
            if str(name).startswith("FARM_"):
                found.setdefault(str(name), set()).add(where)

    for name, service in compose()["services"].items():
        add(service.get("environment", {}), f"compose {name}")
    for dockerfile in DEPLOY.glob("*.Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("ENV "):
                add(re.findall(r"(FARM_[A-Z0-9_]+)=", line), dockerfile.name)
    for path, doc in all_k8s_docs():
        where = f"{path.name} {doc['kind']}/{doc['metadata']['name']}"
        add(doc.get("data", {}), where)
        add(doc.get("stringData", {}), where)
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            add([e["name"] for e in container.get("env", [])], where)
    for text_file in (DEPLOY / "farm.env.example", DEPLOY / "docker-compose.yml"):
        add(FARM_VAR.findall(text_file.read_text()), text_file.name)  # interpolated ${FARM_…} too
    return found


def test_every_farm_variable_is_a_setting() -> None:
    found = _farm_vars()
    assert {"FARM_BROKER_URL", "FARM_DATABASE_URL", "FARM_STORAGE_URL", "FARM_WEBHOOK_KEY_PATH"} <= set(found)
    unknown = {name: sorted(where) for name, where in found.items() if name not in SETTINGS}
    assert not unknown, f"FARM_* variables that farm/config.py does not know: {unknown}"


def test_no_deployment_opens_the_metrics() -> None:
    """Issue 20, finding 11: the metrics name owners and are closed without FARM_METRICS_TOKEN; no deployment opens
    them (FARM_METRICS_OPEN), so a token left out fails closed (401), and every farm process has one."""
    found = _farm_vars()
    assert "FARM_METRICS_OPEN" not in found, found.get("FARM_METRICS_OPEN")
    assert "FARM_METRICS_TOKEN" in found


# --- what every API replica must share


def _made_under_data_dir() -> dict[str, Any]:
    """The settings that, unset, make a secret of their own under the process's data dir, with the function that
    makes it (each API replica would make a different one)."""
    from farm.api.uploads import signing_key as upload_key
    from farm.realtime.tokens import _secret as token_secret
    from farm.webhooks.signing import signing_key as webhook_key

    return {"upload_signing_key": upload_key, "realtime_token_secret": token_secret, "webhook_key_path": webhook_key}


def test_the_per_host_secrets_are_known(tmp_path: Path) -> None:
    """The list above is config.py's: every setting whose default is made under data_dir is in it, and each one
    unset makes a file there and set makes none."""
    from farm.webhooks.signing import forget_keys

    made = _made_under_data_dir()
    described = {name for name, field in Settings.model_fields.items()
                 if "under data_dir" in (field.description or "")}
    assert described == set(made), f"settings made per host under data_dir: {sorted(described)}"
    try:
        for name, make in made.items():
            unset = Settings(data_dir=tmp_path / name / "unset", **{n: None for n in made})
            make(unset)
            assert list(unset.data_dir.iterdir()), f"{name} unset made nothing under the data dir"
            value: Any = tmp_path / name / "elsewhere.pem" if name == "webhook_key_path" else "s" * 64
            given = Settings(data_dir=tmp_path / name / "set", **{**{n: None for n in made}, name: value})
            make(given)
            assert not given.data_dir.exists(), f"{name} set, still something under the data dir"
    finally:
        forget_keys()


def test_api_replicas_share_every_per_host_secret() -> None:
    """Every API Deployment of more than one replica (and the Compose API) sets each setting that would otherwise
    be made per host under data_dir, from a Secret (the webhook key: a file of a mounted Secret)."""
    needed = {f"FARM_{name.upper()}" for name in _made_under_data_dir()}
    secrets = secret_keys()
    apis = [d for d in by_kind("Deployment") if d["spec"]["template"]["spec"]["containers"][0]["args"][0] == "api"]
    assert [d["metadata"]["name"] for d in apis] == ["farm-api"]
    for api in apis:
        if api["spec"].get("replicas", 1) <= 1:
            continue
        pod = api["spec"]["template"]["spec"]
        container = pod["containers"][0]
        from_secrets = {k for e in container.get("envFrom", []) if "secretRef" in e
                        for k in secrets.get(e["secretRef"]["name"], set())}
        from_secrets |= {e["name"] for e in container.get("env", [])
                         if "secretKeyRef" in e.get("valueFrom", {})}
        paths = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v}
        secret_mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in secret_volumes]
        for name in sorted(needed):
            if name.endswith("_PATH"):
                assert any(paths.get(name, "").startswith(m + "/") for m in secret_mounts), (
                    f"{api['metadata']['name']}: {name} must name a file of a mounted Secret")
            else:
                assert name in from_secrets, f"{api['metadata']['name']} ({api['spec']['replicas']} replicas) " \
                                             f"does not set {name} from a Secret: each replica would make its own"
    env = compose()["services"]["api"]["environment"]
    for name in sorted(needed):
        assert name in env, f"Compose's api does not set {name}"
        if not name.endswith("_PATH"):
            assert f"${{{name}:?" in env[name], f"Compose's api must refuse to start without {name}"
            assert re.search(rf"^{name}=", (DEPLOY / "farm.env.example").read_text(), re.M), name


# --- Dockerfiles


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.mark.parametrize("name", ["api.Dockerfile", "worker.Dockerfile"])
def test_dockerfile_copies_what_exists_and_runs_unprivileged(name: str) -> None:
    dockerfile = DEPLOY / name
    instructions = _instructions(dockerfile)
    contexts = {s.get("build", {}).get("dockerfile"): s["build"]["context"]
                for s in compose()["services"].values() if "build" in s}
    context = (DEPLOY / contexts[f"deploy/{name}"]).resolve()
    assert context == ROOT, f"Compose builds {name} from {context}"
    copied = []
    for op, args in instructions:
        if op in ("COPY", "ADD"):
            parts = [p for p in args.split() if not p.startswith("--")]
            if "--from=" in args:
                continue  # from a build stage
            for source in parts[:-1]:
                assert (context / source).exists(), f"{name}: COPY {source}: no such path in the build context"
                copied.append(context / source)
    assert copied, f"{name} copies nothing"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for needed in (project["readme"], *project["license-files"]):  # the build reads them
        assert context / needed in copied, f"{name} must COPY {needed}: pyproject.toml names it"
    weights = [p for c in copied if c.is_dir() for p in c.rglob("*")
               if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".gguf")]
    assert not weights, f"{name} would bake weights into the image: {weights[:3]}"
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name} must end as a non-root user"
    if name == "api.Dockerfile":
        runs = " ".join(args for op, args in instructions if op == "RUN")
        assert "pip install --constraint constraints.txt . " in runs and "[" not in runs, "the base install only"
        assert '! /opt/farm/bin/python -c "import torch"' in runs, "the build must prove torch is absent"
    else:
        body = dockerfile.read_text()
        assert "torch==2.13.0" in body and "'.[worker]'" in body
        default_index = re.search(r"ARG TORCH_INDEX_URL=(\S+)", body)
        assert default_index and "/cu12" in default_index.group(1), "the worker's default torch is a CUDA 12 build"
