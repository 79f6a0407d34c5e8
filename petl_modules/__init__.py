"""Parameter-efficient transfer learning of pretrained audio transformers, as SpeechBrain lobes."""

from .hparams_loader import HparamsError, load_hparams
from .model import ClassificationHead, PETLModel

__all__ = ["ClassificationHead", "HparamsError", "PETLModel", "load_hparams"]
