"""Offline checks of ``deploy/``'s Kubernetes objects: the Kubernetes OpenAPI schemas (``kubernetes-validate``),
KEDA and Prometheus Operator CRD models with unknown fields refused, worker scaling on every lane's Redis list,
probes, PodMonitor tokens, the webhook key's mode, the dashboard ConfigMap."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from farm.queues import model_queues
from farm.realtime.lane import lane_key
from models.registry import get_model
from tests.deploy_files import (
    DEPLOY,
    K8S_VERSION,
    ROOT,
    all_k8s_docs,
    by_kind,
    compose,
    compose_validator,
    secret_keys,
)


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
                           if "secretRef" in e and "FARM_METRICS_TOKEN" in secret_keys()[e["secretRef"]["name"]]}
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
