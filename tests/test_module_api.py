"""Every method's model is an ordinary nn.Module in every respect users rely on: `.to(dtype)`,
meta -> cpu, `.half()`, `.float()`, state_dict round trips, deepcopy, torch.compile of a block;
no peftc module overrides an nn.Module internal by accident; and training runs without a KV
cache, compiling each block once (trainer.compile=true).

Cases are every registered method (tests/test_precision.py's METHOD_CASES), so a new one is covered.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftc
import peftc.methods
import peftc.runtime
from tests.helpers import build_base
from tests.test_precision import METHOD_CASES, adapted_model, training_batch

# What a subclass of nn.Module is meant to define; anything else of nn.Module's that a peftc class
# redefines shadows torch's machinery (OFTLayer._apply once broke .to(), .half(), .cuda()).
MEANT_TO_BE_OVERRIDDEN = {"__init__", "forward", "extra_repr", "__getattr__"}
# What Python itself puts in every class body (3.13 added the last two).
CLASS_METADATA = {
    "__module__",
    "__qualname__",
    "__doc__",
    "__dict__",
    "__weakref__",
    "__annotations__",
    "__firstlineno__",
    "__static_attributes__",
}


def peftc_module_classes() -> list[type[nn.Module]]:
    """Every nn.Module subclass defined in peftc's methods and runtime (layers, encoders, wrappers)."""
    found: dict[str, type[nn.Module]] = {}
    for package in (peftc.methods, peftc.runtime):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            for _, cls in inspect.getmembers(importlib.import_module(info.name), inspect.isclass):
                if issubclass(cls, nn.Module) and cls.__module__.startswith("peftc."):
                    found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return list(found.values())


def test_no_peftc_module_redefines_an_nn_module_internal() -> None:
    classes = peftc_module_classes()
    registered = [
        m.layer_class if m.kind == "injectable" else m.encoder_class for m in peftc.methods.all_methods().values()
    ]
    assert set(registered) <= set(classes), "every method's layer or encoder class is inspected"
    shadowing = {
        cls.__qualname__: sorted(redefined)
        for cls in classes
        if (redefined := (set(vars(cls)) & set(dir(nn.Module))) - MEANT_TO_BE_OVERRIDDEN - CLASS_METADATA)
    }
    assert not shadowing, f"nn.Module attributes redefined: {shadowing}"


def forward_inputs(plan: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in training_batch(plan).items() if k != "labels"}


@torch.no_grad()
def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**inputs).logits.float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Within `tolerance` of the expected logits' scale (half precision rounds every product)."""
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= tolerance * scale, f"{tolerance=}"


def meta_built(case: str) -> nn.Module:
    """The case's model built on the meta device (no weights), then materialized on the CPU."""
    from transformers import AutoModelForCausalLM

    from peftc.planning.model_source import hf_config

    model, plan = adapted_model(case)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(hf_config(plan.spec.model))
    on_meta = peftc.materialize(plan, base_model=base)
    assert all(p.is_meta for p in on_meta.base_model.parameters()), "the base and its adapter layers on meta"
    on_meta.to_empty(device="cpu").to("cpu")
    on_meta.load_state_dict(model.state_dict())
    buffers = dict(model.named_buffers())
    with torch.no_grad():  # buffers outside the state dict (rotary frequencies) are the base's to restore
        for name, buffer in on_meta.named_buffers():
            buffer.copy_(buffers[name])
    return on_meta


@pytest.mark.parametrize("case", METHOD_CASES)
def test_method_model_survives_the_module_api(case: str) -> None:
    model, plan = adapted_model(case)
    inputs = forward_inputs(plan)
    expected = logits(model, inputs)

    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone, inputs), expected)
    own = {p.data_ptr() for p in model.parameters()}
    assert not own & {p.data_ptr() for p in clone.parameters()}, "deepcopy shares parameters"
    with torch.no_grad():
        for param in clone.parameters():
            if param.requires_grad:
                param.mul_(-1.5)
    assert not torch.allclose(logits(clone, inputs), expected), "the adapter must change the output"
    assert torch.equal(logits(model, inputs), expected), "the original moved with its copy"
    clone.load_state_dict(model.state_dict())
    assert torch.equal(logits(clone, inputs), expected), "state_dict round trip"

    clone.to(torch.bfloat16)
    assert {p.dtype for p in clone.parameters()} == {torch.bfloat16}
    assert_close(logits(clone, inputs), expected, 0.05)
    clone.float()
    assert {p.dtype for p in clone.parameters()} == {torch.float32}
    clone.half()
    assert {p.dtype for p in clone.parameters()} == {torch.float16}
    assert_close(logits(clone, inputs), expected, 0.02)

    assert torch.equal(logits(meta_built(case), inputs), expected), "meta -> cpu (to_empty) + state dict"


# Tracing a block costs ~1 s a case: the layers whose forward Dynamo could trip over (custom
# autograd Function, einsum rotations, a wrapped attention returning tuples).
COMPILED_CASES = ["lora", "oft", "adaption_prompt"]


@pytest.mark.parametrize("case", COMPILED_CASES)
def test_compiled_decoder_block_gives_the_eager_loss_and_gradients(case: str) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    model, plan = adapted_model(case)
    clone = copy.deepcopy(model)
    block = clone.base_model.model.layers[0]
    torch._dynamo.reset()  # every case's block shares one code object: start below the recompile limit
    counter = CompileCounterWithBackend("aot_eager")  # Dynamo and AOTAutograd as inductor sees them, no codegen
    block.compile(backend=counter)
    (loss, *grads), (expected, *expected_grads) = (loss_and_gradients(m, plan) for m in (clone, model))
    assert counter.frame_count >= 1, "the block ran compiled"
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def loss_and_gradients(model: nn.Module, plan: Any) -> list[torch.Tensor]:
    """The loss (no dropout) and the adapter's gradients."""
    loss = model.eval()(**training_batch(plan)).loss
    return [loss.detach(), *torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])]


