"""Many tasks on one frozen backbone: mixed batches, each clip through its own task's modules.

    classifier = MultiTaskClassifier(device="cpu")
    classifier.add_task("sounds", "exports/esc50_conformer")   # an export or a run folder
    classifier.add_task("words", "results/GSC/lora")
    probabilities = classifier.class_probabilities(wavs, wav_lens, ["sounds", "words", "words"])

A task is what one training run adds to the frozen backbone: its method's modules (adapters, Conformer adapters,
LoRA updates, BitFit biases, prompts, prefixes, Dense/Soft-MoA), the LayerNorms it trained, its final norm and
its head. Tasks trained on the same backbone (kind, checkpoint and revision: export.json's, or the run's
`backbone_source` hashed the same way) share one copy of it; full fine-tuning (which changes the backbone) and
merged-LoRA exports (whose backbone is another one) cannot share and are refused in one line.

Routing. Every place where some task injects a module holds one routed module with an entry per task; one call
carries the batch rows of each task (`ForwardState.task_rows`) and each entry runs on its task's rows only:
adapters and mixtures beside a sub-layer (`RoutedSublayer`), LoRA updates and BitFit's bias changes on a Linear
(`RoutedLinear`), trained LayerNorms (`RoutedNorm`), prefixes (`RoutedAttention`: the frozen attention for the
other rows), prompts (`RoutedPrompts`: each task's prompts in its rows; rows with fewer prompts are padded at the
end and masked, so they compute what they compute alone). The frozen backbone runs once for the whole batch.
Tasks whose inputs differ (AST's `target_length`, Whisper's window) run in one group per input, each group a
backbone whose tensors are the first group's except those the input changes (the positional table).

Exactness is the contract: each clip's probabilities equal its task's own `AudioClassifier` on that clip (float
rounding aside), whatever the other clips of the batch.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import DEFAULT_SOURCES, build_backbone
from .backbones.base import Backbone, ClipFrontEnd, ForwardState
from .data import read_audio
from .export import backbone_revision
from .inference import AudioClassifier
from .methods.adapter import AdaptedSublayer
from .methods.base import PETLModule
from .methods.lora import LoRALinear, LoRAUpdate
from .methods.prompt import PrefixAttention, PromptTokens
from .model import ClassificationHead, PETLModel
from .run_folder import EXPORT_INFO, InferenceError, is_export

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")


@contextmanager
def restricted(state: ForwardState, rows: torch.Tensor) -> Iterator[None]:
    """Within the block, the state describes the sub-batch `rows` of the current batch (its padding mask and its
    tasks' rows, renumbered), so routed modules called on that sub-batch route it as they would the batch.
    """
    saved = state.padding_mask, state.task_rows
    if state.padding_mask is not None:
        state.padding_mask = state.padding_mask[rows]
    if state.task_rows is not None:
        size = 1 + max(int(rows.max()), *(int(task.max()) for task in state.task_rows.values()))
        position = torch.full((size,), -1, dtype=torch.long, device=rows.device)
        position[rows] = torch.arange(len(rows), device=rows.device)
        renumbered = {name: position[task] for name, task in state.task_rows.items()}
        state.task_rows = {name: task[task >= 0] for name, task in renumbered.items() if bool((task >= 0).any())}
    try:
        yield
    finally:
        state.padding_mask, state.task_rows = saved


def _rows(state: ForwardState, entries: nn.ModuleDict | dict) -> Iterator[tuple[str, torch.Tensor]]:
    for name, rows in (state.task_rows or {}).items():
        if name in entries:
            yield name, rows


class _Routed(nn.Module):
    """A frozen module with entries per task beside it, routed by the shared `ForwardState.task_rows`.

    `ENTRIES` names the per-task dicts (`remove` drops a task from each); the state is held, not registered as a
    submodule (it is none).
    """

    ENTRIES: tuple[str, ...] = ()

    def __init__(self, state: ForwardState) -> None:
        super().__init__()
        object.__setattr__(self, "state", state)

    def remove(self, task: str) -> None:
        for name in self.ENTRIES:
            entries = getattr(self, name)
            if task in entries:
                del entries[task]


class RoutedSublayer(_Routed):
    """A frozen sub-layer with, per task, the module an adapter or a mixture put beside or after it.

    Per task as `AdaptedSublayer` computes it: parallel, sub-layer(x) + m(x); sequential, m(sub-layer(x)); with
    `residual`, m(h) + h. Rows of tasks without a module here get the sub-layer's output.
    """

    ENTRIES = ("modules_by_task", "placement")

    def __init__(self, sublayer: nn.Module, state: ForwardState) -> None:
        super().__init__(state)
        self.sublayer = sublayer
        self.modules_by_task = nn.ModuleDict()
        self.placement: dict[str, tuple[bool, bool]] = {}  # task -> (parallel, residual)

    def add(self, task: str, module: nn.Module, parallel: bool, residual: bool) -> None:
        self.modules_by_task[task] = module
        self.placement[task] = (parallel, residual)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        output = self.sublayer(hidden_states, *args, **kwargs)
        main = output[0] if isinstance(output, tuple) else output
        adapted = main
        for task, rows in _rows(self.state, self.modules_by_task):
            parallel, residual = self.placement[task]
            source = hidden_states[rows] if parallel else main[rows]
            mask = None if self.state.padding_mask is None else self.state.padding_mask[rows]
            delta = self.modules_by_task[task](source, mask)
            if residual:
                delta = delta + source
            adapted = adapted.index_copy(0, rows, main[rows] + delta if parallel else delta)
        return (adapted, *output[1:]) if isinstance(output, tuple) else adapted


class RoutedAttention(_Routed):
    """The frozen attention, and per task with prefixes its `PrefixAttention` on that task's rows."""

    ENTRIES = ("prefixes",)

    def __init__(self, attention: nn.Module, state: ForwardState) -> None:
        super().__init__(state)
        self.attention = attention
        self.prefixes = nn.ModuleDict()

    def add(self, task: str, prefix_attention: PrefixAttention) -> None:
        self.prefixes[task] = prefix_attention

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        output = self.attention(hidden_states, *args, **kwargs)
        main = output[0] if isinstance(output, tuple) else output
        for task, rows in _rows(self.state, self.prefixes):
            with restricted(self.state, rows):
                prefixed = self.prefixes[task](hidden_states[rows])
            main = main.index_copy(0, rows, prefixed[0] if isinstance(prefixed, tuple) else prefixed)
        return (main, *output[1:]) if isinstance(output, tuple) else main


class RoutedLinear(_Routed):
    """A frozen Linear plus, per task, its LoRA update and the change BitFit made to its bias."""

    ENTRIES = ("updates", "bias_changes")

    def __init__(self, base: nn.Linear, state: ForwardState) -> None:
        super().__init__(state)
        self.base = base
        self.updates = nn.ModuleDict()  # task -> LoRAUpdate
        self.bias_changes = nn.ParameterDict()  # task -> trained bias - frozen bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base(x)
        for task, rows in _rows(self.state, self.updates):
            output = output.index_add(0, rows, self.updates[task](x[rows]))
        for task, rows in _rows(self.state, self.bias_changes):
            output = output.index_add(0, rows, self.bias_changes[task].expand_as(output[rows]))
        return output


class RoutedNorm(_Routed):
    """A frozen LayerNorm and, per task that trained it (sub-layer norms, BitFit's biases), the task's copy."""

    ENTRIES = ("trained",)

    def __init__(self, norm: nn.LayerNorm, state: ForwardState) -> None:
        super().__init__(state)
        self.norm = norm
        self.trained = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.norm(x)
        for task, rows in _rows(self.state, self.trained):
            output = output.index_copy(0, rows, self.trained[task](x[rows]))
        return output


class RoutedPrompts(_Routed):
    """Each task's prompt tokens (`PromptTokens`) in its rows; the token hook of a routed backbone.

    Before the first layer, each prompted row becomes [front, its prompts, the rest] (its task's insertion point
    and replaced special tokens); rows of other tasks keep their tokens. Shorter rows are padded at the end and
    the padding is masked, so no row sees another's length. Deep prompts replace their task's prompt outputs
    before every later layer.
    """

    ENTRIES = ("prompts",)

    def __init__(self, state: ForwardState) -> None:
        super().__init__(state)
        self.prompts = nn.ModuleDict()
        self._spans: dict[str, tuple[int, int]] = {}  # task -> (start, length) of its prompts in this forward

    def forward(self, layer_index: int, tokens: torch.Tensor, mask: torch.Tensor | None):
        routed = dict(_rows(self.state, self.prompts))
        if not routed:
            return tokens, mask
        if layer_index > 0:
            for task, rows in routed.items():
                hook = self.prompts[task]
                if hook.deep:
                    start, length = self._spans[task]
                    tokens = tokens.clone()
                    tokens[rows, start : start + length] = hook.prompts[layer_index].to(tokens.dtype)
            return tokens, mask
        batch, length = tokens.shape[:2]
        real = mask if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
        sequences, masks = list(tokens.unbind(0)), list(real.unbind(0))
        for task, rows in routed.items():
            hook = self.prompts[task]
            start, count = hook.insert_at, hook.prompts.shape[1]
            prompts = hook.prompts[0].to(tokens.dtype)
            on = torch.ones(count, dtype=torch.bool, device=tokens.device)
            for row in rows.tolist():
                sequences[row] = torch.cat([tokens[row, :start], prompts, tokens[row, start + hook.replace :]])
                masks[row] = torch.cat([real[row, :start], on, real[row, start + hook.replace :]])
            self._spans[task] = (start, count)
        longest = max(len(sequence) for sequence in sequences)
        tokens = torch.stack([F.pad(s, (0, 0, 0, longest - len(s))) for s in sequences])
        mask = torch.stack([F.pad(m, (0, longest - len(m)), value=False) for m in masks])
        return tokens, mask


@dataclass
class Task:
    """One task: its name, classes, where it came from, and what it adds beside the routed modules."""

    name: str
    origin: str  # where it came from: the run or export folder
    method: str
    classes: list[str]
    trainable_parameters: int
    group: str  # the key of its input group
    final_norm: nn.Module | None
    head: ClassificationHead


class _Group:
    """The tasks of one input (front end and positional table) and the backbone they are routed through."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        # Model-relative name -> the frozen module, recorded before any wrapping, so that a task's module found
        # by name reaches the frozen one wherever earlier tasks' routed modules moved it.
        self.original = dict(backbone.model.named_modules())
        self.prompts: RoutedPrompts | None = None


def _replace(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `target` is a direct child in `root`'s tree."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if child is target and module is not new:
                setattr(module, name, new)


class MultiTaskClassifier(nn.Module):
    """One frozen backbone, many tasks; `class_probabilities` scores a batch whose clips belong to any of them."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.tasks: dict[str, Task] = {}
        self.heads = nn.ModuleDict()  # what each task keeps outside the backbone: final norm and head
        self.backbones = nn.ModuleDict()  # one per input group (registered: .to() and .eval() reach them)
        self._groups: dict[str, _Group] = {}
        self._backbone_identity: tuple[str, dict] | None = None
        self.state = ForwardState()

    # --- tasks ---------------------------------------------------------------------------------------------

    @property
    def backbone_kind(self) -> str | None:
        """The `backbone` kind the loaded tasks share (None before the first task)."""
        return self._backbone_identity[0] if self._backbone_identity else None

    def add_task(self, name: str, folder: str | Path, overrides: dict | None = None) -> Task:
        """Load the run or export in `folder` as task `name`; refuses, in one line, what cannot share."""
        self._check_name(name)
        folder = Path(folder).expanduser().resolve()
        info = json.loads((folder / EXPORT_INFO).read_text()) if is_export(folder) else None
        if info is not None and info.get("merged"):
            raise InferenceError(
                f"task {name} ({folder}): a merged-LoRA export carries a backbone of its own; export the run "
                "without --merge to share one"
            )
        # freeze_params=False keeps requires_grad as the method set it: it says which tensors the task trained.
        classifier = AudioClassifier.from_hparams(
            folder, overrides=overrides, run_opts={"device": "cpu"}, freeze_params=False
        )
        hparams = classifier.hparams
        kind = str(hparams.backbone)
        source = str(hparams.backbone_source or DEFAULT_SOURCES[kind])
        revision = info["backbone"]["revision"] if info is not None else None
        options = {"target_length": getattr(hparams, "target_length", 1024)}
        options["whisper_window"] = getattr(hparams, "whisper_window", "clip")
        origin = f"{name} ({folder})"
        return self.add_model(name, classifier.mods.model, classifier.classes, kind, source, options, revision, origin)

    def add_model(
        self,
        name: str,
        model: PETLModel,
        classes: Sequence[str],
        kind: str,
        source: str,
        options: dict,
        revision: dict | None = None,
        origin: str | None = None,
    ) -> Task:
        """Add a trained `model` (built by `build_backbone(kind, source, **options)` plus its method) as task
        `name`; its method's modules move into the shared backbone. `revision` identifies the backbone (an export's;
        None: computed from `source`).
        """
        self._check_name(name)
        origin = origin or name
        if model.method.trains_backbone:
            raise InferenceError(
                f"task {origin}: {model.method.display_name} changed the backbone itself; it cannot share one"
            )
        revision = revision if revision is not None else backbone_revision(source)
        identity = (kind, {key: value for key, value in revision.items() if key != "path"})
        if self._backbone_identity is not None and identity != self._backbone_identity:
            raise InferenceError(
                f"task {origin} was trained on another backbone ({kind} {revision}); the loaded tasks "
                f"share {self._backbone_identity[0]} {self._backbone_identity[1]}"
            )
        key = json.dumps(model.backbone.input_settings(), sort_keys=True)
        if key not in self._groups:
            self._groups[key] = self._new_group(kind, source, options)
            self.backbones[f"group{len(self.backbones)}"] = self._groups[key].backbone
        group = self._groups[key]
        groups = model.trainable_parameter_groups()
        self._route(name, model.backbone, group)
        final_norm = copy.deepcopy(model.backbone.final_norm)
        self.heads[name] = nn.ModuleDict({"head": model.head, **({"final_norm": final_norm} if final_norm else {})})
        task = Task(name, origin, model.method.display_name, list(classes), sum(groups.values()), key,
                    final_norm, model.head)  # fmt: skip
        self.tasks[name] = task
        self._backbone_identity = identity
        self.eval().to(self.device)
        return task

    def _check_name(self, name: str) -> None:
        if not TASK_NAME.match(name or ""):
            raise InferenceError(f"task name {name!r}: use letters, digits, _ and - (starting with a letter or digit)")
        if name in self.tasks or name == "all":
            raise InferenceError(f"task name {name!r} is taken; choose another")

    def remove_task(self, name: str) -> None:
        """Drop task `name` and every module it added; the other tasks are untouched."""
        if name not in self.tasks:
            raise InferenceError(f"no task {name!r}; the tasks are {', '.join(self.tasks) or 'none'}")
        task = self.tasks.pop(name)
        del self.heads[name]
        group = self._groups[task.group]
        for module in group.backbone.modules():
            if isinstance(module, _Routed):
                module.remove(name)
        if not any(other.group == task.group for other in self.tasks.values()):
            for key, backbone in list(self.backbones.items()):
                if backbone is group.backbone:
                    del self.backbones[key]
            del self._groups[task.group]
        if not self.tasks:
            self._backbone_identity = None

    def _new_group(self, kind: str, source: str, options: dict) -> _Group:
        backbone = build_backbone(kind, source, **options).eval()
        backbone.requires_grad_(False)
        backbone.state = self.state
        if self._groups:  # share every tensor the input does not change with the first group's backbone
            first = next(iter(self._groups.values())).original  # by the frozen modules' own names
            for name, module in backbone.model.named_modules():
                twin_module = first.get(name)
                for attribute, parameter in list(module.named_parameters(recurse=False)):
                    twin = getattr(twin_module, attribute, None)
                    if isinstance(twin, nn.Parameter) and twin.shape == parameter.shape:
                        if torch.equal(twin.detach().cpu(), parameter.detach().cpu()):
                            setattr(module, attribute, twin)
        return _Group(backbone.to(self.device))

    def _route(self, name: str, trained: Backbone, group: _Group) -> None:
        """Move what task `name` added to its own backbone (`trained`) into routed modules of `group`'s."""
        shared = group.backbone
        for trained_layer, layer in zip(trained.layers, shared.layers):
            for attribute in (shared.attention_name, shared.ffn_name):
                module = getattr(trained_layer, attribute)
                if isinstance(module, AdaptedSublayer):
                    self._routed_sublayer(layer, attribute).add(name, module.module, module.parallel, module.residual)
                elif isinstance(module, PrefixAttention):
                    frozen = self._frozen_attention(layer, shared.attention_name)
                    prefix = PrefixAttention(
                        frozen,
                        shared.projection_names,
                        shared.num_heads,
                        module.prefix,
                        self.state,
                        shared.attention_logit_bias,
                        shared.attention_result,
                    )
                    self._routed_attention(layer, shared.attention_name).add(name, prefix)
        trained_modules = dict(trained.model.named_modules())
        for module_name, module in trained_modules.items():
            original = group.original.get(module_name)
            if original is None:
                continue
            if isinstance(module, LoRALinear):
                self._routed_linear(shared, original).updates[name] = module.lora
            elif isinstance(module, nn.Linear) and module.bias is not None and module.bias.requires_grad:
                change = (module.bias.detach() - original.bias.detach()).to(self.device)
                self._routed_linear(shared, original).bias_changes[name] = nn.Parameter(change, requires_grad=False)
            elif (
                isinstance(module, nn.LayerNorm)
                and module is not trained.final_norm
                and any(parameter.requires_grad for parameter in module.parameters())
            ):
                self._routed_norm(shared, original).trained[name] = module
        for hook in trained.token_hooks:
            if not isinstance(hook, PromptTokens):
                raise InferenceError(f"task {name}: its backbone has a token hook of an unknown kind ({hook})")
            if group.prompts is None:
                group.prompts = RoutedPrompts(self.state)
                shared.token_hooks.append(group.prompts)
            group.prompts.prompts[name] = hook
        for module in trained.modules():  # what a routed copy holds must not train or drift
            if isinstance(module, (PETLModule, LoRAUpdate)):
                module.eval()

    # Routed modules are created once per place and found again by the next task.

    def _routed_sublayer(self, layer: nn.Module, attribute: str) -> RoutedSublayer:
        current = getattr(layer, attribute)
        if not isinstance(current, RoutedSublayer):
            current = RoutedSublayer(current, self.state)
            setattr(layer, attribute, current)
        return current

    def _routed_attention(self, layer: nn.Module, attribute: str) -> RoutedAttention:
        holder, name = layer, attribute
        if isinstance(getattr(layer, attribute), RoutedSublayer):  # prefixes sit inside the adapters' routing
            holder, name = getattr(layer, attribute), "sublayer"
        current = getattr(holder, name)
        if not isinstance(current, RoutedAttention):
            current = RoutedAttention(current, self.state)
            setattr(holder, name, current)
        return current

    def _frozen_attention(self, layer: nn.Module, attribute: str) -> nn.Module:
        module = getattr(layer, attribute)
        while isinstance(module, (RoutedSublayer, RoutedAttention)):
            module = module.sublayer if isinstance(module, RoutedSublayer) else module.attention
        return module

    def _routed_linear(self, backbone: Backbone, original: nn.Linear) -> RoutedLinear:
        return self._routed_around(backbone, original, RoutedLinear)

    def _routed_norm(self, backbone: Backbone, original: nn.LayerNorm) -> RoutedNorm:
        return self._routed_around(backbone, original, RoutedNorm)

    def _routed_around(self, backbone: Backbone, original: nn.Module, kind: type) -> nn.Module:
        """The routed module of class `kind` around the frozen `original`, put in its place the first time."""
        for module in backbone.modules():
            if isinstance(module, kind) and next(module.children()) is original:
                return module
        routed = kind(original, self.state)
        _replace(backbone, original, routed)
        return routed

    # --- scoring ---------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> MultiTaskClassifier:
        return super().train(False)  # inference only: dropout off, BatchNorm statistics fixed

    @torch.no_grad()
    def class_probabilities(
        self, wavs: torch.Tensor, wav_lens: torch.Tensor | None, tasks: Sequence[str]
    ) -> list[torch.Tensor]:
        """Waveforms (batch, samples) with SpeechBrain relative lengths, and the task of each row -> each row's
        class probabilities over its task's classes (one backbone forward per input group).
        """
        wavs = wavs[None] if wavs.dim() == 1 else wavs
        if len(tasks) != len(wavs):
            raise InferenceError(f"{len(wavs)} clips but {len(tasks)} task names; give one task per clip")
        unknown = sorted({task for task in tasks if task not in self.tasks})
        if unknown:
            raise InferenceError(f"no task {unknown[0]!r}; the tasks are {', '.join(self.tasks) or 'none'}")
        wavs = wavs.to(self.device, torch.float32)
        wav_lens = None if wav_lens is None else wav_lens.to(self.device)
        results: list[torch.Tensor | None] = [None] * len(tasks)
        for key, group in self._groups.items():
            members = [index for index, task in enumerate(tasks) if self.tasks[task].group == key]
            if not members:
                continue
            rows = torch.tensor(members, device=self.device)
            names = [tasks[index] for index in members]
            self.state.task_rows = {
                name: torch.tensor([i for i, task in enumerate(names) if task == name], device=self.device)
                for name in dict.fromkeys(names)
            }
            try:
                tokens, mask = group.backbone(wavs[rows], None if wav_lens is None else wav_lens[rows])
                for name, task_rows in self.state.task_rows.items():
                    task_tokens = tokens[task_rows]
                    task_mask = None if mask is None else mask[task_rows]
                    parts = self.heads[name]
                    if "final_norm" in parts:
                        task_tokens = parts["final_norm"](task_tokens)
                    logits = parts["head"](task_tokens, task_mask)
                    for position, probabilities in zip(task_rows.tolist(), logits.float().softmax(-1).cpu()):
                        results[members[position]] = probabilities
            finally:
                self.state.task_rows = None
        return results

    def clip_input(self, wav: torch.Tensor, task: str) -> torch.Tensor:
        """One waveform (samples,) as `task`'s backbone reads it: the features (frames, bins) of a clip front end
        (AST's fbank, Whisper's log-mel), the waveform itself for a backbone without one.

        Features are computed clip by clip either way (`ClipFrontEnd`), so computing them here, ahead of the
        batch, changes no number; it lets a server run them outside the model's thread. `class_probabilities`
        takes a batch of them (stacked features, `wav_lens` None) for tasks of one `input_group`.
        """
        front_end = self._groups[self.tasks[task].group].backbone.front_end
        if isinstance(front_end, ClipFrontEnd):
            return front_end.single(wav.to(self.device, torch.float32))
        return wav

    def input_group(self, task: str) -> str:
        """The key of `task`'s input group: tasks with the same key read the same `clip_input`."""
        return self.tasks[task].group

    def sample_rate(self) -> int:
        """What every task's input waveforms must be (one backbone: one rate)."""
        return next(iter(self._groups.values())).backbone.sample_rate if self._groups else 16000

    def classify_files(
        self, paths: Sequence[str | Path], tasks: Sequence[str] | None = None, top_k: int = 5, batch_size: int = 16
    ) -> list[dict]:
        """Every file through each of `tasks` (None: all loaded tasks), in mixed batches of `batch_size` clips.

        One record per file: `{"file", "results": [{"task", "labels": [{"label", "score"}, ...]}]}`, each task's
        `top_k` classes best first with their probabilities, as `classify --json` lists a single run's.
        """
        names = list(self.tasks) if tasks is None else list(tasks)
        if not names:
            raise InferenceError("no task is loaded; add one with --task NAME=DIR")
        if top_k < 1:
            raise InferenceError(f"--top_k must be at least 1; got {top_k}")
        pairs = [(index, name) for index in range(len(paths)) for name in names]
        waveforms = [read_audio(path, self.sample_rate()) for path in paths]
        records = [{"file": str(path), "results": []} for path in paths]
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            clips = [waveforms[index] for index, _ in chunk]
            longest = max(len(clip) for clip in clips)
            wavs = torch.stack([F.pad(clip, (0, longest - len(clip))) for clip in clips])
            lens = torch.tensor([len(clip) / longest for clip in clips])
            for (index, name), probabilities in zip(chunk, self.class_probabilities(wavs, lens, [n for _, n in chunk])):
                classes = self.tasks[name].classes
                values, order = probabilities.topk(min(top_k, len(classes)))
                labels = [{"label": classes[i], "score": float(v)} for v, i in zip(values.tolist(), order.tolist())]
                records[index]["results"].append({"task": name, "labels": labels})
        return records
