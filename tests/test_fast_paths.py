"""The fast paths (issue 8) compute the same numbers as the general paths they replace.

- LoRA on a plain nn.Linear runs as one fused autograd node (methods/lowrank.py), and so do
  AdaLoRA (factor E ⊙ A) and a single DoRA adapter: output and every gradient equal the module-by-module computation, and
  training gradients equal peft's.
- LoHa and LoKr on a Linear compute dW x from their factors without forming dW (issue 17):
  outputs and gradients equal the materialized update's, and peft's under bf16 autocast.
- DoRA's weight norm ||W + s B A|| comes from the factors without forming B A (issue 17).
- The causal-LM loss is computed in chunks from the hidden states (tasks/lm_loss.py): loss and
  gradients equal transformers' own loss on the full logits.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import peftc
from peftc.methods.layer import AdapterLayer
from peftc.methods.lora.layer import LoraLayer
from peftc.tasks import get as get_task
from peftc.tasks import lm_loss
from tests.helpers import build_base, peft_lora_config, token_batch, twin_bases


def lora_model(overrides: list[str]) -> tuple[peftc.planning.plan.Plan, torch.nn.Module]:
    plan = peftc.compile(["model=tiny_llama", "peft.init_lora_weights=false", *overrides])
    return plan, peftc.materialize(plan, base_model=build_base(plan))


def adapted_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer) and m.kind == "linear"]


def fused_and_general(layer: LoraLayer, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(output, input grad, adapter grads...) through the layer's own forward and through the
    general AdapterLayer path, for the same upstream gradient."""
    results = []
    upstream = torch.randn(*x.shape[:-1], layer.base_layer.out_features, generator=torch.Generator().manual_seed(3))
    for forward in (layer.forward, lambda t: AdapterLayer.forward(layer, t)):
        layer.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_(True)
        out = forward(inputs)
        out.backward(upstream)
        params = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
        results.append((out.detach(), inputs.grad.clone(), *params))
    return results


