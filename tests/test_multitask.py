"""Many tasks on one frozen backbone: a mixed batch scores each clip as its own task's classifier does.

Tasks are real recipe runs (one epoch of generated GSC on tiny backbones, every method, on AST with two input
lengths and on a padding-invariant Wav2Vec2), exported, with every trained tensor then moved by random noise so
that no module is near its zero initialisation: a clip routed through another task's modules, or through none,
scores differently.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from recipe_helpers import recipe_args, run_recipes, write_workspace
from safetensors.torch import load_file, save_file

from petl_modules import export
from petl_modules.inference import AudioClassifier
from petl_modules.multitask import MultiTaskClassifier, RoutedLinear, RoutedSublayer
from petl_modules.random_backbones import write_random_checkpoint
from petl_modules.run_folder import InferenceError

# name -> (backbone, method file, options): every method, structural variants, two AST input lengths.
AST_TASKS = {
    "linear": ("ast", "linear", []),
    "bitfit": ("ast", "bitfit", []),
    "shallow_prompts": ("ast", "prompt_tuning", ["--prompt_len=3"]),
    "deep_prompts": ("ast", "prompt_tuning", ["--prompt_len=5", "--deep_prompt=True"]),
    "prefix": ("ast", "prefix_tuning", ["--prefix_len=2"]),
    "lora": ("ast", "lora", ["--reduction_rate_lora=8", "--lora_targets=[q,k,v,o]"]),
    "houlsby": ("ast", "adapter", ["--reduction_rate=8", "--adapter_type=Houlsby"]),
    "sequential": ("ast", "adapter", ["--reduction_rate=8", "--seq_or_par=sequential", "--apply_residual=True"]),
    "conformer": ("ast", "conformer_adapter", ["--reduction_rate=8", "--kernel_size=4"]),
    "dense_moa": ("ast", "dense_moa", ["--reduction_rate_moa=8", "--num_adapters=2", "--location_moa=both"]),
    "soft_moa": ("ast", "soft_moa", ["--reduction_rate_moa=8", "--num_adapters=2", "--normalize=True"]),
    "longer_input": ("ast", "conformer_adapter", ["--reduction_rate=8", "--target_length=70"]),
}
WAV2VEC2_TASKS = {
    "w_lora": ("wav2vec2", "lora", ["--reduction_rate_lora=8"]),
    "w_conformer": ("wav2vec2", "conformer_adapter", ["--reduction_rate=8", "--kernel_size=3"]),
    "w_prompts": ("wav2vec2", "prompt_tuning", ["--prompt_len=3"]),
    "w_prefix": ("wav2vec2", "prefix_tuning", ["--prefix_len=2"]),
    "w_bitfit": ("wav2vec2", "bitfit", []),
    "w_soft_moa": ("wav2vec2", "soft_moa", ["--reduction_rate_moa=8", "--num_adapters=2"]),
}
REFUSED = {
    "full_ft": ("ast", "full_ft", []),
    "other_backbone": ("other_ast", "lora", []),
}


def perturb(folder, seed: int) -> None:
    """Move every trained tensor of an export by noise (BatchNorm variances stay positive)."""
    generator = torch.Generator().manual_seed(seed)
    path = folder / "trained.safetensors"
    state = load_file(str(path))
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator) * 0.3
        state[name] = tensor * (1 + noise.abs()) if name.endswith("running_var") else tensor + noise
    save_file(state, str(path))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask")
    workspace = write_workspace(root)
    # A padding-invariant Wav2Vec2 (LayerNorm CNN): a clip scores the same alone and in a padded batch.
    workspace["wav2vec2"] = write_random_checkpoint(
        "wav2vec2", root / "w2v_stable", do_stable_layer_norm=True, feat_extract_norm="layer"
    )
    workspace["other_ast"] = write_random_checkpoint("ast", root / "other_ast", seed=1)
    specs = {**AST_TASKS, **WAV2VEC2_TASKS, **REFUSED}
    commands = []
    for name, (backbone, method, options) in specs.items():
        kind = "ast" if backbone == "other_ast" else backbone
        args = recipe_args("GSC", method, workspace, root / "runs" / name, *options, backbone=kind)
        if backbone == "other_ast":
            args = [arg for arg in args if not arg.startswith("--backbone_source=")]
            args.append(f"--backbone_source={workspace['other_ast']}")
        commands.append(("GSC", args))
    outcomes = run_recipes(commands, root / "outcomes.json")
    folders = {}
    for seed, (name, outcome) in enumerate(zip(specs, outcomes)):
        assert outcome["code"] == 0, f"{name}: {outcome['message']}"
        folders[name] = root / "exports" / name
        export.export(root / "runs" / name, folders[name])
        perturb(folders[name], seed)
    export.export(root / "runs" / "lora", root / "exports" / "merged", merge=True)
    folders["merged"] = root / "exports" / "merged"
    return folders


def clips(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` random clips of 0.4 to 1 s, zero-padded into one batch, with their relative lengths."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [int(16000 * (0.4 + 0.6 * float(torch.rand((), generator=generator)))) for _ in range(count)]
    wavs = torch.zeros(count, max(lengths))
    for row, length in enumerate(lengths):
        wavs[row, :length] = torch.randn(length, generator=generator) * 0.1
    return wavs, torch.tensor(lengths) / max(lengths)


def alone(folder, wav: torch.Tensor) -> torch.Tensor:
    return AudioClassifier.from_hparams(folder, run_opts={"device": "cpu"}).class_probabilities(wav[None])[0]


@pytest.mark.parametrize("tasks", [AST_TASKS, WAV2VEC2_TASKS], ids=["ast", "wav2vec2"])
def test_mixed_batch_scores_each_clip_as_its_tasks_own_classifier(exports, tasks):
    classifier = MultiTaskClassifier()
    for name in tasks:
        classifier.add_task(name, exports[name])
    names = [name for name in tasks for _ in range(2)]
    random.Random(0).shuffle(names)
    wavs, lens = clips(len(names))
    mixed = classifier.class_probabilities(wavs, lens, names)
    own = {name: AudioClassifier.from_hparams(exports[name], run_opts={"device": "cpu"}) for name in tasks}
    for row, name in enumerate(names):
        length = round(float(lens[row]) * wavs.shape[1])
        expected = own[name].class_probabilities(wavs[row, :length][None])[0]
        torch.testing.assert_close(mixed[row], expected, rtol=0, atol=1e-5, msg=f"row {row}, task {name}")
    # The trained modules matter: the same clip through another task's modules scores differently.
    other = classifier.class_probabilities(wavs[:1], lens[:1], [next(n for n in tasks if n != names[0])])[0]
    assert other.shape != mixed[0].shape or not torch.allclose(other, mixed[0], atol=1e-3)


@pytest.mark.parametrize("tasks", [AST_TASKS, WAV2VEC2_TASKS], ids=["ast", "wav2vec2"])
def test_inputs_computed_ahead_score_as_each_tasks_own_classifier(exports, tasks):
    """The server's path: each clip's `clip_input` computed alone (features for AST, the waveform for Wav2Vec2),
    then batched per input group by the server's batcher."""
    from petl_modules.serve import Batcher, ServeSettings, _Pending

    classifier = MultiTaskClassifier()
    for name in tasks:
        classifier.add_task(name, exports[name])
    names = [name for name in tasks for _ in range(2)]
    random.Random(1).shuffle(names)
    wavs, lens = clips(len(names), seed=1)
    waveforms = [wav[: round(float(length) * wavs.shape[1])] for wav, length in zip(wavs, lens)]
    batch = [
        _Pending(classifier.clip_input(wav, name), name, classifier.input_group(name), None)
        for wav, name in zip(waveforms, names)
    ]
    scored = Batcher(classifier, ServeSettings(), metrics=None)._score(batch)
    for row, (wav, name) in enumerate(zip(waveforms, names)):
        torch.testing.assert_close(scored[row], alone(exports[name], wav), rtol=0, atol=1e-5, msg=f"row {row}")


