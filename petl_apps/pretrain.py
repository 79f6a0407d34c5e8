"""The project's own pretraining recipe: a small AST trained from random weights on synthetic spoken words.

    python -m petl_apps.pretrain --output_folder=DIR [--seed=0] [--epochs=N] [--num_words=N] [--num_speakers=N]

The task is word classification over `PRETRAIN_WORDS` (none of the Speech Commands words) spoken by the
`pretrain` part of `speaker_splits(seed)` (no demo speaker), synthesised in memory by eSpeak NG. The result
is a Hugging Face folder (`config.json`, `model.safetensors`, `preprocessor_config.json` with the fbank
mean and std of the pretraining data) that `--backbone_source` loads like the hub checkpoint, plus
`pretraining.json` (settings and final training accuracy), written last.

Invariants: the folder appears whole (built beside it, then renamed), its files with mode 0666 and the
folder 0777, less the umask; a folder whose `pretraining.json` holds the same settings is reused, not
retrained; same settings and seed, same weights (CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import ASTConfig, ASTModel
from transformers.utils import logging as hf_logging

from petl_apps.speech import PRETRAIN_WORDS, SpeechSynthesisError, clip_settings, speaker_splits, synthesize_clips
from petl_modules.atomic import follow_umask, staging_folder, write_json_atomic
from petl_modules.backbones import build_backbone
from petl_modules.backbones.ast import FbankFrontEnd, SpecAugment
from petl_modules.random_backbones import ast_preprocessor_config, write_random_checkpoint

INFO = "pretraining.json"


@dataclass(frozen=True)
class PretrainSettings:
    """Everything the pretrained weights depend on (the cache key)."""

    num_words: int = 40
    num_speakers: int = 120
    clips_per_speaker: int = 1
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2
    patch_stride: int = 16  # non-overlapping 16 x 16 patches: 8 x 6 tokens for 1 s
    target_length: int = 100  # fbank frames: the GSC recipe's input length
    seed: int = 0

    def ast_config(self) -> ASTConfig:
        return ASTConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=4 * self.hidden_size,
            max_length=self.target_length,
            num_mel_bins=128,
            frequency_stride=self.patch_stride,
            time_stride=self.patch_stride,
        )


class WordClassifier(nn.Module):
    """The pretraining model: AST, mean over all output tokens (after its final LayerNorm), one Linear.

    The AST starts as `write_random_checkpoint` writes one (seeded; non-zero [CLS], [DIST] and positions:
    an all-zero token would meet LayerNorm at zero variance).
    """

    def __init__(self, settings: PretrainSettings, num_words: int) -> None:
        super().__init__()
        with tempfile.TemporaryDirectory(prefix="ast_init.") as scratch:
            write_random_checkpoint("ast", scratch, size="base", seed=settings.seed, **settings.ast_config().to_dict())
            self.ast = ASTModel.from_pretrained(scratch)
        self.head = nn.Linear(settings.hidden_size, num_words)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.head(self.ast(fbank).last_hidden_state.mean(dim=1))


def is_complete(folder: Path, settings: PretrainSettings) -> bool:
    """True when `folder` holds a finished pretraining with these settings."""
    info = folder / INFO
    if not info.is_file():
        return False
    recorded = json.loads(info.read_text())
    return recorded.get("settings") == asdict(settings) and recorded.get("clips") == clip_settings()


def pretraining_features(settings: PretrainSettings, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unnormalised) Kaldi fbank (items, frames, 128) of every pretraining clip, and word labels."""
    words = PRETRAIN_WORDS[: settings.num_words]
    speakers = speaker_splits(settings.seed)["pretrain"][: settings.num_speakers]
    raw = FbankFrontEnd(settings.target_length, 128, mean=0.0, std=0.5)  # (x - 0) / (2 * 0.5): no normalisation
    total = len(words) * len(speakers) * settings.clips_per_speaker
    features, labels = [], []
    clips = synthesize_clips(words, speakers, settings.clips_per_speaker, seed=settings.seed)
    for label, clip in tqdm(clips, total=total, desc="pretraining data", unit="clip", disable=not progress):
        features.append(raw.single(torch.from_numpy(clip)))
        labels.append(label)
    return torch.stack(features), torch.tensor(labels)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(folder: str | os.PathLike, settings: PretrainSettings = PretrainSettings(), progress: bool = True) -> Path:
    """Pretrain (or reuse) the AST in `folder`; returns the folder.

    Runs on one CPU thread: the same weights on any machine, and small matrices gain little from threads.
    """
    folder = Path(folder)
    if is_complete(folder, settings):
        return folder
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(folder, settings, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(folder: Path, settings: PretrainSettings, progress: bool) -> Path:
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    features, labels = pretraining_features(settings, progress)
    mean, std = features.mean().item(), features.std().item()
    features = (features - mean) / (2 * std)

    model = WordClassifier(settings, len(labels.unique()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(labels) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _cosine_lr(step, total, min(100, total // 10 + 1))
    )
    augment = SpecAugment(freq_mask=16, time_mask=20)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    correct = seen = 0
    with tqdm(total=total, desc="pretraining AST", unit="step", disable=not progress) as bar:
        for epoch in range(settings.epochs):
            order = torch.randperm(len(labels), generator=generator)
            correct = seen = 0
            for batch in order.split(settings.batch_size):
                logits = model(augment(features[batch]))
                loss = nn.functional.cross_entropy(logits, labels[batch], label_smoothing=0.1)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                correct += (logits.argmax(-1) == labels[batch]).sum().item()
                seen += len(batch)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.2f}", train_acc=f"{correct / seen:.2f}")

    building = staging_folder(folder)
    try:
        model.ast.save_pretrained(building)
        follow_umask(building)  # transformers writes model.safetensors 0600
        write_json_atomic(building / "preprocessor_config.json", ast_preprocessor_config(model.ast.config, mean, std))
        info = {
            "settings": asdict(settings),
            "clips": clip_settings(),
            "words": list(PRETRAIN_WORDS[: settings.num_words]),
            "items": len(labels),
            "last_epoch_train_accuracy": correct / max(1, seen),
            "parameters": sum(p.numel() for p in model.ast.parameters()),
            "seconds": round(time.perf_counter() - start, 1),
        }
        write_json_atomic(building / INFO, info)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(building, folder)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return folder


def random_init_backbone(kind: str, source: str, target_length: int, seed: int = 0, **options):
    """The backbone `source` describes (config and preprocessor) with random weights instead of its own.

    The control of linear probing (`recipes/GSC/hparams/linear_random_init.yaml`): same architecture,
    same input normalisation, no pretraining. `options` go to `build_backbone`.
    """
    if kind != "ast":
        raise ValueError(f"random_init_backbone supports the ast backbone; got '{kind}'")
    config = ASTConfig.from_pretrained(source).to_dict()
    with tempfile.TemporaryDirectory(prefix="random_backbone.") as scratch:
        write_random_checkpoint(kind, scratch, size="base", seed=seed, **config)
        shutil.copyfile(Path(source) / "preprocessor_config.json", Path(scratch) / "preprocessor_config.json")
        return build_backbone(kind, scratch, target_length, **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_folder", required=True, help="the Hugging Face folder to write (or reuse)")
    defaults = PretrainSettings()
    for field in fields(PretrainSettings):
        parser.add_argument(f"--{field.name}", type=type(getattr(defaults, field.name)), default=None)
    args = parser.parse_args(argv)
    chosen = {f.name: getattr(args, f.name) for f in fields(PretrainSettings) if getattr(args, f.name) is not None}
    try:
        folder = pretrain(args.output_folder, PretrainSettings(**chosen))
    except SpeechSynthesisError as error:
        print(f"pretrain: error: {error}", file=sys.stderr)
        return 1
    info = json.loads((folder / INFO).read_text())
    accuracy = info["last_epoch_train_accuracy"]
    print(f"{folder}: {info['parameters']:,} parameters, last-epoch training accuracy {accuracy:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
