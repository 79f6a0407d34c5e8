"""The benchmark on tiny backbones: rows, closed-form FLOPs, memory probes, targets, command line."""

from __future__ import annotations

import json

import pytest
import torch

from petl_apps import benchmark
from petl_apps.benchmark import BenchmarkError, Row, Setup, check_targets, parse_rows
from petl_modules.random_backbones import write_random_checkpoint

D, FFN, LAYERS, CLASSES = 32, 64, 2, 10  # the tiny checkpoints' sizes; the benchmark's class count
FRAMES, BATCH = 100, 2
TOKENS = 12 * 9 + 2  # AST at 100 frames: 12 x 9 patches, [CLS], [DIST]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    kinds = ("ast", "wav2vec2", "data2vec", "wavlm", "whisper")
    return {kind: str(write_random_checkpoint(kind, root / kind)) for kind in kinds}


@pytest.fixture(scope="module")
def ast_setup(sources):
    return Setup("ast", sources["ast"], FRAMES, BATCH)


# Every method block in the papers' table order, then the reference rows: what `--methods=all` measures.
ALL_ROWS = [
    "linear",
    "full_ft",
    "bitfit",
    "prompt_tuning",
    "prefix_tuning",
    "lora",
    "adapter",
    "conformer_adapter",
    "dense_moa",
    "soft_moa",
    "frozen_input_grad",
    "forward_only",
    "linear_cached",
    "lora_merged",
]


def test_rows_are_the_method_blocks_and_the_references():
    assert parse_rows("all") == ALL_ROWS
    assert parse_rows("lora, full_ft+ckpt,forward_only") == ["lora", "full_ft+ckpt", "forward_only"]
    assert parse_rows("all,lora+ckpt,lora") == [*ALL_ROWS, "lora+ckpt"]
    with pytest.raises(BenchmarkError, match="--methods: unknown row 'lorra'; use all or any of linear"):
        parse_rows("lorra")
    with pytest.raises(BenchmarkError, match="unknown row 'forward_only\\+ckpt'"):
        parse_rows("forward_only+ckpt")


def backbone_flops(batch: int, tokens: int, patches: int) -> int:
    """Patch convolution, Q/K/V/O, attention (QK^T and AV), FFN, at 2 FLOPs per multiply-add."""
    patch_conv = 2 * patches * 16 * 16 * D
    per_layer = 4 * 2 * tokens * D * D + 2 * 2 * tokens * tokens * D + 2 * 2 * tokens * D * FFN
    return batch * (patch_conv + LAYERS * per_layer)


def test_forward_flops_match_the_closed_form(ast_setup):
    head = 2 * D * CLASSES
    linear = Row("linear", ast_setup).flops()
    assert linear["forward_flops"] == backbone_flops(BATCH, TOKENS, TOKENS - 2) + BATCH * head
    assert linear["injected_flops"] == 0 and linear["tokens"] == TOKENS
    cached = Row("linear_cached", ast_setup).flops()
    assert cached["forward_flops"] == BATCH * head  # the cached step runs the head alone


@pytest.mark.parametrize("slots", [1, 2])
def test_moa_layer_flops_match_the_closed_form(ast_setup, slots):
    """Dense: router, every expert on every token (down, up, biases mixed by the router weights).
    Soft: token-slot logits, dispatch, the experts on the slots only, combine. One mixture per layer (MHSA)."""
    experts, bottleneck = 3, 8
    options = {"num_adapters": experts, "reduction_rate_moa": D // bottleneck, "location_moa": "MHSA"}
    dense = Row("dense_moa", ast_setup, options=options).flops()["injected_flops"]
    soft = Row("soft_moa", ast_setup, options={**options, "num_slots": slots}).flops()["injected_flops"]
    t, n = TOKENS, experts * slots
    dense_layer = 2 * t * D * experts + 2 * t * D * experts * bottleneck * 2 + 2 * t * experts * D
    soft_layer = 2 * t * D * n * 2 + 2 * n * D * bottleneck * 2 + 2 * t * n * D
    assert dense == BATCH * LAYERS * dense_layer
    assert soft == BATCH * LAYERS * soft_layer


def test_reference_rows_do_what_they_say(ast_setup):
    floor = Row("frozen_input_grad", ast_setup)
    # What linear probing trains on AST: the head (weight, bias) and the final LayerNorm (weight, bias).
    assert sorted(p.numel() for p in floor.trainable) == sorted([D * CLASSES, CLASSES, D, D])
    seen = {}
    floor.model.backbone.layers[0].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.update(x=args[0]), with_kwargs=True
    )
    floor.step()
    assert seen["x"].grad is not None and seen["x"].grad.abs().sum() > 0  # the gradient reached the first layer
    assert all(p.grad is None for p in floor.model.backbone.model.parameters() if not p.requires_grad)

    merged = Row("lora_merged", ast_setup)
    assert not merged.trains and all(layer.merged for layer in merged.model.lora_layers())
    cached = Row("linear_cached", ast_setup)
    assert cached.pooled.shape == (BATCH, D)
    before = cached.model.head.linear.weight.detach().clone()
    cached.step()
    assert not torch.equal(before, cached.model.head.linear.weight)