@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_linear_equals_the_general_path_with_two_active_adapters(bias: bool) -> None:
    plan, model = lora_model(["peft.r=4", "peft.lora_alpha=8"])
    model.add_adapter("second", plan)
    model.set_adapter(["default", "second"])
    model.train()
    layer = adapted_layers(model)[0]
    layer.base_layer.weight.requires_grad_(True)  # also the base weight's gradient
    if bias:
        layer.base_layer.bias = nn.Parameter(torch.randn(layer.base_layer.out_features))
    for name in ("default", "second"):
        torch.nn.init.normal_(layer.lora_B[name].weight)
    x = torch.randn(2, 5, layer.base_layer.in_features, generator=torch.Generator().manual_seed(1))
    fused, general = fused_and_general(layer, x)
    assert layer(x).grad_fn.name().startswith("LowRankLinear"), "the fast path must be the one taken"
    for ours, reference in zip(fused, general, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_dora_linear_equals_the_general_path(bias: bool) -> None:
    """One DoRA adapter on a plain Linear is one node, rescale * (W x + s B A x) + b, with the
    magnitude's gradient through the rescale; a second active adapter takes the general path."""
    plan, model = lora_model(["peft.r=4", "peft.lora_alpha=8", "peft.use_dora=true"])
    model.train()
    layer = adapted_layers(model)[0]
    layer.base_layer.weight.requires_grad_(True)
    if bias:
        layer.base_layer.bias = nn.Parameter(torch.randn(layer.base_layer.out_features))
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(1.5)
    x = torch.randn(2, 5, layer.base_layer.in_features, generator=torch.Generator().manual_seed(1))
    assert layer(x).grad_fn.name().startswith("RescaledLowRankLinear"), "the fast path must be the one taken"
    fused, general = fused_and_general(layer, x)
    for ours, reference in zip(fused, general, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    model.add_adapter("second", plan)
    model.set_adapter(["default", "second"])
    assert not layer(x).grad_fn.name().startswith(("RescaledLowRankLinear", "LowRankLinear"))


def test_fused_adalora_linear_equals_the_general_path() -> None:
    """AdaLoRA runs LoRA's node with the factor E ⊙ A; E (and so the pruning) gets its gradient."""
    plan = peftc.compile(["peft=adalora", "model=tiny_llama", "peft.init_lora_weights=false"])
    model = peftc.materialize(plan, base_model=build_base(plan)).train()
    from peftc.methods.adalora.layer import AdaLoraLayer

    layer = next(m for m in model.modules() if isinstance(m, AdaLoraLayer))
    x = torch.randn(2, 5, layer.base_layer.in_features, generator=torch.Generator().manual_seed(1))
    assert layer(x).grad_fn.name().startswith("LowRankLinear"), "the fast path must be the one taken"
    fused, general = fused_and_general(layer, x)
    assert len(fused) == 5  # output, input grad, A, E, B
    for ours, reference in zip(fused, general, strict=True):  # N(0, 1) factors: large, cancelling sums
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())


def test_dropout_in_training_takes_the_general_path() -> None:
    _, model = lora_model(["peft.lora_dropout=0.1"])
    layer = adapted_layers(model)[0]
    x = torch.randn(2, 3, layer.base_layer.in_features)
    model.train()
    assert not layer(x).grad_fn.name().startswith("LowRankLinear")
    model.eval()  # no dropout in eval: the fused node is exact again
    with torch.enable_grad():
        assert layer(x.requires_grad_(True)).grad_fn.name().startswith("LowRankLinear")


def test_lora_under_bf16_autocast_stays_fused_and_matches_peft_within_bf16_rounding() -> None:
    """Lightning's bf16-mixed: float32 adapters over a float32 base under autocast. The fused node
    runs its GEMMs in bf16 as peft's module-by-module forward does, and hands float32 gradients
    to the float32 adapters (it once crashed mixing bf16 products with float32 factors)."""
    from peft import get_peft_model, get_peft_model_state_dict

    from peftc.files.load import fill

    plan = peftc.compile(["model=tiny_llama", "peft.init_lora_weights=false", "peft.target_modules=all-linear"])
    ours_base, theirs_base = twin_bases(plan)
    theirs = get_peft_model(theirs_base, peft_lora_config(plan)).train()
    ours = peftc.materialize(plan, base_model=ours_base).train()
    fill(ours, "default", get_peft_model_state_dict(theirs))
    ids = token_batch()
    losses = []
    for model in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe = adapted_layers(ours)[0](torch.zeros(1, ours.base_model.config.hidden_size))
    assert probe.grad_fn.name().startswith("LowRankLinear") and probe.dtype == torch.bfloat16
    assert abs(losses[0] - losses[1]) <= 1e-2 * abs(losses[1])
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(ours_grads) == len(theirs_grads) > 0
    for name, grad in ours_grads.items():
        (match,) = [g for n, g in theirs_grads.items() if n.endswith(name.split("base_model.", 1)[-1])]
        assert grad.dtype == torch.float32, name
        assert (grad - match).norm() <= 0.05 * match.norm(), name


def test_lora_training_gradients_match_peft() -> None:
    from peft import get_peft_model, get_peft_model_state_dict

    from peftc.files.load import fill

    plan = peftc.compile(["model=tiny_llama", "peft.init_lora_weights=false", "peft.target_modules=all-linear"])
    ours_base, theirs_base = twin_bases(plan)
    theirs = get_peft_model(theirs_base, peft_lora_config(plan)).train()
    ours = peftc.materialize(plan, base_model=ours_base).train()
    fill(ours, "default", get_peft_model_state_dict(theirs))
    ids = token_batch()
    for model in (ours, theirs):
        model(input_ids=ids, labels=ids).loss.backward()
    probe = torch.zeros(1, ours.base_model.config.hidden_size)
    assert adapted_layers(ours)[0](probe).grad_fn.name().startswith("LowRankLinear")
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(ours_grads) == len(theirs_grads) > 0
    for name, grad in ours_grads.items():
        match = [g for n, g in theirs_grads.items() if n.endswith(name.split("base_model.", 1)[-1])]
        assert len(match) == 1, name
        torch.testing.assert_close(grad, match[0], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ chunked loss
def labelled_batch(vocab: int = 260) -> dict[str, torch.Tensor]:
    ids = token_batch(vocab=vocab, batch=3, length=14)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, -3:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(loss_fn, model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:  # noqa: ANN001
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize(
    "overrides",
    [
        ["peft.target_modules=all-linear"],
        ["peft.target_modules=[q_proj,lm_head]"],  # an adapted head: not a plain nn.Linear
        ["peft=prompt_tuning", "peft.num_virtual_tokens=3"],  # positions prepended by the model
    ],
    ids=["lora", "lora on lm_head", "prompt tuning"],
)
def test_chunked_loss_equals_transformers_loss(overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 5 * 260)  # 5 rows per chunk: several chunks
    plan = peftc.compile(["model=tiny_llama", *overrides])
    torch.manual_seed(0)  # the adapters' random init: the same whatever ran before in this worker
    model = peftc.materialize(plan, base_model=build_base(plan)).train()
    task, batch = get_task(plan.task), labelled_batch()
    chunked, chunked_grads = loss_and_grads(lambda: task.training_loss(model, batch), model)
    model.chunked_loss = False  # model(labels=...) itself is chunked by default (issue 17)
    reference, reference_grads = loss_and_grads(lambda: model(**batch).loss, model)
    assert abs(chunked.item() - reference.item()) <= 1e-6 * abs(reference.item())
    for ours, theirs in zip(chunked_grads, reference_grads, strict=True):
        # float rounding is relative to the gradient's scale (20 seeds: <= 5.8e-7 of its max)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * theirs.abs().max().item())


@pytest.mark.parametrize("bias", [False, True], ids=["no head bias", "head bias"])
def test_chunked_head_loss_sums_every_chunks_gradient(bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked node's gradients for the hidden states, the head's weight and the head's bias
    (Phi's head has one; peft.bias=all or modules_to_save train it) are those of cross-entropy on
    the full logits: every chunk contributes, including a part-filled last one."""
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 4 * 50)  # 4 rows per chunk: 11 rows are 3 chunks
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    head_bias = torch.randn(50, generator=generator, requires_grad=True) if bias else None
    targets = torch.randint(0, 50, (11,), generator=generator)
    inputs = [t for t in (hidden, weight, head_bias) if t is not None]
    ours = lm_loss.LinearCrossEntropy.apply(hidden, weight, head_bias, targets, True)
    reference = F.cross_entropy(F.linear(hidden, weight, head_bias), targets, reduction="sum")
    torch.testing.assert_close(ours, reference)
    upstream = 0.37  # what a mean over tokens and gradient accumulation multiply the sum by
    for got, want in zip(
        torch.autograd.grad(ours * upstream, inputs), torch.autograd.grad(reference * upstream, inputs)
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_loss_keeps_no_logits_for_backward() -> None:
    """The gradient is formed chunk by chunk in the forward: what backward holds is (tokens x
    hidden), not (tokens x vocabulary)."""
    plan = peftc.compile(["model=tiny_llama"])
    model = peftc.materialize(plan, base_model=build_base(plan)).train()
    batch = labelled_batch()
    vocab = model.base_model.get_output_embeddings().weight.shape[0]
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        get_task(plan.task).training_loss(model, batch)
    assert saved and not any(shape and shape[-1] == vocab and shape.numel() > vocab for shape in saved)


def test_the_head_probe_is_one_small_product_in_bfloat16() -> None:
    """The probe that finds the last hidden states runs the head on each sequence's last position
    as one (batch, hidden) product. Given a strided slice, F.linear expanded the weight per
    sequence for a batched product (in bfloat16 on a CPU a batch x vocab x hidden copy: 0.4 s of
    a 1.8 s bf16-true step at mini-Llama's size, for every method)."""

    class Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
            out = func(*args, **(kwargs or {}))
            outputs = out if isinstance(out, (tuple, list)) else (out,)
            self.numel = max([self.numel, *(t.numel() for t in outputs if isinstance(t, torch.Tensor))])
            return out

    plan = peftc.compile(["model=tiny_llama", "model.dtype=bfloat16"])
    model = peftc.materialize(plan, base_model=build_base(plan).to(torch.bfloat16)).train()
    batch = labelled_batch()
    weight = model.base_model.get_output_embeddings().weight
    with Largest() as largest:
        get_task(plan.task).training_loss(model, batch)
    assert largest.numel < len(batch["input_ids"]) * weight.numel(), "the head's weight was expanded per sequence"


def test_logits_changed_after_the_head_fall_back_to_the_full_logits() -> None:
    """A model that rescales its logits after the head (soft-capping, say): the chunked path
    would be wrong, so the loss comes from the model's own logits."""
    plan = peftc.compile(["model=tiny_llama"])
    model = peftc.materialize(plan, base_model=build_base(plan)).train()
    scaled = copy.deepcopy(model)

    def halve(module: nn.Module, args: object, output: object) -> object:
        output.logits = output.logits * 0.5
        return output

    scaled.base_model.register_forward_hook(halve)
    batch = labelled_batch()
    loss = get_task(plan.task).training_loss(scaled, batch)
    logits, labels = scaled(**batch).logits, batch["labels"]
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    assert abs(loss.item() - get_task(plan.task).training_loss(model, batch).item()) > 1e-3


# -------------------------------------------------------------------------------- compile
COMPILED_METHODS = {
    "lora": ["peft.init_lora_weights=false"],
    "dora": ["peft.use_dora=true", "peft.init_lora_weights=false"],
    "loha": ["peft=loha", "peft.init_weights=false", "peft.r=2"],
    "lokr": ["peft=lokr", "peft.init_weights=false"],
    "adalora": ["peft=adalora", "peft.init_lora_weights=false", "peft.lora_alpha=0.01"],
    "oft": ["peft=oft", "peft.init_weights=false", "peft.oft_block_size=16"],
    "hra": ["peft=hra", "peft.init_weights=false", "peft.r=4"],
    "qlora_nf4": ["quant=bnb_nf4", "peft.init_lora_weights=false"],
}
# Traced by Dynamo and AOT autograd with inductor's decompositions and partitioner
# (aot_eager_decomp_partition), without generating code: what is ours to check is the trace (no
# graph break, in training and without grad) and the traced graph's loss, gradients and logits;
# inductor's code generation from that graph is PyTorch's. A cold inductor compile costs more
# than the whole check: 31-48 s for LoRA's training step, and 18 s more for only its no-grad
# forward (the first compile of a process pays for inductor's C++ toolchain; 2026-12-07, this
# 2-core CPU). experiments/bench_gpu.py runs inductor on the GPU. LoHa's own autograd node is
# traced here and checked eagerly against peft in tests/test_methods.py.


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(COMPILED_METHODS))
def test_compiled_blocks_train_to_the_same_loss_and_gradients(method: str) -> None:
    """trainer.compile=true compiles each decoder block; a training step gives the eager
    step's loss and adapter gradients, parameter names are unchanged, and every method's
    layers compile without breaking the block's graph (a break per layer costs a GPU step)."""
    from torch._dynamo.utils import counters

    from peftc.training.lightning import compile_blocks

    plan = peftc.compile(["model=tiny_llama", "peft.target_modules=all-linear", *COMPILED_METHODS[method]])
    eager = peftc.materialize(plan, base_model=build_base(plan)).train()
    compiled = copy.deepcopy(eager)
    names = [n for n, _ in compiled.named_parameters()]
    # Dynamo keeps every earlier test's compiled blocks on the same decoder-layer code; past its
    # recompile limit it would run this method's blocks eagerly, and the check below would pass.
    torch._dynamo.reset()
    assert compile_blocks(compiled, "aot_eager_decomp_partition") == 2  # tiny_llama's decoder layers
    assert all(block._compiled_call_impl is not None for block in compiled.base_model.model.layers)
    assert [n for n, _ in compiled.named_parameters()] == names
    task, batch = get_task(plan.task), labelled_batch()
    counters.clear()
    for _ in range(2):  # the second call runs the compiled code without recompiling
        loss, grads = loss_and_grads(lambda: task.training_loss(compiled, batch), compiled)
    assert counters["aot_autograd"]["ok"] >= 1, "the blocks ran eagerly"
    assert not counters["graph_break"], dict(counters["graph_break"])
    reference, reference_grads = loss_and_grads(lambda: task.training_loss(eager, batch), eager)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)
    for ours, theirs in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    # Validation and generation run the blocks without grad: they must stay compiled there too.
    compiled.eval(), eager.eval()
    counters.clear()
    with torch.no_grad():
        logits = compiled(input_ids=batch["input_ids"], use_cache=False).logits
    skipped = counters["frames"]["total"] - counters["frames"]["ok"]
    assert not skipped and not counters["unimplemented"], dict(counters["unimplemented"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    with torch.no_grad():
        torch.testing.assert_close(logits, eager(input_ids=batch["input_ids"], use_cache=False).logits)


def test_generation_runs_blocks_compiled_for_training_eagerly() -> None:
    """A KV cache changes a compiled block's guards as it is created and grows: the first
    generate() compiled 6 more variants of each block (19.7 s with inductor on this CPU, for one
    16-token prompt; 0.04 s eagerly). Blocks compiled by trainer.compile decode eagerly, with
    the eager model's tokens, and training steps still run compiled."""
    from torch._dynamo.utils import counters

    from peftc.training.lightning import compile_blocks

    plan = peftc.compile(["model=tiny_llama", "peft.init_lora_weights=false"])
    eager = peftc.materialize(plan, base_model=build_base(plan)).eval()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    compile_blocks(compiled, "aot_eager")
    prompt = torch.randint(0, 260, (1, 8), generator=torch.Generator().manual_seed(0))
    counters.clear()
    with torch.no_grad():
        tokens = compiled.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert counters["frames"]["total"] == 0, dict(counters["frames"])
        assert torch.equal(tokens, eager.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))
    compiled.train()
    get_task(plan.task).training_loss(compiled, labelled_batch())
    assert counters["frames"]["ok"] >= 1, "training no longer runs the compiled blocks"


def test_loha_keeps_only_its_factors_for_backward_and_matches_autograd() -> None:
    """The Hadamard update's backward recomputes the two out x in products from the factors."""
    from peftc.methods.lycoris.loha import HadamardOfProducts

    generator = torch.Generator().manual_seed(0)
    factors = [torch.randn(shape, generator=generator, requires_grad=True) for shape in [(48, 4), (4, 40)] * 2]
    weight_sized = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: weight_sized.append(t.numel() >= 48 * 40) or t, lambda t: t
    ):
        ours = HadamardOfProducts.apply(*factors)
    assert not any(weight_sized)
    grad = torch.randn(48, 40, generator=generator)
    expected = torch.autograd.grad(((factors[0] @ factors[1]) * (factors[2] @ factors[3]) * grad).sum(), factors)
    actual = torch.autograd.grad((ours * grad).sum(), factors)
    assert torch.equal(ours, (factors[0] @ factors[1]) * (factors[2] @ factors[3]))
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lora_bias", [False, True])
def test_meta_models_get_uninitialised_meta_adapters_of_the_planned_shapes(lora_bias: bool) -> None:
    """Plans of huge models inject onto meta bases without drawing: same layout as on real weights."""
    from transformers import AutoModelForCausalLM

    from peftc.planning.model_source import hf_config

    plan = peftc.compile(["peft.target_modules=all-linear", f"peft.lora_bias={str(lora_bias).lower()}"])
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(hf_config(plan.spec.model))
    model = peftc.materialize(plan, base_model=base)
    adapter = model.adapter_state_dict("default")
    real = peftc.materialize(plan, base_model=build_base(plan)).adapter_state_dict("default")
    assert {k: v.shape for k, v in adapter.items()} == {k: v.shape for k, v in real.items()}
    assert all(v.is_meta for v in adapter.values())
    assert model.trainable_parameters() == plan.trainable_params


# ------------------------------------------------------------------------------ LyCORIS from factors
def lycoris_model(method: str, overrides: list[str] = ()) -> torch.nn.Module:  # noqa: B006 - read only
    plan = peftc.compile(
        [f"peft={method}", "model=tiny_llama", "peft.target_modules=all-linear", "peft.init_weights=false", *overrides]
    )
    return peftc.materialize(plan, base_model=build_base(plan))


def refuse_to_form_dw(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    from peftc.methods import get

    def formed(self, name):  # noqa: ANN001, ANN202
        raise AssertionError("dW was formed")

    # LoHa/LoKr form dW in `product`; LoRA forms B A (DoRA's norm) in `_lora_rows`; HRA forms H in `reflection`
    place = {"lora": "_lora_rows", "hra": "reflection"}.get(method, "product")
    monkeypatch.setattr(get(method).layer_class, place, formed)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_lycoris_linear_updates_come_from_the_factors_and_equal_the_formed_update(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftc.methods import get
    from peftc.methods.lycoris.shared import LycorisLayer

    model = lycoris_model(method, ["peft.r=2"]).train()
    layers = [m for m in model.modules() if isinstance(m, LycorisLayer)]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    wide = [layer for layer in layers if layer.base_layer.in_features == 64]
    layer_class, forming = get(method).layer_class, []
    product = layer_class.product
    results = []
    for formed in (False, True):
        with monkeypatch.context() as patch:
            if formed:  # the method's own class: LoHa and LoKr each define factored_output
                patch.setattr(layer_class, "factored_output", lambda self, name, x: None)
                patch.setattr(layer_class, "product", lambda self, name: forming.append(name) or product(self, name))
            else:
                refuse_to_form_dw(patch, method)
            step = []
            for layer in wide:
                layer.zero_grad(set_to_none=True)
                inputs = x.clone().requires_grad_(True)
                out = layer(inputs)
                out.backward(torch.ones_like(out))
                step += [out.detach(), inputs.grad, *(p.grad for p in layer.parameters() if p.requires_grad)]
            results.append(step)
    assert len(results[0]) == len(results[1]) > 0
    assert len(forming) >= len(wide), "the reference path did not form dW"
    for ours, formed in zip(*results, strict=True):
        # two orders of float products: rounding relative to each tensor's scale (<= 1.7e-6 seen)
        torch.testing.assert_close(ours, formed, rtol=1e-5, atol=1e-5 * formed.abs().max().item())


@pytest.mark.parametrize(
    "shape", [(44, 64, 32, 32), (32, 32, 44, 64), (1, 127, 1, 9)], ids=["w1-first", "w2-first", "prime"]
)
def test_kronecker_linear_equals_the_formed_product_in_either_order(shape: tuple[int, int, int, int]) -> None:
    """(a, b, c, d) for W1 (a, c), W2 (b, d): the first two shapes take the two contraction orders."""
    from peftc.methods.lycoris.lokr import kronecker_linear

    a, b, c, d = shape
    generator = torch.Generator().manual_seed(0)
    x, first, second = (
        torch.randn(s, generator=generator, dtype=torch.float64) for s in [(2, 3, c * d), (a, c), (b, d)]
    )
    torch.testing.assert_close(kronecker_linear(x, first, second), x @ torch.kron(first, second).T)


def test_loha_forms_dw_where_that_is_cheaper(monkeypatch: pytest.MonkeyPatch) -> None:
    """r^2 (in + out) >= in * out: at r=8 on 64-wide projections forming dW costs less."""
    from peftc.methods.lycoris.loha import hadamard_is_cheaper_factored

    assert hadamard_is_cheaper_factored(4, 64, 64) and not hadamard_is_cheaper_factored(64, 64, 64)
    model = lycoris_model("loha", ["peft.r=8", "peft.target_modules=[q_proj]"])
    refuse_to_form_dw(monkeypatch, "loha")
    with pytest.raises(AssertionError, match="dW was formed"):
        model(input_ids=token_batch())


def adapter_grads(model: nn.Module, ids: torch.Tensor, autocast: bool) -> dict[str, torch.Tensor]:
    """Adapter gradients of one training step, keyed from the decoder layers down."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # peft draws a module-dropout number per layer and step; so does ours
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n[n.index("layers.") :]: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    # peft keeps DoRA's magnitude in a module: `lora_magnitude_vector.default.weight`
    return {k.removesuffix(".weight") if "magnitude" in k else k: grad for k, grad in grads.items()}


def relative_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    squared = sum((grads[k] - reference[k]).norm() ** 2 for k in reference)
    return float((squared / sum(t.norm() ** 2 for t in reference.values())) ** 0.5)


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("loha", ["peft=loha", "peft.init_weights=false", "peft.r=2"]),
        ("lokr", ["peft=lokr", "peft.init_weights=false", "peft.r=2"]),
        ("lora", ["peft.use_dora=true", "peft.init_lora_weights=false"]),
        ("hra", ["peft=hra", "peft.init_weights=false", "peft.r=4"]),
        ("hra", ["peft=hra", "peft.init_weights=false", "peft.r=4", "peft.apply_GS=true"]),
    ],
    ids=["loha", "lokr", "dora", "hra", "hra-gram-schmidt"],
)
def test_factored_updates_are_as_close_as_peft_under_bf16_autocast(
    method: str, settings: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's bf16-mixed: float32 factors over a float32 base under autocast, nothing
    weight-sized formed (LoHa/LoKr: dW; DoRA: B A for its norm; HRA: H and W H). The factored GEMMs round in
    other places than peft's formed products, so both are compared with the float32 step: ours
    must be as close to it as peft's (aggregate over all adapter gradients, summed over a few
    seeded draws: one draw's ratio spreads 0.6-1.5 either way, LoKr's)."""
    from peft import get_peft_config, get_peft_model, get_peft_model_state_dict

    from peftc.files.load import fill
    from peftc.planning.layout import config_to_write

    plan = peftc.compile(["model=tiny_llama", "peft.target_modules=all-linear", *settings])
    config = get_peft_config({**config_to_write(plan.adapter_config), "inference_mode": False})
    ids, ours_errors, theirs_errors = token_batch(), [], []
    for seed in range(3):
        torch.manual_seed(seed)
        ours_base, theirs_base = twin_bases(plan)
        theirs = get_peft_model(theirs_base, config).train()
        ours = peftc.materialize(plan, base_model=ours_base).train()
        fill(ours, "default", get_peft_model_state_dict(theirs))
        with monkeypatch.context() as patched:  # after DoRA's init, which forms B A once
            refuse_to_form_dw(patched, method)
            exact = adapter_grads(ours, ids, autocast=False)
            assert relative_error(adapter_grads(theirs, ids, autocast=False), exact) < 1e-5
            ours_bf16, theirs_bf16 = adapter_grads(ours, ids, autocast=True), adapter_grads(theirs, ids, autocast=True)
        assert all(grad.dtype == torch.float32 for grad in ours_bf16.values())
        ours_errors.append(relative_error(ours_bf16, exact))
        theirs_errors.append(relative_error(theirs_bf16, exact))
    assert all(1e-4 < error < 0.05 for error in theirs_errors), "bf16 rounding shows, and is small"
    assert sum(ours_errors) <= 1.5 * sum(theirs_errors), (ours_errors, theirs_errors)


@pytest.mark.parametrize("shape", [(48, 40), (12, 5, 3, 3)], ids=["linear", "conv"])
def test_dora_norm_from_the_factors_equals_the_formed_norm(shape: tuple[int, ...]) -> None:
    from peftc.methods.lora import dora

    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(shape, generator=generator)
    columns = rows[0].numel()
    lora_a, lora_b = torch.randn(4, columns, generator=generator), torch.randn(shape[0], 4, generator=generator)
    formed = dora.row_norm(rows + 0.3 * (lora_b @ lora_a).reshape(shape))
    torch.testing.assert_close(dora.factored_row_norm(rows, lora_a, lora_b, 0.3), formed, rtol=1e-6, atol=0)
    low = dora.factored_row_norm(rows.bfloat16(), lora_a.bfloat16(), lora_b.bfloat16(), 0.3)
    formed_low = dora.row_norm(rows.bfloat16() + 0.3 * (lora_b.bfloat16() @ lora_a.bfloat16()).reshape(shape))
    assert low.dtype == formed_low.dtype == torch.bfloat16
    assert (low.float() - formed).abs().max() <= max(
        2 * (formed_low.float() - formed).abs().max(), 2**-8 * formed.max()
    )


# ------------------------------------------------------------------------------ HRA in compact form
@pytest.mark.parametrize("gram_schmidt", [False, True], ids=["chain", "gram-schmidt"])
def test_compact_reflections_equal_the_formed_product(gram_schmidt: bool) -> None:
    """H = I - U T U^T equals the r reflections multiplied out (or I - 2 Q Q^T), to float64 rounding."""
    from peftc.methods.hra import chained_reflections, compact_reflections, gram_schmidt_reflection

    vectors = torch.randn(40, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    units, triangle = compact_reflections(vectors, gram_schmidt)
    formed = (gram_schmidt_reflection if gram_schmidt else chained_reflections)(vectors)
    assert units.shape == (40, 6) and torch.equal(triangle, triangle.triu())
    torch.testing.assert_close(torch.eye(40, dtype=torch.float64) - units @ triangle @ units.t(), formed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hra_linear_keeps_nothing_weight_sized_and_equals_the_formed_path(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HRA on a Linear runs as LoRA's node with A = U^T, B = -(W U) T: no in x in or out x in
    tensor made and kept for backward (the formed path keeps W H), same output and gradients as forming H."""
    from peftc.methods.hra import HRALayer

    plan = peftc.compile(["model=tiny_llama", "peft=hra", "peft.init_weights=false", "peft.r=4"])
    model = peftc.materialize(plan, base_model=build_base(plan)).train().to(dtype)
    layer = next(m for m in model.modules() if isinstance(m, HRALayer))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    weight = layer.base_layer.weight  # kept by reference, as by the base layer's own backward

    def made_for_backward(t: torch.Tensor) -> bool:
        return t.numel() >= 64 * 64 and t.data_ptr() != weight.data_ptr()

    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(made_for_backward(t)) or t, lambda t: t):
        layer(x.requires_grad_(True))
    assert kept and not any(kept)
    results = []
    for formed in (False, True):
        with monkeypatch.context() as patch:
            if formed:
                patch.setattr(HRALayer, "_low_rank_forward", lambda self, x, name: None)
            layer.zero_grad(set_to_none=True)
            inputs = x.detach().clone().requires_grad_(True)
            out = layer(inputs)
            out.backward(torch.ones_like(out))
            results.append([out.detach(), inputs.grad, layer.hra_u["default"].grad])
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}
    for ours, formed in zip(*results, strict=True):
        torch.testing.assert_close(ours.float(), formed.float(), **tolerance)


# ------------------------------------------------------------------------------ operators per layer
# LoHa is left out: its factored product is one operator more than peft's formed one, and peft's
# layer reads its module-dropout draw back to the host (a GPU sync) where peftc's does not.
LAYER_SETTINGS = {
    "lora": ["peft.init_lora_weights=false"],
    "dora": ["peft.use_dora=true", "peft.init_lora_weights=false"],
    "lora dropout": ["peft.lora_dropout=0.1", "peft.init_lora_weights=false"],
    "ia3": ["peft=ia3", "peft.init_ia3_weights=false"],
    "lokr": ["peft=lokr", "peft.init_weights=false"],
    "adalora": ["peft=adalora", "peft.init_lora_weights=false"],
    "oft": ["peft=oft", "peft.init_weights=false", "peft.oft_block_size=16"],
    "hra": ["peft=hra", "peft.init_weights=false", "peft.r=4"],
    "vera": ["peft=vera", "peft.init_weights=false", "peft.r=8"],
}


@pytest.mark.parametrize("method", sorted(LAYER_SETTINGS))
def test_an_adapted_layer_trains_in_no_more_operators_than_peft_s(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every operator is a kernel launch on a GPU, per layer and step (154 layers at 1.1B
    all-linear): no method's layer may cost more of them than peft's (OFT's Cayley-Neumann series
    once cost 47 against peft's 40)."""
    from peft import get_peft_model

    from tests.helpers import peft_config_from_plan

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "experiments"))
    from bench_gpu import OpCounter  # the count the GPU bench reports per step

    plan = peftc.compile(["model=tiny_llama", *LAYER_SETTINGS[method]])
    ours_base, theirs_base = twin_bases(plan)
    theirs = get_peft_model(theirs_base, peft_config_from_plan(plan)).train()
    ours = peftc.materialize(plan, base_model=ours_base).train()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    counts = []
    for model in (ours, theirs):
        layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.v_proj"))
        layer(x).sum().backward()  # warm: what is made once (OFT's indices) is not counted
        with OpCounter() as counter:
            layer(x).sum().backward()
        counts.append(counter.count)
    assert 5 < counts[0] <= counts[1], counts
