"""Prediction with a trained PETL model, the SpeechBrain way.

    from petl_modules.inference import AudioClassifier

    classifier = AudioClassifier.from_hparams(source=DIR)  # a run folder, its output folder or an export
    result = classifier.classify_file("dog.wav", top_k=3)  # any rate, bit depth, channel count
    result.labels[0], result.scores[0], result.top_k[0]    # 'dog', tensor(0.91), [('dog', 0.91), ...]

`AudioClassifier` is a `speechbrain.inference.interfaces.Pretrained`, as SpeechBrain's `EncoderClassifier`
is: its `hyperparams.yaml` declares `modules` (the `model`), a `label_encoder` (`CategoricalEncoder`,
`label_encoder.txt`) and a `pretrainer` that loads the trained tensors into the model built from the frozen
backbone. An export folder carries that file; for a run folder, `from_hparams` writes it (into a temporary
folder) from the keys of the run's `hyperparams.yaml` that `model` depends on, so nothing of the training
configuration (checkpointer, loggers) is built and the run folder is only read.

Input, as the recipes' test stage has it: the whole file as a 16 kHz mono waveform; AST crops or pads its
fbank to the run's `target_length` frames (the protocol's crop: the first `target_length` x 10 ms);
Wav2Vec2 takes the whole file. `window_seconds` instead scores windows of that length every `hop_seconds`
(default: half a window; the last window ends at the end of the file) and averages their class
probabilities; a file shorter than a window is one window.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import NamedTuple

import ruamel.yaml
import torch
from safetensors.torch import load_file, save_file
from speechbrain.dataio.encoder import CategoricalEncoder
from speechbrain.inference.interfaces import Pretrained
from speechbrain.utils.checkpoints import mark_as_loader, register_checkpoint_hooks

from .atomic import atomic_path, write_text_atomic
from .data import read_audio
from .hparams_loader import closure, dump_tree
from .model import PETLModel
from .run_folder import HPARAMS_FILE, InferenceError, is_export, locate_run, read_tree

TRAINED_FILE = "trained.safetensors"
LABEL_ENCODER_FILE = "label_encoder.txt"

# What every inference hyperparameter file adds to the model keys: SpeechBrain's Pretrained contract.
INFERENCE_BLOCK = """
# --- inference (petl_modules.inference.AudioClassifier) ---
modules:
    model: !ref <model>
label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder
trained_parameters: !new:petl_modules.inference.TrainedParameters
    model: !ref <model>
    strict: {strict}
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        model: !ref <trained_parameters>
        label_encoder: !ref <label_encoder>
    paths:
        model: {trained}
        label_encoder: !ref <pretrained_path>/{label_encoder}
"""


# --- trained tensors --------------------------------------------------------------------------------


def read_trainable(path: str | Path) -> dict[str, torch.Tensor]:
    """Trainable tensors from a safetensors file or a recipe checkpoint (`torch.load`, weights only)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise InferenceError(f"{path}: cannot read the trained tensors ({str(error).splitlines()[0]})") from None