def test_measure_gives_every_row_its_figures_and_ratios(ast_setup):
    rows = ["linear", "full_ft", "prefix_tuning", "frozen_input_grad", "forward_only", "linear_cached", "lora_merged"]
    results = benchmark.measure(ast_setup, rows, repeats=2, warmup=1, memory=False, timing=True, log=lambda _: None)
    by_name = {result["method"]: result for result in results}
    assert list(by_name) == rows
    for result in results:
        assert {
            "method",
            "step_s",
            "step_ratio_vs_full_ft",
            "forward_flops",
            "peak_mem_bytes",
            "infer_s",
        } <= result.keys()
        assert result["forward_flops"] > 0
    full_ft = by_name["full_ft"]
    for name in ("linear", "prefix_tuning", "linear_cached", "forward_only"):
        assert len(by_name[name]["step_times"]) == 2
        per_round = [a / b for a, b in zip(by_name[name]["step_times"], full_ft["step_times"])]
        assert by_name[name]["step_ratio_vs_full_ft"] == pytest.approx(sum(per_round) / 2)  # median of two
    assert by_name["lora_merged"]["step_s"] is None and by_name["lora_merged"]["infer_s"] > 0
    assert by_name["frozen_input_grad"]["step_ratio_vs_floor"] == 1.0
    prefix_len = 12  # prefix_tuning.yaml's default
    assert by_name["prefix_tuning"]["token_ratio"] == pytest.approx((TOKENS + prefix_len) / TOKENS)


def test_activation_bytes_leave_out_the_weights_autograd_keeps():
    # A frozen Linear keeps its weight for the input's gradient (resident anyway); GELU keeps its input.
    tokens, width, hidden = 5, 4, 6
    model = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU()).requires_grad_(False)
    inputs = torch.randn(tokens, width, requires_grad=True)
    gelu_input = tokens * hidden * 4  # float32
    assert benchmark.saved_activation_bytes(lambda: model(inputs), model) == gelu_input
    assert benchmark.saved_activation_bytes(lambda: model(inputs)) == gelu_input + hidden * width * 4


def test_time_ratios_pair_the_rounds():
    # Rounds 1-3: the row takes 2, 1 and 3 times the reference; a machine slowdown in round 3 hits both.
    row = {"step_times": [2.0, 4.0, 9.0], "step_s": 4.0}
    reference = {"step_times": [1.0, 4.0, 3.0], "step_s": 3.0}
    assert benchmark.paired_ratio(row, reference, "step") == 2.0  # not 4 / 3, the ratio of the medians
    unpaired = {"step_times": [3.0], "step_s": 3.0}
    assert benchmark.paired_ratio(row, unpaired, "step") == pytest.approx(4 / 3)
    assert benchmark.paired_ratio(row, {}, "step") is None


def synthetic(method: str, **figures) -> dict:
    return {"method": method, "backbone": "ast", "frames": 100, **figures}


