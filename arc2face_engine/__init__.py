"""The model side of arc2face-synth (see ARCHITECTURE.md)."""

import logging


class _NoTorchvisionFallbackNotice(logging.Filter):
    """transformers announces, once per class, that CLIP/SigLIP image processors fall back
    to their PIL versions without torchvision (diffusers imports them with its pipelines).
    Arc2Face uses no image processor and torchvision is deliberately absent (see README),
    so the notice is noise in every run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())
