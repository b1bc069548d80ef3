"""Offline checks of ``deploy/docker-compose.yml`` (Docker cannot run here): the compose-spec schema, its services
and wiring, Prometheus and Grafana, S3 URLs clients can open, ``/metrics`` for Prometheus only."""

from __future__ import annotations

import json
import re
from urllib.parse import urlparse

import yaml

from tests.deploy_files import (
    DEPLOY,
    by_kind,
    compose,
    compose_validator,
)


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
