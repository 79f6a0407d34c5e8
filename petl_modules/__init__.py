"""Parameter-efficient transfer learning of pretrained audio transformers, as SpeechBrain lobes."""

import logging

from . import aliases
from .hparams_loader import HparamsError, load_hparams
from .model import ClassificationHead, PETLModel

aliases.install()  # `python -m petl_modules.report` and the other moved commands keep working

# SpeechBrain logs "torchvision is not available - cannot save figures" when its train_logger module is first
# imported (for an optional image saver nothing here uses); neither import above imports it.
logging.getLogger("speechbrain.utils.train_logger").addFilter(
    lambda record: not str(record.msg).startswith("torchvision is not available")
)

__all__ = ["ClassificationHead", "HparamsError", "PETLModel", "load_hparams"]
