"""A GPU worker's node name: the one given (refused while a live worker holds it), or the first free default.

Default names are ``<model-key>@<device>.<host>``, then ``…-2.<host>`` … ``-64.<host>`` while a live worker
of this host (or one starting beside it) holds the name.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import tempfile
from pathlib import Path

from farm.config import Settings
from farm.errors import WorkerNameTakenError

NAMES_TRIED = 64  # <key>@<device>.<host>, then <key>@<device>-2.<host> … -64


def device_label(device: str) -> str:
    return device.replace("cuda:", "gpu") if device.startswith("cuda:") else device


def refuse_a_live_namesake(name: str, settings: Settings) -> None:
    """Refuse at once a name that a live worker holds (the registration in the pool checks it again)."""
    from db.models import Worker, utcnow
    from db.session import session_scope

    with session_scope() as s:
        row = s.get(Worker, name)
        now = utcnow()
        if row is not None and row.live_other_than(socket.gethostname(), None, settings.lease_seconds, now):
            raise row.name_taken(now)


def free_name(base: str, settings: Settings) -> tuple[str, int]:
    """The first of ``<base>.%h``, ``<base>-2.%h``, … that no live worker holds and no worker of this host
    is starting under for the same ledger (a lock file held for this process's life, so two started at
    once differ too); the node name and the lock's file descriptor. Refuses if all are held."""
    from db.models import Worker, utcnow
    from db.session import session_scope

    host = socket.gethostname()
    farm = hashlib.sha256(settings.effective_database_url.encode()).hexdigest()[:12]  # names are per ledger
    for n in range(1, NAMES_TRIED + 1):
        node = f"{base}{'' if n == 1 else f'-{n}'}.%h"
        shown = node.replace("%h", host)
        try:
            fd = os.open(Path(tempfile.gettempdir()) / f"farm-worker-{farm}-{shown}.lock",
                         os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            continue  # another user's lock file: that user's worker may hold the name
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a worker of this host is starting (or runs) under it
        with session_scope() as s:
            row = s.get(Worker, shown)
            now = utcnow()
            if row is None or not row.live_other_than(host, None, settings.lease_seconds, now):
                return node, fd
        os.close(fd)
    refuse_a_live_namesake(f"{base}.{host}", settings)
    raise WorkerNameTakenError(f"worker names {base}.{host} to {base}-{NAMES_TRIED}.{host} are all taken by "
                               "live workers of this host: give this one a --name")


def node_name(name: str | None, model_key: str, device: str, settings: Settings) -> str:
    """The Celery node name (``%h`` for the host) this worker runs under; a default's lock file stays held
    until this process exits."""
    if name:  # a name given is this worker's or none: refused if a live worker holds it
        refuse_a_live_namesake(name.replace("%h", socket.gethostname()), settings)
        return name
    # several workers of one model and device on one host: the second is <key>@<device>-2.<host>
    node, _lock = free_name(f"{model_key}@{device_label(device)}", settings)  # fd kept open on purpose
    return node
