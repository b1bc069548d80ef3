"""The ``--device`` of a worker (``farm worker``, and the in-process one of ``farm generate`` and
``farm bulk``): its spelling, and whether this machine has it, checked before any model loads.

Imports no torch at module level: the spelling is checked everywhere, the machine only where a
model is about to load (and torch is there anyway).
"""

from __future__ import annotations

import re

from farm.errors import InvalidInputError

DEVICE = re.compile(r"^(cpu|cuda:\d+|mps)$")


def check_device(device: str) -> str:
    """``device`` if it is spelled ``cpu``, ``cuda:N`` or ``mps``; else InvalidInputError naming --device."""
    if not DEVICE.match(device):
        raise InvalidInputError("--device", f"must be cpu, cuda:N or mps (got {device!r})")
    return device


def require_device(device: str, family: str) -> None:
    """Raise InvalidInputError naming --device unless this machine has ``device`` for a model of ``family``.

    The ``hold`` stand-in renders nothing and imports no torch: any spelled device will do. Without
    torch installed, the model's loader says what is missing. CUDA is counted through NVML where it
    can be (``torch.cuda.device_count``), which does not initialise CUDA in this process: a
    ``farm worker`` forks its pool process after this check, and that process uses the GPU.
    """
    check_device(device)
    if device == "cpu" or family == "hold":
        return
    try:
        import torch
    except ImportError:
        return
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidInputError("--device", "mps is not available on this machine (Apple silicon, with a "
                                                "torch built for it, only); use --device cpu")
        return
    index = int(device.split(":", 1)[1])
    if torch.version.cuda is None:
        raise InvalidInputError("--device", f"{device} is not available: this torch ({torch.__version__}) is built "
                                            "without CUDA; use --device cpu, or install a CUDA build of torch")
    count = torch.cuda.device_count()
    if count == 0:
        raise InvalidInputError("--device", f"{device} is not available: no CUDA device is visible (check the "
                                            "NVIDIA driver, nvidia-smi and CUDA_VISIBLE_DEVICES); use --device cpu")
    if index >= count:
        raise InvalidInputError("--device", f"{device} is not available: {count} CUDA device"
                                            f"{'s are' if count > 1 else ' is'} visible (cuda:0"
                                            f"{f' to cuda:{count - 1}' if count > 1 else ''})")