def test_targets_are_decided_from_the_ratios():
    results = [
        synthetic("linear", step_s=1.0, step_times=[1.0, 1.0]),
        synthetic("linear_cached", step_s=0.04, step_times=[0.03, 0.05]),
        synthetic("lora", step_ratio_vs_floor=1.06),
        synthetic("prompt_tuning", step_ratio_vs_floor=1.2, token_ratio=1.2),
        synthetic("dense_moa", injected_flops=100),
        synthetic("soft_moa", injected_flops=36),
    ]
    verdicts = {check["target"]: check["ok"] for check in check_targets(results)}
    assert verdicts == {
        "linear_cached step / linear step": True,
        "lora step / frozen_input_grad step": False,  # 1.06 > 1.05
        "prompt_tuning step / frozen_input_grad step": True,  # within 1.05 x its token ratio
        "soft_moa MoA-layer FLOPs / dense_moa's": False,  # 0.36 > 0.35
    }


def test_memory_probe_sees_what_activation_checkpointing_saves(tmp_path):
    """In fresh processes (as the benchmark runs them), on a 12-layer AST (hidden 64, FFN 256) at 400 frames,
    batch 16, where activations dominate: full fine-tuning keeps every layer's activations for backward,
    checkpointing only each layer's input."""
    source = write_random_checkpoint(
        "ast", tmp_path / "ast12", hidden_size=64, num_hidden_layers=12, intermediate_size=256
    )
    setup = Setup("ast", str(source), 400, 16)
    points = benchmark.scaling(setup, ["full_ft", "full_ft+ckpt"], [400], [], steps=1, log=lambda _: None)
    assert [p["method"] for p in points] == ["full_ft", "full_ft+ckpt"]
    assert all("error" not in p and p["step_s"] > 0 for p in points), points
    plain, recomputed = (p["peak_mem_bytes"] for p in points)
    assert plain - recomputed > 40 * 2**20, (plain, recomputed)
    benchmark.plot_scaling(points, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_writes_the_json_and_prints_the_table(sources, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = benchmark.main(
        [
            f"--wav2vec2_source={sources['wav2vec2']}",
            "--methods=linear,lora,linear_cached,lora_merged,forward_only",
            "--frames=50",
            "--batch_size=2",
            "--repeats=1",
            "--warmup=0",
            "--no_memory",
            f"--json={out}",
        ]
    )
    assert code == 0
    written = json.loads(out.read_text())
    assert [row["method"] for row in written["rows"]] == [
        "linear",
        "lora",
        "linear_cached",
        "lora_merged",
        "forward_only",
    ]
    assert {row["backbone"] for row in written["rows"]} == {"wav2vec2"}
    table = capsys.readouterr().out
    assert "| backbone | method | step (s) |" in table and "| wav2vec2 | lora_merged |" in table


def test_rows_for_the_newer_encoders(sources, tmp_path):
    """Data2Vec-audio and WavLM take waveforms of the duration of `frames` fbank frames, like Wav2Vec2; Whisper
    takes log-mel features of `frames` frames (its clip window)."""
    out = tmp_path / "bench.json"
    options = ["--methods=lora", "--frames=50", "--batch_size=2", "--repeats=1", "--warmup=0", "--no_memory"]
    kinds = ("data2vec", "wavlm", "whisper")
    code = benchmark.main([*(f"--{kind}_source={sources[kind]}" for kind in kinds), *options, f"--json={out}"])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["backbone"], row["method"]) for row in rows] == [(kind, "lora") for kind in kinds]
    assert all(row["step_s"] > 0 and row["forward_flops"] > 0 for row in rows)


def test_bad_options_are_one_line_errors(sources, capsys):
    assert benchmark.main(["--methods=linear"]) == 2
    assert (
        "give --backbone_source DIR (AST) and/or --wav2vec2_source DIR (or --<kind>_source)" in capsys.readouterr().err
    )
    assert benchmark.main([f"--backbone_source={sources['ast']}", "--backbones=wav2vec2"]) == 2
    assert "--backbones wav2vec2 needs --wav2vec2_source DIR" in capsys.readouterr().err
    assert benchmark.main([f"--backbone_source={sources['ast']}", "--scaling", "--scaling_frames=100,x"]) == 2
    assert "--scaling_frames must be comma-separated integers; got '100,x'" in capsys.readouterr().err
