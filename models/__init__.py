"""Model stack of the workers: registry (import-light), loading, rendering, safety, tiny model.

Only ``models.registry`` and ``models.prompt`` are safe to import without torch; the other
modules (``renderer``, ``render``, ``loading``, ``adapters``, ``safety``, ``tiny``,
``encode``) belong to workers. Nothing heavy is imported here.
"""

import logging as _logging


class _TorchvisionFallbackFilter(_logging.Filter):
    """Drops transformers' "`<Name>ImageProcessor` requires torchvision (not installed); falling back
    to `<Name>ImageProcessorPil`" warnings, logged once per class when diffusers (or the tiny model)
    imports an image processor. The PIL processors are the ones meant here: torchvision is not a
    dependency, and the safety checkers only resize and normalise a few images per batch. Every other
    transformers warning still shows."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# on the logger that emits them, before transformers is imported (the filter stays with the logger)
_logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
