"""Real ``farm`` processes for tests: workers and CLI runs with a chosen environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

FARM = str(Path(sys.executable).parent / "farm")


def clean_env(**farm_vars: str) -> dict[str, str]:
    """The current environment without FARM_* variables, plus ``farm_vars``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(farm_vars)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("FARM_METRICS_PORT", "0")  # many workers share this host: a test that scrapes picks a free port
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_farm(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FARM, *args], env=env, capture_output=True, text=True, timeout=timeout)


class WorkerProcess:
    """``farm worker`` in its own process group, so a test can SIGKILL all of it."""

    def __init__(self, env: dict[str, str], model: str = "farm/tiny-lcm", name: str | None = None) -> None:
        self.env = env
        self.model = model
        self.name = name
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def launch(self) -> WorkerProcess:
        """Start the process; do not wait for it to be ready."""
        args = [FARM, "worker", "--model", self.model, "--device", "cpu"]
        if self.name:
            args += ["--name", self.name]
        self.proc = subprocess.Popen(
            args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def start(self, timeout: float = 120) -> WorkerProcess:
        # the farm's line means the consumer is connected and the model loaded and registered
        self.launch().wait_for("farm worker ready", timeout)
        return self

    def wait_for(self, text: str, timeout: float) -> str:
        """The first output line containing ``text``; raises if the worker exits or ``timeout`` passes first."""
        assert self.proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = next((line for line in list(self.lines) if text in line), None)
            if line is not None:
                return line
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited before {text!r}:\n" + "".join(self.lines[-50:]))
            time.sleep(0.1)
        raise TimeoutError(f"no {text!r} from the worker:\n" + "".join(self.lines[-50:]))

    def wait(self, timeout: float) -> int:
        """Wait for the worker to exit (all its output read); its exit status."""
        assert self.proc
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(10)
        return code

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(line)

    def kill(self) -> None:
        """SIGKILL the whole worker: main process and pool child, no clean shutdown."""
        assert self.proc
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(10)  # everything the worker wrote before it died is in self.lines

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    @property
    def output(self) -> str:
        return "".join(self.lines)
