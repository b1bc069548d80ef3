"""README blocks run as written, by bash in a fresh environment, against this suite's private servers.

Every fenced block of the README has a marker comment above it (``<!-- test_readme: NAME -->``)
and is either run by a test here (``RUN``) or exempt with its reason (``EXEMPT``);
``test_every_readme_block_is_run_or_exempt`` keeps a new block from going untested. Only what
must differ on a test machine is replaced: hosts and ports (the private servers, a free port),
keys (a fresh one) and CA files (the suite's). ``pip install`` runs with ``--no-index``:
everything it names is installed already, so it checks that and downloads nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
from PIL import Image

from tests.api_stack import ApiStack
from tests.services import free_port
from tests.test_stack import _ledger, builtin_dir, stack  # noqa: F401  (fixtures)
from tests.workers import FARM, clean_env, run_farm

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
SD15 = "runwayml/stable-diffusion-v1-5"

# block → the test that runs it
RUN = {
    "quick-start": "test_quick_start_demo_then_using_it_and_usage",  # `make test` runs this very suite
    "using-it": "test_quick_start_demo_then_using_it_and_usage",
    "usage-cli": "test_quick_start_demo_then_using_it_and_usage",
    "try-it-on-one-machine": "test_try_it_on_one_machine",
    "celery-generate": "test_client_blocks_against_a_live_api",
    "fal-client-env": "test_client_blocks_against_a_live_api",
    "fal-client-subscribe": "test_client_blocks_against_a_live_api",
    "curl": "test_client_blocks_against_a_live_api",
    "realtime-fal-client": "test_client_blocks_against_a_live_api",
    "realtime-farm-client": "test_client_blocks_against_a_live_api",
    "farm-client": "test_client_blocks_against_a_live_api",
    "bulk-worked-example": "test_bulk_worked_example_then_the_training_script_reads_it",
    "bulk-training-read": "test_bulk_worked_example_then_the_training_script_reads_it",
    "celery-bulk": "test_celery_bulk_task_block",
    "pools-one-host-cpu": "test_two_workers_on_one_host_from_the_readme_pool_example",
}
# block → why no test runs it
EXEMPT = {
    "architecture": "a diagram, not a command",
    "real-servers": "GPU workers with SDXL and SD1.5 weights on real servers",
    "pools-across-hosts": "GPU workers on several hosts",
    "flower": "Flower in the foreground (tests/test_flower.py runs `farm flower` against a live farm)",
    "docker-compose": "Docker Compose: no Docker engine on the test machines (tests/test_deploy.py checks the files)",
    "kubernetes": "Docker and Kubernetes: neither on the test machines (tests/test_deploy.py checks the files)",
    "usage-http-reply": "an example reply of GET /usage, not a command",
    "api-start": "`farm api` in the foreground with your certificate; the try-it block runs both lines "
                 "(trustme's certificate, the API in the background)",
    "js-clients": "JavaScript under Node or in a browser (tests/test_js_clients.py runs these calls)",
    "bulk-dataset-listing": "a listing of the result, not a command (the bulk worked-example test checks it)",
    "development": "`make lint` and `make test` run this suite itself",
    "image-inputs": "placeholder URLs and data (tests/test_image_to_image.py makes these calls with real images: "
                    "fal_client, farm.client and send_task)",
    "image-inputs-cli": "placeholder files (tests/test_image_to_image.py runs farm generate --image/--mask)",
    "bulk-image-column": "placeholder photos (tests/test_bulk_images.py runs such a manifest through farm bulk run)",
    "realtime-image-to-image": "a placeholder sketch file (tests/test_realtime_images.py sends image_bytes "
                               "with fal_client.realtime)",
}


def readme_block(name: str, lang: str = "sh") -> str:
    pattern = rf"<!-- test_readme: {re.escape(name)} -->\n```{lang}\n(.*?)\n```\n"
    match = re.search(pattern, README.read_text(), re.S)
    assert match, f"README.md has no ```{lang} block marked {name!r}"
    return match.group(1)


def run_block(script: str, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``script`` with ``bash -e`` in its own process group; whatever it left running is stopped."""
    log = cwd / "block.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = -1
        finally:
            _stop_group(proc)
    return code, log.read_text(errors="replace")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM whatever is left in the block's process group (its background jobs), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + 20
        try:
            os.killpg(proc.pid, sig)
            while time.monotonic() < deadline:
                os.killpg(proc.pid, 0)  # raises once the group is empty
                if proc.poll() is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(0.2)
                else:
                    time.sleep(0.2)
        except ProcessLookupError:
            return


