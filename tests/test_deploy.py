"""Offline checks of ``deploy/``: Docker images cannot be built or run on the test machines, so every file is
checked against its schema instead, and against the farm itself.

- ``docker-compose.yml`` against the compose-spec JSON schema (the copy vendored by ``check-jsonschema``);
- Kubernetes objects against the Kubernetes OpenAPI schemas, strictly (``kubernetes-validate``, which ships them);
- KEDA ``ScaledObject`` and Prometheus Operator ``PodMonitor`` objects against the models generated from their CRDs
  (``cloudcoil-models-keda``, ``cloudcoil-models-prometheus-operator``), with unknown fields refused;
- every ``FARM_*`` variable set anywhere is a field of :class:`farm.config.Settings`;
- every path a Dockerfile copies exists; both images run as a non-root user; no weights in an image;
- the KEDA triggers name exactly the Redis lists of their model's work: its lanes (``tasks.queues``) and its
  realtime frames (``farm.realtime.lane``);
- what every API replica must share (each setting that is otherwise made per host under the data dir) is set;
- only Prometheus reads ``/metrics`` (``FARM_METRICS_TOKEN`` on both sides); clients get S3 URLs they can open
  (``FARM_S3_PUBLIC_ENDPOINT``); a ``farm bulk worker`` runs ``POST /bulk`` jobs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from farm.config import Settings
from farm.realtime.lane import lane_key
from models.registry import get_model
from tasks.queues import model_queues

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


def test_compose_matches_the_compose_spec() -> None:
    validator = compose_validator()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)


def test_compose_services_are_wired_as_the_readme_says() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on {dep}, which is not a service"
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis, redis
    assert services["migrate"]["command"] == ["db", "upgrade"] and services["migrate"]["restart"] == "no"
    assert "mc mb" in services["minio-init"]["command"][0]
    for name in ("api", "worker-cpu", "worker-gpu0", "worker-gpu1"):
        conditions = {k: v["condition"] for k, v in services[name]["depends_on"].items()}
        assert conditions["migrate"] == "service_completed_successfully", (name, conditions)
        assert conditions["minio-init"] == "service_completed_successfully", (name, conditions)
    assert "${FARM_FLOWER_PASSWORD:?" in services["flower"]["environment"]["FARM_FLOWER_PASSWORD"], (
        "Flower must refuse to start without a password")
    assert "--no-auth" not in services["flower"]["command"]
    # one worker per GPU, each with its own device; a CPU profile with the tiny model
    gpu_workers = [s for s in services.values() if "gpu" in s.get("profiles", [])]
    devices = [s["deploy"]["resources"]["reservations"]["devices"] for s in gpu_workers]
    assert len(gpu_workers) >= 2 and all(len(d) == 1 and d[0]["capabilities"] == ["gpu"] for d in devices)
    ids = [d[0]["device_ids"] for d in devices]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids), f"one GPU each: {ids}"
    cpu = services["worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["command"][:2] == ["--model", "farm/tiny-lcm"], cpu
    assert "cpu" in cpu["build"]["args"]["TORCH_INDEX_URL"]
    for s in gpu_workers:
        assert any(v.endswith(":/models:ro") for v in s["volumes"]), "weights are mounted read-only at /models"


def test_compose_prometheus_and_grafana_see_the_farm() -> None:
    services = compose()["services"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
               for job in config["scrape_configs"]}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])
    assert targets["farm-api"] == ["api:8000"]  # GET /metrics on the API's own port
    workers = {n for n, s in services.items() if s.get("image", "").startswith("lcm-farm-worker")}
    assert set(targets["farm-worker"]) == {f"{n}:9808" for n in workers}  # FARM_METRICS_PORT's default
    for target in (t for ts in targets.values() for t in ts):
        assert target.split(":")[0] in services, f"{target} is not a Compose service"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"] if v.startswith("./")}
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "farm.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert (DEPLOY / mounts[path]).resolve() == (DEPLOY / "grafana" / "dashboards").resolve(), mounts
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    dashboards = list((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    for dashboard in dashboards:  # farm.json comes with the metrics (issue 12, item 2)
        assert json.loads(dashboard.read_text())["panels"], dashboard


def test_clients_get_s3_urls_they_can_open() -> None:
    """Presigned URLs name FARM_S3_PUBLIC_ENDPOINT, not the in-network http://minio:9000: Compose publishes MinIO's
    S3 port (on loopback) at the address that setting names; Kubernetes names an address of its own."""
    services = compose()["services"]
    env = services["api"]["environment"]
    assert urlparse(env["FARM_S3_ENDPOINT"]).hostname == "minio"
    public = re.fullmatch(r"\$\{FARM_S3_PUBLIC_ENDPOINT:-(.+)\}", env["FARM_S3_PUBLIC_ENDPOINT"])
    assert public, env["FARM_S3_PUBLIC_ENDPOINT"]
    url = urlparse(public.group(1))
    assert url.hostname in ("localhost", "127.0.0.1") and url.port, url
    published = {p.rsplit(":", 2)[-2]: p.rsplit(":", 2)[-1] for p in services["minio"]["ports"]}
    assert published.get(str(url.port)) == str(urlparse(env["FARM_S3_ENDPOINT"]).port), (
        f"MinIO's S3 port is not published at {url.port}: {services['minio']['ports']}")
    assert all(p.startswith("127.0.0.1:") for p in services["minio"]["ports"]), "MinIO is published on loopback only"
    config = next(c for c in by_kind("ConfigMap") if c["metadata"]["name"] == "farm-config")["data"]
    k8s_public = urlparse(config["FARM_S3_PUBLIC_ENDPOINT"])
    assert k8s_public.scheme == "https" and k8s_public.hostname != urlparse(config["FARM_S3_ENDPOINT"]).hostname


def test_only_prometheus_reads_the_farms_metrics() -> None:
    """The metrics name owners: every farm process has FARM_METRICS_TOKEN (Compose refuses to start without one) and
    every scrape of a farm process sends it, from a Compose secret of that same variable."""
    data = compose()
    services = data["services"]
    farm = {"api"} | {n for n, s in services.items() if s.get("image", "").startswith("lcm-farm-worker")}
    for name in farm:
        assert "${FARM_METRICS_TOKEN:?" in services[name]["environment"].get("FARM_METRICS_TOKEN", ""), name
    secrets = {name: secret for name, secret in data.get("secrets", {}).items()
               if secret.get("environment") == "FARM_METRICS_TOKEN"}
    mounted = {f"/run/secrets/{s}" for s in services["prometheus"].get("secrets", []) if s in secrets}
    assert mounted, "Prometheus gets no secret holding FARM_METRICS_TOKEN"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    scraped = set()
    for job in config["scrape_configs"]:
        hosts = {t.split(":")[0] for sc in job["static_configs"] for t in sc["targets"]}
        if not hosts & farm:
            continue
        assert hosts <= farm, f"{job['job_name']} mixes farm and other targets: {hosts}"
        auth = job.get("authorization", {})
        assert auth.get("type", "Bearer") == "Bearer" and auth.get("credentials_file") in mounted, (
            f"{job['job_name']} does not send FARM_METRICS_TOKEN: {auth}")
        scraped |= hosts
    assert scraped == farm, f"farm processes no job scrapes: {sorted(farm - scraped)}"


# --- Kubernetes


def crd_problem(model: Any, doc: dict[str, Any]) -> str | None:
    """What is wrong with ``doc`` as the CRD-generated pydantic ``model`` sees it: a field of the wrong type or
    missing, or (pydantic drops unknown fields silently) one the CRD does not know; None if nothing."""
    from pydantic import ValidationError

    try:
        back = model.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
    except ValidationError as exc:
        return str(exc)
    if back == doc:
        return None
    return f"not as its CRD describes it: {sorted(_diff(doc, back))}"


def _diff(a: Any, b: Any, path: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a.keys() | b.keys():
            yield from _diff(a.get(k), b.get(k), f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _diff(x, y, f"{path}[{i}]")
    elif a != b:
        yield path


def test_kubernetes_objects_match_their_schemas() -> None:
    import kubernetes_validate
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor

    crds: dict[str, Any] = {"ScaledObject": ScaledObject, "PodMonitor": PodMonitor}
    errors = []
    kinds = set()
    for path, doc in all_k8s_docs():
        kinds.add(doc["kind"])
        where = f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in crds:
            problem = crd_problem(crds[doc["kind"]], doc)
            if problem:
                errors.append(f"{where}: {problem}")
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {exc.message} at {'/'.join(map(str, exc.path))}")
    assert not errors, "\n".join(errors)
    assert {"Deployment", "Service", "Job", "PodDisruptionBudget", "ScaledObject", "PodMonitor"} <= kinds


def test_the_crd_check_refuses_an_unknown_field() -> None:
    """The round trip of the test above catches a misspelt field (pydantic alone would drop it)."""
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    doc = by_kind("ScaledObject")[0]
    assert crd_problem(ScaledObject, doc) is None
    misspelt = json.loads(json.dumps(doc))
    misspelt["spec"]["pollingIntervall"] = misspelt["spec"].pop("pollingInterval")
    assert "pollingIntervall" in str(crd_problem(ScaledObject, misspelt))
    wrong_type = json.loads(json.dumps(doc))
    wrong_type["spec"]["minReplicaCount"] = "one"
    assert "minReplicaCount" in str(crd_problem(ScaledObject, wrong_type))


def test_the_kubernetes_and_compose_checks_refuse_mistakes() -> None:
    import kubernetes_validate

    (api,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "farm-api"]
    bad = json.loads(json.dumps(api))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 30  # not a field of a PodSpec
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    wrong = compose()
    wrong["services"]["api"]["restart_policy"] = "always"  # not a service field (restart is)
    assert list(compose_validator().iter_errors(wrong))


def _worker_model(deployment: dict[str, Any]) -> str:
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return str(args[args.index("--model") + 1])


def test_worker_pools_scale_on_all_their_lanes() -> None:
    workers = [d for d in by_kind("Deployment") if d["metadata"]["name"].startswith("farm-worker-")]
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in by_kind("ScaledObject")}
    pdbs = [p["spec"]["selector"]["matchLabels"] for p in by_kind("PodDisruptionBudget")]
    config = next(c for c in by_kind("ConfigMap") if c["metadata"]["name"] == "farm-config")
    broker_url = urlparse(config["data"]["FARM_BROKER_URL"])
    broker = (broker_url.netloc, broker_url.path.strip("/") or "0")
    assert {_worker_model(d) for d in workers} == {"stabilityai/stable-diffusion-xl-base-1.0",
                                                   "runwayml/stable-diffusion-v1-5"}
    for d in workers:
        name, pod = d["metadata"]["name"], d["spec"]["template"]["spec"]
        key = get_model(_worker_model(d)).key
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1, name
        assert pod["terminationGracePeriodSeconds"] >= 120, f"{name}: the grace period must cover a batch"
        assert any(m["mountPath"] == "/models" and m.get("readOnly") for m in container["volumeMounts"]), name
        so = scaled.pop(name, None)
        assert so is not None, f"no ScaledObject for {name}"
        assert "replicas" not in d["spec"], f"{name}: KEDA owns replicas; an apply that sets it resets the pool"
        lists = [t["metadata"]["listName"] for t in so["spec"]["triggers"] if t["type"] == "redis"]
        # the names come from the code that makes them: the four Celery lanes, and the Redis list that the
        # API pushes websocket frames to and workers pop them from (farm.realtime.lane)
        expected = [*model_queues(key), lane_key(key)]
        assert sorted(lists) == sorted(expected) and len(lists) == len(set(lists)), (
            f"{name} scales on {lists}, not on the lists its work waits in {expected}")
        for t in so["spec"]["triggers"]:  # the broker's Redis and database, where those lists are
            assert (t["metadata"]["address"], t["metadata"]["databaseIndex"]) == broker, (name, t["name"])
        formula = so["spec"]["advanced"]["scalingModifiers"]["formula"]
        assert set(re.findall(r"\w+", formula)) == {t["name"] for t in so["spec"]["triggers"]}, formula
        labels = d["spec"]["selector"]["matchLabels"]
        assert any(p.items() <= labels.items() for p in pdbs), f"no PodDisruptionBudget covers {name}"
    assert not scaled, f"ScaledObjects without a worker Deployment: {sorted(scaled)}"


def test_api_has_probes_a_service_and_one_webhook_key() -> None:
    (api,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "farm-api"]
    container = api["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    key_mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "webhook-key")
    assert env["FARM_WEBHOOK_KEY_PATH"].startswith(key_mount + "/"), "every replica must sign with the same key"
    services = [s for s in by_kind("Service") if s["metadata"]["name"] == "farm-api"]
    assert services and services[0]["spec"]["selector"].items() <= api["spec"]["selector"]["matchLabels"].items()
    (job,) = [j for j in by_kind("Job") if j["metadata"]["name"] == "farm-db-upgrade"]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]
    config = next(c for c in by_kind("ConfigMap") if c["metadata"]["name"] == "farm-config")
    assert config["data"]["FARM_BROKER_URL"].startswith("redis://redis.")
    redis = next(s for s in by_kind("StatefulSet") if s["metadata"]["name"] == "redis")
    args = " ".join(redis["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args


def test_every_pod_monitor_sends_the_token_its_pods_check() -> None:
    """Each PodMonitor endpoint sends, as a bearer token, the very Secret key its pods read FARM_METRICS_TOKEN from;
    and every farm pod that serves metrics is scraped."""
    monitors = by_kind("PodMonitor")
    deployments = by_kind("Deployment")
    scraped = set()
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        pods = [d for d in deployments if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"PodMonitor/{monitor['metadata']['name']} selects no Deployment"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            auth = endpoint.get("authorization", {})
            assert auth.get("type") == "Bearer", f"PodMonitor/{monitor['metadata']['name']}: no bearer token"
            ref = (auth["credentials"]["name"], auth["credentials"]["key"])
            for d in pods:
                container = d["spec"]["template"]["spec"]["containers"][0]
                assert endpoint["port"] in {p["name"] for p in container["ports"]}, (d["metadata"]["name"], endpoint)
                sources = {(e["secretRef"]["name"], "FARM_METRICS_TOKEN") for e in container.get("envFrom", [])
                           if "secretRef" in e and "FARM_METRICS_TOKEN" in _secret_keys()[e["secretRef"]["name"]]}
                assert ref in sources, f"{d['metadata']['name']} reads FARM_METRICS_TOKEN from {sources}, not {ref}"
                scraped.add(d["metadata"]["name"])
    serving = {d["metadata"]["name"] for d in deployments if d["spec"]["template"]["spec"]["containers"][0]["args"][0]
               == "api" or d["metadata"]["name"].startswith("farm-worker-")}
    assert serving <= scraped, f"not scraped: {sorted(serving - scraped)}"


def test_the_mounted_webhook_key_is_private_and_the_farm_does_not_warn_about_it(tmp_path: Path) -> None:
    """The Secret is mounted 0400; kubelet makes it 0440 for the pod's fsGroup, the group the farm runs as. The
    farm warns about a key others can read, not about that one."""
    import os

    from farm.webhooks.signing import readable_by_others

    (api,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "farm-api"]
    pod = api["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "webhook-key"]
    assert volume["secret"]["defaultMode"] == 0o400, oct(volume["secret"]["defaultMode"])
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    key = tmp_path / "webhook_ed25519.pem"
    key.write_text("k")
    for mode, warns in ((0o400, False), (0o440, False), (0o600, False), (0o444, True), (0o604, True)):
        key.chmod(mode)
        assert readable_by_others(key) is warns, oct(mode)
    groups = {os.getgid(), os.getegid(), *os.getgroups()}
    foreign = next((g for g in range(1, 65534) if g not in groups), None)
    if foreign is not None and os.geteuid() == 0:  # only root may give a file a group it is not in
        os.chown(key, -1, foreign)
        key.chmod(0o440)
        assert readable_by_others(key), "a group the farm is not in can read it"


def test_kustomization_loads_the_dashboard_grafana_loads() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["options"]["labels"] == {"grafana_dashboard": "1"}
    assert generator["files"] == ["grafana/dashboards/farm.json"]


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment as Kubernetes makes it: its ConfigMaps' and Secrets' keys, then its env."""
    sources = {(d["kind"], d["metadata"]["name"]): {**d.get("data", {}), **d.get("stringData", {})}
               for d in by_kind("ConfigMap") + by_kind("Secret")}
    env: dict[str, str] = {}
    for e in container.get("envFrom", []):
        kind, ref = ("ConfigMap", e["configMapRef"]) if "configMapRef" in e else ("Secret", e["secretRef"])
        env.update(sources[(kind, ref["name"])])
    env.update({e["name"]: e.get("value", "<from a reference>") for e in container.get("env", [])})
    return env


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
        env = _container_env(container)
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


def _secret_keys() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {})) for d in by_kind("Secret")}


def test_api_replicas_share_every_per_host_secret() -> None:
    """Every API Deployment of more than one replica (and the Compose API) sets each setting that would otherwise
    be made per host under data_dir, from a Secret (the webhook key: a file of a mounted Secret)."""
    needed = {f"FARM_{name.upper()}" for name in _made_under_data_dir()}
    secrets = _secret_keys()
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
