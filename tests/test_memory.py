"""The plan's memory estimate: its parts, the budget verdict, and its error against measured
peak RSS of real training steps (in subprocesses, so other tests' memory does not count)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

import peftc
from peftc.planning import memory
from peftc.planning.graph import meta_graph
from peftc.planning.plan import PromptPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


def test_gradient_checkpointing_keeps_only_block_inputs() -> None:
    off = peftc.compile(["data.batch_size=4"]).memory
    on = peftc.compile(["data.batch_size=4", "trainer.gradient_checkpointing=true"]).memory
    assert on.activations < off.activations and on.base_weights == off.base_weights


def test_estimate_scales_with_batch_and_dtype() -> None:
    small, large = (peftc.compile([f"data.batch_size={b}"]).memory for b in (2, 8))
    assert large.activations == 4 * small.activations
    fp32, bf16 = (peftc.compile([f"model.dtype={d}"]) for d in ("float32", "bfloat16"))
    assert bf16.memory.base_weights * 2 == fp32.memory.base_weights == fp32.model.base_bytes


def test_trainable_state_is_weights_grads_and_two_adamw_moments() -> None:
    plan = peftc.compile(["peft.r=16"])
    assert plan.memory.gradients == 4 * plan.trainable_params
    assert plan.memory.optimizer_state == 2 * plan.memory.gradients


def test_shared_tensors_count_as_adapter_memory_but_not_as_trained_state() -> None:
    plan = peftc.compile(["peft=vera", "peft.r=32"])
    shared = sum(memory.FP32 * math.prod(t.shape) for t in plan.shared)
    assert shared > 0 and plan.memory.adapter_weights == 4 * plan.trainable_params + shared
    assert plan.memory.gradients == 4 * plan.trainable_params  # VeRA's projections are frozen


def test_budget_verdict_says_whether_it_fits_and_by_how_much() -> None:
    tight = peftc.compile(["budget.memory_gb=0.001"])
    roomy = peftc.compile(["budget.memory_gb=4"])
    assert tight.to_dict()["memory"]["budget"]["fits"] is False
    assert tight.to_dict()["memory"]["budget"]["margin_gb"] == pytest.approx(
        0.001 - tight.memory.total / 1024**3, abs=1e-4
    )
    assert roomy.to_dict()["memory"]["budget"]["fits"] is True
    assert "does NOT fit budget.memory_gb=0.001" in str(tight) and "fits in budget.memory_gb=4" in str(roomy)
    with pytest.raises(peftc.ConfigError, match="budget.memory_gb=-1.0: must be > 0"):
        peftc.compile(["budget.memory_gb=-1"])


def _prompt(width: int, tokens: int = 8, prefix_kv: bool = False) -> PromptPlan:
    return PromptPlan("test", tokens, 32, 2, 2, 1, {"embedding.weight": (tokens, width)}, prefix_kv=prefix_kv)


def test_prefix_tuning_adds_key_values_per_layer_and_input_prompts_lengthen_the_sequence() -> None:
    plan = peftc.compile(["data.batch_size=4"])
    run, graph = plan.spec, meta_graph(plan.spec.model, "AutoModelForCausalLM", {})
    args = (run, graph, plan.memory.base_weights, 0, 0)
    prefix = memory.estimate(*args, prompt=_prompt(width=2 * 2 * 32, prefix_kv=True))  # layers x 2 x kv width
    prompt = memory.estimate(*args, prompt=_prompt(width=64))
    plain = memory.estimate(*args)
    assert prefix.prefix_kv == 4 * 8 * 2 * 2 * 32 * 4 and prompt.prefix_kv == 0
    assert prefix.activations > plain.activations and prompt.activations > plain.activations
    assert (
        peftc.compile(["peft=prefix_tuning"]).prompt.prefix_kv and not peftc.compile(["peft=p_tuning"]).prompt.prefix_kv
    )


# What each strategy shards across processes (FSDP full sharding; DeepSpeed ZeRO stages 1-3).
SHARDED_BY = {
    "fsdp": {"base_weights", "adapter_weights", "gradients", "optimizer_state"},
    "deepspeed_stage_1": {"optimizer_state"},
    "deepspeed_stage_2": {"gradients", "optimizer_state"},
    "deepspeed_stage_3": {"base_weights", "adapter_weights", "gradients", "optimizer_state"},
    "deepspeed": {"gradients", "optimizer_state"},  # Lightning's "deepspeed" is ZeRO stage 2
}


@pytest.mark.parametrize("strategy", sorted(SHARDED_BY))
def test_sharding_strategies_divide_what_they_shard(strategy: str) -> None:
    plan = peftc.compile([])
    run = plan.spec.replace(trainer=plan.spec.trainer.replace(strategy=strategy, devices=2, accelerator="gpu"))
    graph = meta_graph(run.model, "AutoModelForCausalLM", {})
    sharded = memory.estimate(run, graph, plan.memory.base_weights, plan.memory.adapter_weights, plan.trainable_params)
    for part in ("base_weights", "adapter_weights", "gradients", "optimizer_state"):
        whole = getattr(plan.memory, part)
        assert getattr(sharded, part) == ((whole + 1) // 2 if part in SHARDED_BY[strategy] else whole), part
    assert sharded.activations == plan.memory.activations


def test_sharding_divides_over_every_process_of_every_node() -> None:
    plan = peftc.compile([])
    trainer = plan.spec.trainer.replace(strategy="fsdp", devices=2, num_nodes=2, accelerator="gpu")
    run = plan.spec.replace(trainer=trainer)
    graph = meta_graph(run.model, "AutoModelForCausalLM", {})
    sharded = memory.estimate(run, graph, plan.memory.base_weights, plan.memory.adapter_weights, plan.trainable_params)
    assert sharded.optimizer_state == (plan.memory.optimizer_state + 3) // 4
    assert sharded.base_weights == (plan.memory.base_weights + 3) // 4


def test_an_encoder_decoders_decoder_activations_follow_the_target_length() -> None:
    """seq2seq: the decoder blocks and the logits run over task.max_target_length, not
    data.max_length: shorter targets, fewer activations at the same source length."""
    short, long = (
        peftc.compile(["task=seq2seq_lm", "model=tiny_t5", "data.max_length=64", f"task.max_target_length={n}"])
        for n in (16, 64)
    )
    assert short.memory.activations < long.memory.activations
    assert short.memory.base_weights == long.memory.base_weights


def test_16_bit_activations_add_a_float32_copy_of_each_adapted_input() -> None:
    """bf16-mixed: adapters compute in float32, so each adapted site saves a float32 copy of its
    input: batch x length x sum of adapted in_features x 4 bytes (no dropout here)."""
    plan = peftc.compile(["trainer.precision=bf16-mixed", "peft.lora_dropout=0"])
    run, graph = plan.spec, meta_graph(plan.spec.model, "AutoModelForCausalLM", {})
    with_sites = memory.estimate(run, graph, plan.memory.base_weights, 0, 0, sites=plan.sites)
    without = memory.estimate(run, graph, plan.memory.base_weights, 0, 0)
    tokens = run.data.batch_size * run.data.max_length
    widths = sum(site.in_features for site in plan.sites)
    assert with_sites.activations == plan.memory.activations
    assert with_sites.activations - without.activations == tokens * widths * 4


def test_lora_dropout_adds_a_copy_of_each_adapted_input_and_its_mask() -> None:
    """With lora_dropout > 0 the adapter's dropped-out input is saved for backward (plus a 1-byte
    mask per element): batch x length x sum of adapted in_features x (4 + 1) bytes in float32."""
    plain, dropped = (peftc.compile([f"peft.lora_dropout={p}"]) for p in (0.0, 0.1))
    tokens = plain.spec.data.batch_size * plain.spec.data.max_length
    widths = sum(site.in_features for site in plain.sites)
    assert dropped.memory.activations - plain.memory.activations == tokens * widths * (4 + 1)


# Stated error of the estimate against live peak memory (see experiments/RESULTS.md).
TOLERANCE = 0.15


@pytest.mark.slow
@pytest.mark.parametrize("config", ["test: small lora q,v b=8", "test: small all-linear grad-ckpt"])
def test_estimate_is_within_stated_error_of_measured_peak_rss(config: str) -> None:
    from measure_memory import CONFIGS, measure_in_subprocess

    result = measure_in_subprocess(CONFIGS[config], steps=2, live=True)
    assert abs(result["error"]) <= TOLERANCE, result


def test_the_estimate_follows_the_trainers_precision() -> None:
    """Mixed precision: 16-bit activations, float32 adapters and optimizer state; bf16-true:
    everything trained in 16 bits."""
    import peftc

    full, mixed, true16 = (
        peftc.compile([f"trainer.precision={p}"]).memory for p in ("32-true", "bf16-mixed", "bf16-true")
    )
    assert mixed.activations < full.activations and true16.activations == mixed.activations
    assert (mixed.gradients, mixed.optimizer_state, mixed.adapter_weights) == (
        full.gradients,
        full.optimizer_state,
        full.adapter_weights,
    )
    assert (true16.gradients * 2, true16.optimizer_state * 2) == (full.gradients, full.optimizer_state)
    assert any("bf16-mixed: activations in 16 bits" in note for note in mixed.notes)
