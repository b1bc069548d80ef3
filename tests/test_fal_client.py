"""The unmodified ``fal_client`` package against the live API over TLS, pointed at it by env vars only.

fal_client reads ``FAL_RUN_HOST`` / ``FAL_QUEUE_RUN_HOST`` when it is imported, so each
configuration runs in its own Python process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.api_stack import APP, IDLE_MODEL, ApiStack, idle_input, tiny_input

SCRIPT = r'''
import json, sys, time
import fal_client

APP, TINY, IDLE = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {}

# subscribe, with logs and queue updates
updates = []
def on_update(status):
    updates.append({"type": type(status).__name__, "logs": getattr(status, "logs", None),
                    "position": getattr(status, "position", None)})
enqueued = []
result = fal_client.subscribe(APP, arguments=dict(TINY, seed=1), with_logs=True,
                              on_queue_update=on_update, on_enqueue=enqueued.append)
out["subscribe"] = {"result": result, "updates": updates, "enqueued": enqueued}

# submit, then status with logs until completed, then result
handle = fal_client.submit(APP, arguments=dict(TINY, seed=2, num_images=2))
statuses = []
while True:
    status = fal_client.status(APP, handle.request_id, with_logs=True)
    statuses.append(type(status).__name__)
    if isinstance(status, fal_client.Completed):
        break
    time.sleep(0.05)
out["submit"] = {"request_id": handle.request_id, "statuses": statuses, "logs": status.logs,
                 "metrics": status.metrics, "error": status.error,
                 "result": fal_client.result(APP, handle.request_id)}

# cancel a request no worker will take
queued = fal_client.submit(APP, arguments=IDLE)
before = fal_client.status(APP, queued.request_id)
fal_client.cancel(APP, queued.request_id)
after = fal_client.status(APP, queued.request_id)
try:
    fal_client.result(APP, queued.request_id)
    result_error = None
except fal_client.client.FalClientHTTPError as exc:
    result_error = {"status_code": exc.status_code, "error_type": exc.error_type, "message": str(exc)}
out["cancel"] = {"before": type(before).__name__, "position": before.position, "after": type(after).__name__,
                 "error": after.error, "error_type": after.error_type, "result_error": result_error}

# run: the output directly
out["run"] = fal_client.run(APP, arguments=dict(TINY, seed=3))

# stream: status events, then the output
out["stream"] = list(fal_client.stream(APP, arguments=dict(TINY, seed=4)))

# invalid input: the error names the field
try:
    fal_client.submit(APP, arguments=dict(TINY, num_inference_steps=0))
except fal_client.client.FalClientHTTPError as exc:
    out["invalid"] = {"status_code": exc.status_code, "error_type": exc.error_type, "message": exc.message}
print(json.dumps(out))
'''

ROOT_SCRIPT = r'''
import json, sys
import fal_client

result = fal_client.subscribe(sys.argv[1], arguments=json.loads(sys.argv[2]))
print(json.dumps(result))
'''


def run_fal(stack: ApiStack, tmp_path: Path, script: str, env: dict[str, str], *args: str) -> Any:
    path = tmp_path / "fal_script.py"
    path.write_text(script)
    full_env = {k: v for k, v in stack.env.items() if not k.startswith("FAL_")}
    full_env.update(env, SSL_CERT_FILE=str(stack.ca_path), FAL_HOME_DIR=str(tmp_path / "fal-home"))
    done = subprocess.run([sys.executable, str(path), *args], env=full_env, capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert done.returncode == 0, f"{done.stderr[-4000:]}\n--- api log ---\n{stack.log_tail()}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_unmodified_fal_client_subscribe_submit_status_result_cancel_run(api_stack: ApiStack, tmp_path: Path) -> None:
    key = api_stack.make_key("fal-user")
    env = {"FAL_KEY": key, "FAL_RUN_HOST": f"{api_stack.host}/run", "FAL_QUEUE_RUN_HOST": f"{api_stack.host}/queue"}
    # the session's stack is shared: jobs other tests left waiting for the same pool come first
    from models.registry import get_model

    ahead = api_stack.sql("SELECT count(*) FROM jobs WHERE status = 'IN_QUEUE' AND model_key = :k",
                          k=get_model(IDLE_MODEL).key)[0][0]
    out = run_fal(api_stack, tmp_path, SCRIPT, env, APP, json.dumps(tiny_input()), json.dumps(idle_input()))

    sub = out["subscribe"]
    assert sub["result"]["seed"] == 1 and sub["result"]["images"][0]["url"].startswith("data:image/jpeg;base64,")
    assert len(sub["enqueued"]) == 1
    kinds = [u["type"] for u in sub["updates"]]
    assert kinds[-1] == "Completed" and set(kinds) <= {"Queued", "InProgress", "Completed"}
    assert all(u["position"] >= 0 for u in sub["updates"] if u["type"] == "Queued")
    final_logs = sub["updates"][-1]["logs"]
    assert final_logs and {"timestamp", "level", "source", "message"} <= set(final_logs[0])

    submitted = out["submit"]
    assert submitted["statuses"][-1] == "Completed" and submitted["error"] is None
    assert submitted["metrics"]["inference_time"] >= 0
    assert [line["message"] for line in submitted["logs"]][-1] == "completed 2 image(s)"
    assert submitted["result"]["seed"] == 2 and len(submitted["result"]["images"]) == 2

    cancel = out["cancel"]
    assert (cancel["before"], cancel["after"], cancel["error_type"]) == ("Queued", "Completed", "cancelled")
    assert cancel["position"] == ahead  # fal's Queued.position is the farm's queue_position
    assert cancel["result_error"]["status_code"] == 400 and cancel["result_error"]["error_type"] == "cancelled"

    assert out["run"]["seed"] == 3 and len(out["run"]["images"]) == 1
    assert out["stream"][-1]["seed"] == 4 and all(e["status"] for e in out["stream"][:-1])
    assert out["invalid"]["status_code"] == 422 and out["invalid"]["error_type"] == "validation_error"
    assert out["invalid"]["message"][0]["loc"] == ["body", "num_inference_steps"]

    rows = api_stack.sql("SELECT lane, status, count(*) FROM jobs WHERE owner = 'fal-user' GROUP BY 1, 2 ORDER BY 1, 2")
    assert rows == [("queue", "CANCELLED", 1), ("queue", "COMPLETED", 2), ("sync", "COMPLETED", 2)]


def test_fal_client_with_the_queue_at_the_root(api_stack: ApiStack, tmp_path: Path) -> None:
    key = api_stack.make_key("fal-root")
    env = {"FAL_KEY": key, "FAL_RUN_HOST": f"{api_stack.host}/run", "FAL_QUEUE_RUN_HOST": api_stack.host}
    result = run_fal(api_stack, tmp_path, ROOT_SCRIPT, env, APP, json.dumps(tiny_input(seed=8, sync_mode=False)))
    assert result["seed"] == 8 and "X-Amz-Signature" in result["images"][0]["url"]
