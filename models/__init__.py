"""Model stack of the workers: registry (import-light), loading, rendering, safety, tiny model.

Only ``models.registry`` and ``models.prompt`` are safe to import without torch; the other
modules (``renderer``, ``render``, ``loading``, ``adapters``, ``safety``, ``tiny``,
``encode``) belong to workers. Nothing heavy is imported here.
"""