def test_one_backbone_holds_the_tasks(exports):
    classifier = MultiTaskClassifier()
    for name in ("lora", "houlsby", "longer_input"):
        classifier.add_task(name, exports[name])
    backbones = list(classifier.backbones.values())
    assert len(backbones) == 2  # target_length 50 and 70: two inputs, one set of layer tensors
    first, second = (group.original for group in classifier._groups.values())
    tensors = [
        (f"{name}.{attribute}", parameter is getattr(first[name], attribute))
        for name, module in second.items()
        for attribute, parameter in module.named_parameters(recurse=False)
    ]
    assert [name for name, same in tensors if not same] == ["embeddings.position_embeddings"]
    frozen = sum(p.numel() for p in backbones[0].parameters() if not p.requires_grad)  # the tasks' own train
    assert frozen == AudioClassifier.from_hparams(exports["lora"]).mods.model.backbone_parameters()
    routed = [module for module in backbones[0].modules() if isinstance(module, (RoutedLinear, RoutedSublayer))]
    assert routed and all(len(getattr(m, "updates", getattr(m, "modules_by_task", {}))) == 1 for m in routed)


def test_tasks_come_and_go_without_changing_the_others(exports):
    classifier = MultiTaskClassifier()
    for name in ("lora", "conformer", "deep_prompts"):
        classifier.add_task(name, exports[name])
    wavs, lens = clips(3, seed=1)
    names = ["lora", "conformer", "deep_prompts"]
    before = classifier.class_probabilities(wavs, lens, names)
    classifier.remove_task("deep_prompts")
    classifier.add_task("prefix", exports["prefix"])
    after = classifier.class_probabilities(wavs[:2], lens[:2], names[:2])
    for row in range(2):
        torch.testing.assert_close(after[row], before[row], rtol=0, atol=1e-6)
    with pytest.raises(InferenceError, match=r"^no task 'deep_prompts'; the tasks are lora, conformer, prefix$"):
        classifier.class_probabilities(wavs[:1], lens[:1], ["deep_prompts"])
    for name in ("lora", "conformer", "prefix"):
        classifier.remove_task(name)
    assert not classifier.tasks and not len(classifier.backbones)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("full_ft", r"^task t \(.*full_ft\): full_ft changed the backbone itself; it cannot share one$"),
        ("merged", r"^task t \(.*merged\): a merged-LoRA export carries a backbone of its own; export the run"),
        ("other_backbone", r"^task t \(.*other_backbone\) was trained on another backbone \(ast "),
    ],
)
def test_what_cannot_share_the_backbone_is_refused_in_one_line(exports, name, message):
    classifier = MultiTaskClassifier()
    classifier.add_task("lora", exports["lora"])
    with pytest.raises(InferenceError, match=message):
        classifier.add_task("t", exports[name])
    assert list(classifier.tasks) == ["lora"]