def save_trainable(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write tensors as safetensors, atomically."""
    with atomic_path(path) as tmp:
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(tmp), metadata={"format": "pt"})


@register_checkpoint_hooks
class TrainedParameters:
    """The Pretrainer's loadable for a PETLModel's trained tensors.

    strict: the file must hold exactly the model's trainable state (`load_trainable_state_dict`);
    otherwise every tensor in the file must name a tensor of the model (a merged export keeps only
    the head, its backbone folder holds the rest).
    """

    def __init__(self, model: PETLModel, strict: bool = True) -> None:
        self.model = model
        self.strict = strict

    @mark_as_loader
    def load(self, path: str | Path, end_of_epoch: bool = False) -> None:
        state = read_trainable(path)
        try:
            if self.strict:
                self.model.load_trainable_state_dict(state)
                return
            unknown = sorted(state.keys() - self.model.state_dict().keys())
            if unknown:
                raise ValueError(f"{len(unknown)} tensors this model has not (first: {unknown[0]})")
            self.model.load_state_dict(state, strict=False)
        except (ValueError, RuntimeError) as error:
            raise InferenceError(f"{path}: does not fit the model ({str(error).splitlines()[0]})") from None


# --- the inference hyperparameter file -----------------------------------------------------------------


def write_label_encoder(path: Path, classes: list[str]) -> None:
    """SpeechBrain's CategoricalEncoder file: label i is class index i."""
    encoder = CategoricalEncoder()
    encoder.update_from_iterable(classes)
    with atomic_path(path) as tmp:
        encoder.save(tmp)


def write_inference_folder(
    folder: Path,
    tree: dict,
    classes: list[str],
    trained: str | None = None,
    replacements: str = "",
    strict: bool = True,
    header: str = "",
    pretrained_path: Path | None = None,
) -> None:
    """`hyperparams.yaml` and `label_encoder.txt` that `AudioClassifier.from_hparams(source=folder)` loads.

    `tree` is a run's unresolved configuration; only the keys `model` needs are kept, after
    `replacements` (YAML text) replaced some. `pretrained_path` (default: `folder`) is where the folder
    will be (from_hparams resets it to where the folder is, so it can move). `trained` is the trained
    tensors' path (default: TRAINED_FILE in the folder).
    """
    folder = Path(folder).resolve()
    pretrained_path = Path(pretrained_path or folder).resolve()
    tree = ruamel.yaml.comments.CommentedMap(tree)
    tree.update(ruamel.yaml.YAML().load(f"pretrained_path: {json.dumps(str(pretrained_path))}\n{replacements}"))
    keys = ["pretrained_path", *(key for key in closure(tree, ["model"]) if key != "pretrained_path")]
    body = dump_tree(ruamel.yaml.comments.CommentedMap((key, tree[key]) for key in keys))
    trained = json.dumps(trained) if trained else f"!ref <pretrained_path>/{TRAINED_FILE}"
    block = INFERENCE_BLOCK.format(strict=strict, trained=trained, label_encoder=LABEL_ENCODER_FILE)
    write_text_atomic(folder / HPARAMS_FILE, header + body + block)
    write_label_encoder(folder / LABEL_ENCODER_FILE, classes)


# --- sliding windows ------------------------------------------------------------------------------------


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
    """Window start samples: every `hop`, plus one ending at the last sample; [0] when the file fits one."""
    if num_samples <= window:
        return [0]
    starts = list(range(0, num_samples - window + 1, hop))
    if starts[-1] + window < num_samples:
        starts.append(num_samples - window)
    return starts


def _seconds(option: str, value: float | None) -> float | None:
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise InferenceError(f"{option} must be a positive number of seconds; got {value}")
    return value


# --- the interface ---------------------------------------------------------------------------------------


class Classification(NamedTuple):
    """Predictions for a batch: class probabilities, the best class's probability, index and label, top k."""

    probabilities: torch.Tensor  # (batch, classes), softmax of the logits (averaged over windows)
    scores: torch.Tensor  # (batch,)
    indices: torch.Tensor  # (batch,)
    labels: list[str]
    top_k: list[list[tuple[str, float]]]


class AudioClassifier(Pretrained):
    """A trained PETL classifier: `from_hparams(source=run, output or export folder)`, then classify."""

    MODULES_NEEDED = ["model"]
    HPARAMS_NEEDED = ["label_encoder", "num_classes"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mods.eval()
        encoder = self.hparams.label_encoder
        self.classes = [encoder.ind2lab[index] for index in range(len(encoder))]
        if len(self.classes) != self.hparams.num_classes:
            raise InferenceError(
                f"{LABEL_ENCODER_FILE} has {len(self.classes)} labels but the model {self.hparams.num_classes} classes"
            )

    @classmethod
    def from_hparams(cls, source, hparams_file: str = HPARAMS_FILE, overrides: dict | None = None, **kwargs):
        """Load from a local run folder, a recipe output folder holding one run, or an export folder.

        `overrides` replace keys of the inference hyperparameters (e.g. `backbone_source` when the
        backbone moved); other keyword arguments go to SpeechBrain's `pretrained_from_hparams`
        (`run_opts={"device": "cuda"}`, `freeze_params`, ...).
        """
        folder = Path(source).expanduser().resolve()
        overrides = dict(overrides or {})
        if is_export(folder):
            overrides = {"pretrained_path": str(folder), **overrides}
            return super().from_hparams(source=str(folder), hparams_file=hparams_file, overrides=overrides, **kwargs)
        run = locate_run(source)
        with tempfile.TemporaryDirectory(prefix="petl_inference_") as tmp:
            write_inference_folder(Path(tmp), read_tree(run.hparams_file), run.classes, trained=str(run.checkpoint))
            return super().from_hparams(source=tmp, overrides=overrides, **kwargs)

    @property
    def sample_rate(self) -> int:
        return self.mods.model.backbone.sample_rate

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None) -> Classification:
        return self.classify_batch(wavs, wav_lens)

    def class_probabilities(self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Waveforms (batch, samples) or (samples,) at `sample_rate`, relative lengths -> (batch, classes)."""
        wavs = wavs[None] if wavs.dim() == 1 else wavs
        wavs = wavs.to(self.device, torch.float32)
        wav_lens = None if wav_lens is None else wav_lens.to(self.device)
        with torch.no_grad(), self.inference_ctx:
            logits = self.mods.model(wavs, wav_lens)
        return logits.float().softmax(dim=-1).cpu()

    def decide(self, probabilities: torch.Tensor, top_k: int = 5) -> Classification:
        """Best class and the `top_k` most probable ones, from probabilities (batch, classes)."""
        values, indices = probabilities.topk(max(1, min(top_k, len(self.classes))), dim=-1)
        ranked = [
            [(self.classes[index], float(value)) for value, index in zip(row_values, row_indices)]
            for row_values, row_indices in zip(values.tolist(), indices.tolist())
        ]
        return Classification(
            probabilities, values[:, 0], indices[:, 0], [self.classes[i] for i in indices[:, 0].tolist()], ranked
        )

    def classify_batch(
        self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None, top_k: int = 5
    ) -> Classification:
        """Classify waveforms already at `sample_rate` (batch, samples), with SpeechBrain relative lengths."""
        return self.decide(self.class_probabilities(wavs, wav_lens), top_k)

    def classify_file(
        self,
        path: str | Path,
        top_k: int = 5,
        window_seconds: float | None = None,
        hop_seconds: float | None = None,
        batch_size: int = 16,
    ) -> Classification:
        """Classify one audio file (any rate, bit depth, channel count); windows as the module says."""
        wav = read_audio(path, self.sample_rate)
        if _seconds("--window_seconds", window_seconds) is None:
            if hop_seconds is not None:
                raise InferenceError("--hop_seconds needs --window_seconds")
            return self.classify_batch(wav, top_k=top_k)
        window = max(1, round(window_seconds * self.sample_rate))
        hop = max(1, round((_seconds("--hop_seconds", hop_seconds) or window_seconds / 2) * self.sample_rate))
        windows = [wav[start : start + window] for start in window_starts(wav.shape[0], window, hop)]
        probabilities = torch.cat(
            [
                self.class_probabilities(torch.stack(windows[i : i + batch_size]))
                for i in range(0, len(windows), batch_size)
            ]
        )
        return self.decide(probabilities.mean(dim=0, keepdim=True), top_k)
