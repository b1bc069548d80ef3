"""The ``farm`` CLI's subcommands, one module per command group (``farm.cli`` wires them into click).

The only part of ``farm`` (with ``farm.cli``) that may import ``tasks`` and ``farm.api``: it starts workers
and the API. Heavy imports stay inside the command functions, so ``farm --help`` loads neither torch nor FastAPI.
"""