def test_bad_names_and_batches_are_one_line_errors(exports):
    classifier = MultiTaskClassifier()
    classifier.add_task("lora", exports["lora"])
    with pytest.raises(InferenceError, match=r"^task name 'lora' is taken; choose another$"):
        classifier.add_task("lora", exports["bitfit"])
    with pytest.raises(InferenceError, match=r"^task name 'a b': use letters, digits"):
        classifier.add_task("a b", exports["bitfit"])
    wavs, lens = clips(2)
    with pytest.raises(InferenceError, match=r"^2 clips but 1 task names; give one task per clip$"):
        classifier.class_probabilities(wavs, lens, ["lora"])
    assert json.loads((exports["lora"] / "export.json").read_text())["method"] == "lora"


def test_classify_command_with_tasks_lists_each_tasks_labels_as_its_run_alone(exports, capsys):
    from trained_runs import manifest_items

    from petl_modules import classify

    files = [path for path, _ in manifest_items(exports["lora"].parent.parent / "runs" / "lora")][:3]
    tasks = ["lora", "deep_prompts", "longer_input"]
    records = classify.main([*(f"--task={name}={exports[name]}" for name in tasks), *files, "--top_k=2", "--json"])
    assert json.loads(capsys.readouterr().out) == records
    assert [record["file"] for record in records] == files
    for name in tasks:
        alone = classify.classify(str(exports[name]), files, top_k=2, device="cpu")
        for record, single in zip(records, alone):
            (result,) = [result for result in record["results"] if result["task"] == name]
            assert [entry["label"] for entry in result["labels"]] == [entry["label"] for entry in single["top_k"]]
            scores = [entry["score"] for entry in result["labels"]]
            assert scores == pytest.approx([entry["score"] for entry in single["top_k"]], abs=1e-5)
    text = classify.format_task_records(records)
    assert text.splitlines()[0] == f"{files[0]}:" and text.splitlines()[1].lstrip().startswith("lora ")


def test_classify_command_with_tasks_refuses_in_one_line(exports, capsys):
    from petl_modules import classify

    with pytest.raises(SystemExit, match=r"^classify: error: --task lora: expected NAME=DIR"):
        classify.main(["--task=lora", "x.wav"])
    with pytest.raises(SystemExit, match=r"^classify: error: --window_seconds goes with --run"):
        classify.main([f"--task=lora={exports['lora']}", "x.wav", "--window_seconds=1"])
    with pytest.raises(SystemExit, match=r"^classify: error: task t \(.*full_ft\): full_ft changed the backbone"):
        classify.main([f"--task=t={exports['full_ft']}", "x.wav"])


def test_serving_benchmark_rows_are_exact_and_share_the_backbone(tmp_path):
    from petl_apps import benchmark
    from petl_apps.serving_bench import SERVING_METHODS

    source = write_random_checkpoint("ast", tmp_path / "ast")
    out = tmp_path / "serving.json"
    argv = ["--serving", f"--backbone_source={source}", "--serving_tasks=1,8", "--batch_size=8"]
    assert benchmark.main([*argv, "--repeats=1", "--warmup=0", f"--json={out}"]) == 0
    one, eight = json.loads(out.read_text())["serving"]
    assert (one["tasks"], eight["tasks"]) == (1, 8) and eight["methods"] == list(SERVING_METHODS)
    assert one["max_abs_diff"] < 1e-5 and eight["max_abs_diff"] < 1e-5
    # Eight tasks on one backbone hold far less than eight backbones, and more than one task.
    assert eight["state_bytes"] < eight["separate_bytes"] / 4 and eight["state_bytes"] > one["state_bytes"]
    assert eight["mixed_s"] > 0 and eight["one_task_s"] > 0
