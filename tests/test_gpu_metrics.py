"""farm_gpu_memory_bytes (farm.metrics.count.gpu_memory): read from a CUDA device after each batch, absent on
any other device, and a device that cannot be read says so once instead of failing (or hiding) silently."""

from __future__ import annotations

import logging
import uuid

import pytest

from farm.metrics import count

KINDS = ("allocated", "reserved", "total")


def _gauge(model: str, device: str) -> dict[str, float | None]:
    from prometheus_client import REGISTRY

    import farm.metrics.defs  # noqa: F401  (registers the gauge)

    return {kind: REGISTRY.get_sample_value("farm_gpu_memory_bytes", {"model": model, "device": device, "kind": kind})
            for kind in KINDS}


def _model() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"  # a label of this test's own


def test_no_gauge_off_cuda() -> None:
    model = _model()
    count.gpu_memory(model, "cpu")
    count.gpu_memory(model, "mps")
    assert _gauge(model, "cpu") == dict.fromkeys(KINDS)
    assert _gauge(model, "mps") == dict.fromkeys(KINDS)


def test_a_device_that_cannot_be_read_is_logged_once_and_leaves_no_gauge(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No device has index 4096: on a machine without CUDA (or without torch) and on one with it, reading it
    fails. The failure never reaches the caller, is a warning naming the metric and its cause, once."""
    monkeypatch.setattr(count, "_warned", set())
    model, device = _model(), "cuda:4096"
    with caplog.at_level(logging.DEBUG, logger="farm.metrics.count"):
        for _ in range(3):
            count.gpu_memory(model, device)
    warnings = [r for r in caplog.records if r.name == "farm.metrics.count" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "gpu_memory" in warnings[0].getMessage() and warnings[0].exc_info, warnings[0].getMessage()
    debug = [r for r in caplog.records if r.name == "farm.metrics.count" and r.levelno == logging.DEBUG]
    assert len(debug) == 2, "later failures are still logged, at debug level"
    assert _gauge(model, device) == dict.fromkeys(KINDS), "nothing half-set: all three are read first"


def test_gpu_memory_is_read_on_cuda(caplog: pytest.LogCaptureFixture) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed: only a CUDA worker reads GPU memory")
    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA device here (torch {torch.__version__}: torch.cuda.is_available() is False); "
                    "farm_gpu_memory_bytes is only exported by workers on CUDA")
    model, device = _model(), "cuda:0"
    before = torch.cuda.memory_allocated(0)
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    try:
        with caplog.at_level(logging.WARNING, logger="farm.metrics.count"):
            count.gpu_memory(model, device)
        held = _gauge(model, device)
        assert None not in held.values(), held
        allocated, reserved, total = (float(held[kind] or 0) for kind in KINDS)
        assert not [r for r in caplog.records if r.name == "farm.metrics.count"], caplog.text
        assert allocated >= before + block.numel(), held
        assert total >= reserved >= allocated, held
        assert total == torch.cuda.get_device_properties(0).total_memory, held
    finally:
        del block
        torch.cuda.empty_cache()
    count.gpu_memory(model, device)
    freed = _gauge(model, device)
    assert freed["allocated"] is not None and freed["allocated"] <= allocated - 64 * 2**20, (held, freed)