def test_try_it_on_one_machine(redis_server, tmp_path):
    block = readme_block("try-it-on-one-machine")
    assert "redis://localhost:6379/0" in block and "8443" in block
    broker = f"redis://127.0.0.1:{redis_server.port}/12"  # a database of its own: no other test's messages
    script = block.replace("redis://localhost:6379/0", broker).replace("8443", str(free_port()))
    home = tmp_path / "home"  # a fresh user: the embedded ledger and outputs land under ~/.local/share
    home.mkdir()
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "pip").write_text(f'#!/bin/sh\nexec "{VENV_BIN / "python"}" -m pip "$@" --no-index --quiet\n')
    (shims / "pip").chmod(0o755)
    env = {k: v for k, v in clean_env().items() if not k.startswith(("FAL_", "SSL_CERT", "BASH_ENV", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH=f"{shims}:{VENV_BIN}:/usr/bin:/bin")

    code, out = run_block(script, tmp_path, env, timeout=300)
    assert code == 0, out[-6000:]
    lines = out.splitlines()
    # fal_client: each distinct status once, then one readable line per image (URLs, no data URIs)
    assert lines.count("Completed") == 1 and lines.count("InProgress") <= 1 and lines.count("Queued") <= 1, out
    assert [line for line in lines if line.startswith("64 x 64 file://")], out[-6000:]  # tiny-lcm's own size
    assert "base64" not in out
    # curl: the status stream ends with COMPLETED, then the result (64x64, a URL)
    assert '"status": "COMPLETED"' in out or '"status":"COMPLETED"' in out, out[-6000:]
    results = [json.loads(line) for line in lines if line.startswith('{"images"')]
    assert results and [(i["width"], i["height"]) for i in results[-1]["images"]] == [(64, 64)], out[-6000:]
    assert results[-1]["images"][0]["url"].startswith("file://")
    assert (tmp_path / "farm-try" / "client.pem").is_file()  # made where the block said


def test_bulk_worked_example_then_the_training_script_reads_it(tmp_path):
    """The Bulk datasets example on an embedded farm, then the training-script block reading its dataset."""
    home = tmp_path / "home"  # a fresh user: nothing configured, the embedded farm under ~/.local/share
    home.mkdir()
    env = {k: v for k, v in clean_env().items() if not k.startswith(("BASH_ENV", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}:/usr/bin:/bin")

    code, out = run_block(readme_block("bulk-worked-example"), tmp_path, env, timeout=300)
    assert code == 0, out[-6000:]
    status = json.loads(out[out.rindex('{\n  "bulk_id"'):])  # `farm bulk status`, the block's last command
    # 3 colours x 2 seas from the template row and the lighthouse row, 2 images per prompt
    assert (status["bulk_id"], status["status"], status["total"], status["done"], status["failed"]) == (
        "boats-v1", "COMPLETED", 14, 14, 0), out[-6000:]
    dataset = tmp_path / "dataset"
    assert sorted(p.name for p in dataset.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "_stats.json"]  # the listing the README shows
    with tarfile.open(dataset / "00000.tar") as tar:
        names = tar.getnames()
    assert names[:4] == ["000000000.jpg", "000000000.json", "000000001.jpg", "000000001.json"]
    assert len(names) == 28

    script = readme_block("bulk-training-read", "python")
    script += '\nprint("read", len(ds), sorted({image.size for image, _ in pipeline}), caption)\n'
    (tmp_path / "train.py").write_text(script)
    code, out = run_block(f'"{VENV_BIN / "python"}" train.py', tmp_path, env, timeout=180)
    assert code == 0, out[-6000:]
    assert "read 14 [(256, 256)] a lighthouse at dusk" in out.splitlines(), out[-6000:]


def _fresh_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A fresh user (an empty HOME, so the embedded farm under ~/.local/share) with the venv's commands."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in clean_env().items()
           if not k.startswith(("FAL_", "SSL_CERT", "CURL_CA", "BASH_ENV", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}:/usr/bin:/bin", **extra)
    return env


def test_every_readme_block_is_run_or_exempt():
    names, lines = [], README.read_text().splitlines()
    inside = False
    for i, line in enumerate(lines):
        if not line.startswith("```"):
            continue
        if not inside:
            marker = re.fullmatch(r"<!-- test_readme: ([\w-]+) -->", lines[i - 1])
            assert marker, f"README.md line {i + 1}: a block with no `<!-- test_readme: NAME -->` above it"
            names.append(marker.group(1))
        inside = not inside
    assert not inside, "README.md: a block is not closed"
    assert len(names) == len(set(names)), f"README.md: a marker name twice: {sorted(names)}"
    assert not set(RUN) & set(EXEMPT)
    assert set(names) == set(RUN) | set(EXEMPT), (
        f"blocks neither run nor exempt: {sorted(set(names) - set(RUN) - set(EXEMPT))}; "
        f"listed but not in the README: {sorted(set(RUN) | set(EXEMPT) - set(names))}")
    assert all(callable(globals().get(test)) for test in RUN.values()), RUN


def test_quick_start_demo_then_using_it_and_usage(tmp_path):
    """`make demo`'s recipe as the Makefile has it (not a nested make, which would install), then the
    "Using it" block (without its SD1.5 line: no SD1.5 weights here) and the `farm usage` block, all on the
    embedded farm of one fresh user."""
    assert readme_block("quick-start").splitlines()[0].startswith("make demo ")
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert len(recipe) == 1 and recipe[0].startswith("\t@$(BIN)/farm generate "), recipe  # @: make echoes nothing
    command = recipe[0].strip().removeprefix("@").replace("$(BIN)/", f"{VENV_BIN}/")
    env = _fresh_env(tmp_path)
    demo = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert demo.returncode == 0, demo.stderr[-4000:]
    # stdout: the four paths and nothing else; stderr: the request id and the progress bar, no warnings
    rid = demo.stderr.split("request ", 1)[1].split()[0]
    assert demo.stdout.splitlines() == [f"out/{rid}_{i}.jpg" for i in range(4)], demo.stdout
    err = [line for line in demo.stderr.splitlines() if line.strip()]
    assert err[0] == f"request {rid}" and len(err) > 1 and all("4/4" in line for line in err[1:]), demo.stderr
    for name in demo.stdout.split():  # the tiny model's own size: no image_size given
        with Image.open(tmp_path / name) as image:
            assert image.size == (64, 64)
    with sqlite3.connect(tmp_path / "home/.local/share/lcm-farm/ledger.db") as conn:  # recorded as resolved
        (stored,) = conn.execute("SELECT input FROM jobs WHERE id = ?", (rid,)).fetchone()
    assert json.loads(stored)["image_size"] == {"width": 64, "height": 64}

    block = readme_block("using-it")
    sd15 = re.search(rf"^farm generate [^\n]*{re.escape(SD15)}[^\n]*\\\n[^\n]*\n", block, re.M)
    assert sd15, block
    script = block.replace(sd15.group(0), "").replace("REQUEST_ID", "$(ls out | head -1 | cut -d_ -f1)")
    script += "\n" + readme_block("usage-cli")
    # from the repository's root (its .venv), with `farm` not on the PATH until the block's first line
    assert block.startswith(". .venv/bin/activate "), block
    (tmp_path / "using").mkdir()
    (tmp_path / "using" / ".venv").symlink_to(VENV_BIN.parent, target_is_directory=True)
    code, out = run_block(script, tmp_path / "using", dict(env, PATH="/usr/bin:/bin"), timeout=400)
    assert code == 0, out[-6000:]
    status = json.loads(out[out.index('{\n  "request_id"'):out.index("\n}\n") + 2])  # `farm status … --result`
    assert status["status"] == "COMPLETED" and len(status["result"]["images"]) == 4, out[-6000:]
    assert status["result"]["seed"] == 42
    assert "farm/tiny-lcm" in out and SD15 in out  # `farm models` lists both
    usage = [json.loads(line) for line in out.splitlines() if line.startswith('{"owner"')]  # --daily --json
    assert sum(row["images"] for row in usage) == 8 and {row["model"] for row in usage} == {"farm/tiny-lcm"}, out


def _api_script(stack: ApiStack, key: str) -> str:  # noqa: F811  (not the fixture)
    """The client blocks in order, in one shell, with the stack's host, a fresh key and its CA."""
    def sub(text: str) -> str:
        return text.replace("farm-host:8443", stack.host).replace("<id>:<secret>", key)

    def py(name: str, tail: str = "") -> str:
        return f"echo '=== {name}'\npython - <<'PY'\n{sub(readme_block(name, 'python'))}\n{tail}PY\n"

    celery = readme_block("celery-generate", "python")
    assert "redis://redis-host:6379/0" in celery and SD15 in celery
    celery = celery.replace("redis://redis-host:6379/0", stack.env["FARM_BROKER_URL"])
    celery = celery.replace(SD15, "farm/tiny-lcm")  # the stack's worker; no SD1.5 weights here
    env_block = sub(readme_block("fal-client-env"))
    assert "SSL_CERT_FILE=ca.pem" in env_block
    return "\n".join([
        "echo '=== celery-generate'", f"python - <<'PY'\n{celery}\n"
        "print('celery', len(output['images']), output['images'][0]['width'])\nPY",
        env_block.replace("ca.pem", str(stack.ca_path)),
        py("fal-client-subscribe"),
        "echo '=== curl'", sub(readme_block("curl")), "echo",
        py("realtime-fal-client"),
        py("realtime-farm-client"),
        py("farm-client", "print('farm-client', len(out.images), url.split(':')[0], frame['images'][0]['width'])\n"),
    ])


def test_client_blocks_against_a_live_api(api_stack: ApiStack, tmp_path: Path) -> None:
    """Celery's send_task, fal_client (queue and realtime), curl and farm.client (queue and realtime),
    one after another as a user pastes them, against the suite's live API (TLS) and tiny-model worker."""
    key = api_stack.make_key("readme-clients")
    (tmp_path / "my-lora.safetensors").write_bytes(b"\0" * 64)  # what the farm.client block uploads
    # curl: the README says to add --cacert ca.pem to each call; CURL_CA_BUNDLE does that for every call
    env = _fresh_env(tmp_path, CURL_CA_BUNDLE=str(api_stack.ca_path))
    code, out = run_block(_api_script(api_stack, key), tmp_path, env, timeout=400)
    assert code == 0, f"{out[-6000:]}\n--- api log ---\n{api_stack.log_tail()}"
    part = dict(re.findall(r"^=== ([\w-]+)\n(.*?)(?=^=== |\Z)", out, re.M | re.S))
    assert "celery 4 64" in part["celery-generate"].splitlines(), part["celery-generate"]
    lines = part["fal-client-subscribe"].splitlines()
    assert lines.count("Completed") == 1 and lines.count("InProgress") <= 1 and lines.count("Queued") <= 1, lines
    assert [line for line in lines if line.startswith("64 x 64 http://127.0.0.1:")], lines  # S3 URLs, no data URIs
    curl = part["curl"]
    assert '"COMPLETED"' in curl and '"ALREADY_COMPLETED"' in curl, curl  # the stream's end; cancel afterwards
    assert curl.count('"width":64') + curl.count('"width": 64') >= 2 and "base64" not in curl, curl  # result, run
    frames = [line.split()[0] for line in part["realtime-fal-client"].splitlines() if "(64, 64)" in line]
    assert frames == ["frame-0", "frame-1", "frame-2"], part["realtime-fal-client"]
    assert "num_inference_steps" in part["realtime-farm-client"], part["realtime-farm-client"]
    lines = part["farm-client"].splitlines()
    assert lines.count("Completed") == 1 and lines.count("InProgress") <= 1, lines  # each status once
    assert lines[-1].startswith("farm-client 1 http") and lines[-1].endswith(" 64"), lines


def test_celery_bulk_task_block(api_stack: ApiStack, tmp_path: Path) -> None:
    """The `farm.bulk` send_task block (with the `app` of the send_task block above it), driven by a
    `farm bulk worker`, from the worked example's manifest put where the block says."""
    root = tmp_path / "bulk-root"
    (root / "prompts").mkdir(parents=True)
    example = readme_block("bulk-worked-example")
    (root / "prompts" / "boats.csv").write_text(example.split("<<'CSV'\n", 1)[1].split("\nCSV\n", 1)[0] + "\n")
    celery = readme_block("celery-generate", "python")
    app = celery[:celery.index("\nresult = ")].replace("redis://redis-host:6379/0", api_stack.env["FARM_BROKER_URL"])
    block = readme_block("celery-bulk", "python")
    dest = "s3://datasets/boats-v1"
    assert dest in block
    env = dict(api_stack.env, FARM_BULK_ROOT=str(root))
    # the session's stack is shared: a bulk job another test left running has no driver, so the sweeper
    # sends it again and it would take a slot of this worker; end those first, the way an operator would
    for (other,) in api_stack.sql("SELECT id FROM bulk_jobs WHERE status IN ('RUNNING', 'PAUSED')"):
        ended = run_farm(["bulk", "cancel", str(other)], api_stack.env)
        assert ended.returncode == 0, ended.stderr[-2000:]
    driver_log = tmp_path / "bulk-worker.log"
    with driver_log.open("w") as log:  # a file, not a pipe: an unread full pipe would block the worker
        driver = subprocess.Popen([FARM, "bulk", "worker"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        (tmp_path / "send.py").write_text(f"{app}\n{block}\n")
        code, out = run_block(f'"{VENV_BIN / "python"}" send.py', tmp_path, _fresh_env(tmp_path), timeout=120)
        assert code == 0, out[-4000:]
        deadline = time.monotonic() + 300
        while True:
            rows = api_stack.sql("SELECT status FROM bulk_jobs WHERE dest = :d", d=dest)
            if rows and rows[0][0] in ("COMPLETED", "CANCELLED", "BUDGET_REACHED") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert rows == [("COMPLETED",)], (rows, driver_log.read_text()[-4000:], api_stack.log_tail())
        (bulk_id,) = api_stack.sql("SELECT id FROM bulk_jobs WHERE dest = :d", d=dest)[0]
        counts = api_stack.sql("SELECT status, count(*) FROM bulk_samples WHERE bulk_id = :b GROUP BY 1", b=bulk_id)
        assert [tuple(c) for c in counts] == [("done", 14)], counts  # 7 prompts x 2 images, as in the example
    finally:
        _stop_group(driver)


def test_two_workers_on_one_host_from_the_readme_pool_example(stack, tmp_path):  # noqa: F811
    """Issue 17, item 1: the pool example's CPU loop as written, against the private servers, with the
    default metrics port: both workers start (no per-worker setting), take distinct names and ports, say
    where they are scraped (ready line and `workers` row), serve their metrics there, and the job renders."""
    block = readme_block("pools-one-host-cpu")
    assert block.startswith("for i in 1 2; do farm worker --model farm/tiny-lcm & done\n"), block
    env = {k: v for k, v in stack["env"].items() if k != "FARM_METRICS_PORT"}  # both on the default, 9808
    env["FARM_METRICS_TOKEN"] = "readme-scrape"  # metrics are closed without one
    env["PATH"] = f"{VENV_BIN}:/usr/bin:/bin"
    log = tmp_path / "block.log"
    with open(log, "wb") as out:  # `wait`: the workers run until this test has looked at them
        proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", f"{block}\necho '=== block done'\nwait"],
                                cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            out_text = log.read_text(errors="replace")
            if "=== block done" in out_text and out_text.count("farm worker ready: ") == 2:
                break
            assert proc.poll() is None and time.monotonic() < deadline, out_text[-6000:]
            time.sleep(0.2)
        assert "Traceback" not in out_text and "error:" not in out_text, out_text[-6000:]  # neither refused
        host = socket.gethostname()
        rows = _ledger(stack, "SELECT name, metrics_url FROM workers WHERE stopped_at IS NULL ORDER BY name")
        assert {name for name, _ in rows} == {f"tiny-lcm@cpu.{host}", f"tiny-lcm@cpu-2.{host}"}, rows
        urls = [url for _, url in rows]
        assert len(set(urls)) == 2 and all(url and url.startswith(f"http://{host}:") for url in urls), rows
        ready = [line for line in out_text.splitlines() if "farm worker ready: " in line]
        for name, url in rows:
            assert [line for line in ready if f"ready: {name} " in line and line.endswith(f" metrics={url}")], ready
            scraped = httpx.get(url, headers={"Authorization": "Bearer readme-scrape"}, timeout=30)
            assert scraped.status_code == 200, (url, scraped.text[:500])
            assert f'farm_worker_info{{device="cpu",model="tiny-lcm",name="{name}"}} 1.0' in scraped.text, url
        (status, done), = _ledger(stack, "SELECT status, images_done FROM jobs")
        assert (status, done) == ("COMPLETED", 8)
        assert len([line for line in out_text.splitlines() if line.startswith("http")]) == 8, out_text[-4000:]
    finally:
        _stop_group(proc)