# ------------------------------------------------------------------------- training forward
def fit_lora(tmp_path: Path, overrides: list[str], steps: int, watch: Any) -> nn.Module:
    """peftc's own fit() for `steps` steps of one fixed batch; `watch(model)` runs before it."""
    from peftc.training.lightning import fit

    plan = peftc.compile(["model=tiny_llama", f"trainer.max_steps={steps}", "trainer.logger=none", *overrides])
    model = peftc.materialize(plan, base_model=build_base(plan))
    watch(model)
    batches = torch.utils.data.DataLoader([training_batch(plan)] * steps, batch_size=None)
    fit(model, plan, tmp_path, (batches, None))
    return model


@pytest.mark.filterwarnings("ignore:.*val_dataloader")  # no validation data, on purpose
def test_training_forward_runs_without_a_kv_cache(tmp_path: Path) -> None:
    seen: list[Any] = []

    def record(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # the KV cache argument's name differs between transformers releases
        seen.append(next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if k in kwargs), None))

    def watch(model: nn.Module) -> None:
        model.base_model.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)

    model = fit_lora(tmp_path, [], 2, watch)
    assert len(seen) == 2 and all(cache is None for cache in seen), seen
    assert model.config.use_cache, "generation after training keeps its cache"


@pytest.mark.filterwarnings("ignore:.*val_dataloader")  # no validation data, on purpose
def test_compiled_blocks_compile_once_over_training_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.compile=true: the frames Dynamo compiles after the first step are all it compiles
    (no recompilation per step); counted with a backend that counts and runs eagerly."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compile_module = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_module(self, backend=counter))
    counts: list[int] = []

    def watch(model: nn.Module) -> None:
        model.base_model.model.register_forward_hook(lambda *_: counts.append(counter.frame_count))

    torch._dynamo.reset()
    model = fit_lora(tmp_path, ["trainer.compile=true"], 4, watch)
    blocks = len(model.base_model.model.layers)
    assert 1 <= counts[0] <= blocks, f"{counts[0]} compilations for {blocks} blocks"
    assert counts == [counts[0]] * 4, f"compilations after each step: {counts}"


@pytest.mark.filterwarnings("ignore:.*val_dataloader")  # no validation data, on purpose
def test_each_run_in_a_process_compiles_its_own_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep's jobs run in one process (Hydra's basic launcher). Each compiles blocks of the same
    decoder-layer code, and Dynamo gives up on a code object after `recompile_limit` compilations:
    without a fresh start per run, a sweep's later jobs trained silently uncompiled (seen from the
    third job of `-m peft=lora,loha,lokr,... trainer.compile=true`, limit 8; here the limit is 1)."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compile_module = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_module(self, backend=counter))
    compiled_per_run = []
    with torch._dynamo.config.patch(recompile_limit=1):
        for run, method in enumerate(["peft=lora", "peft=loha"]):
            before = counter.frame_count
            fit_lora(tmp_path / str(run), ["trainer.compile=true", method], 1, lambda model: None)
            compiled_per_run.append(counter.frame_count - before)
    assert all(compiled_per_run), f"frames compiled by each run: {compiled_per_run}"


def test_the_validation_after_adaloras_cut_compiles_nothing_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AdaLoRA cuts each module to its kept ranks when training ends, so each compiled block has
    new parameter shapes in the validation pass after training: it compiled 2 more variants of
    tiny_llama's 2 blocks (a variant per distinct block on a real model, up to Dynamo's limit),
    for one pass. That pass runs what training compiled, or runs eagerly."""
    from torch._dynamo.testing import CompileCounter

    from peftc.training.lightning import fit

    counter = CompileCounter()
    compile_module = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_module(self, backend=counter))
    overrides = ["peft=adalora", "peft.tinit=1", "peft.tfinal=1", "trainer.compile=true"]
    plan = peftc.compile(["model=tiny_llama", "trainer.max_steps=4", "trainer.logger=none", *overrides])
    model = peftc.materialize(plan, base_model=build_base(plan))
    compiled_after_cut: list[int] = []

    def before(module: nn.Module, args: Any) -> None:
        compiled_after_cut.append(-counter.frame_count)

    def after(module: nn.Module, args: Any, output: Any) -> None:
        compiled_after_cut[-1] += counter.frame_count
        if model.plan_of("default").spec.peft.rank_pattern is None:  # not cut yet
            compiled_after_cut.pop()

    model.base_model.model.register_forward_pre_hook(before)
    model.base_model.model.register_forward_hook(after)
    batches = torch.utils.data.DataLoader([training_batch(plan)] * 4, batch_size=None)
    torch._dynamo.reset()
    fit(model, plan, tmp_path, (batches, torch.utils.data.DataLoader([training_batch(plan)], batch_size=None)))
    ranks = {layer.lora_E["default"].shape[0] for _, layer in model.adapter_layers()}
    assert len(ranks) > 1, f"the cut left every module at rank {ranks}: no block has new shapes"
    assert compiled_after_cut == [0], f"frames compiled by each forward after the cut: {compiled_after_cut}"
