"""lcm-farm's producer side and shared core: settings, errors, statuses, schemas, storage, admission,
dispatch, the lifecycle, the HTTP API (``farm.api``), the client and the CLI (``farm.cli``, ``farm.commands``).

May import ``db`` and ``models.registry``/``models.prompt`` (import-light). Never imports ``tasks``
(the worker side), except from the CLI, which starts workers.
"""
