"""Quantized frozen bases: planning, numerics against a dequantized reference, refusals, merging.

Tolerances (relative to the largest output magnitude), measured on this machine and stated in
the README: every backend's training-mode forward equals x @ dequant(W)^T + LoRA to float
rounding (<= 1e-6; 2e-7 measured); bitsandbytes int8's eval-mode forward also quantizes the
activations (~1%, bound 3e-2).
"""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
from torch import nn

import peftc
from peftc import quant
from peftc.methods.lora.method import LoraLayer
from peftc.planning.plan import Site
from peftc.quant.base import backend_of, leaf_tensors
from peftc.runtime.materialize import load_base_model, materialize
from tests.helpers import max_diff, token_batch

BACKENDS = ["bnb_int8", "bnb_nf4", "bnb_fp4", "quanto_int8", "quanto_int4", "torchao_int8"]
EIGHT_BIT = ["bnb_int8", "quanto_int8", "torchao_int8"]
FOUR_BIT = ["bnb_nf4", "bnb_fp4", "quanto_int4"]
EXACT = 1e-6  # relative: float rounding only
ACTIVATION_ROUNDING = 3e-2  # relative: bnb int8 eval path quantizes activations too


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_diff(a, b) / b.abs().max().item()


def base_bytes_measured(model: nn.Module) -> dict[str, int]:
    """Bytes of every parameter of a base, quantized weights as their backends store them."""
    sizes: dict[str, int] = {}
    seen: set[int] = set()

    def add(kind: str, size: int) -> None:
        sizes[kind] = sizes.get(kind, 0) + size

    for module in model.modules():
        backend = backend_of(module)
        if backend is not None:
            seen.add(id(module.weight))
            for kind, size in backend.stored_bytes(module).items():
                add(kind, size)
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                add(str(param.dtype).replace("torch.", ""), param.numel() * param.element_size())
    return dict(sorted(sizes.items()))


# ----------------------------------------------------------------------------- planning


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planned_base_bytes_equal_the_quantized_model(backend: str, dtype: str) -> None:
    overrides = ["quant.float32_unquantized=false"] if backend == "quanto_int4" and dtype == "bfloat16" else []
    plan = peftc.compile([f"quant={backend}", f"model.dtype={dtype}", *overrides])
    base = load_base_model(plan)
    assert plan.quantization.bytes_by_dtype == base_bytes_measured(base)
    assert plan.model.base_bytes == plan.memory.base_weights == plan.quantization.base_bytes


def test_unquantized_plan_counts_the_whole_base_in_model_dtype() -> None:
    plan = peftc.compile(["quant=none"])
    assert plan.quantization.bytes_by_dtype == {"float32": plan.model.base_params * 4}
    assert plan.quantization.modules == () and plan.quantization.merge_policy == "none"


def test_quantized_plan_is_smaller_and_keeps_the_output_head() -> None:
    full = peftc.compile(["quant=none"])
    plan = peftc.compile(["quant=bnb_nf4", "peft.target_modules=all-linear"])
    assert plan.quantization.skipped == ("lm_head",)
    assert len(plan.quantization.modules) == 14 and "lm_head" not in plan.quantization.modules
    assert plan.model.base_bytes < full.model.base_bytes
    assert all(site.base_quant == "nf4" for site in plan.sites)
    assert "Linear (nf4)" in str(plan) and "base quantization: bnb_nf4: 14 Linear modules stored as" in str(plan)
    assert "kept in float32: lm_head" in str(plan)


def test_skip_modules_keep_those_layers_plain() -> None:
    plan = peftc.compile(["quant=quanto_int8", "quant.skip_modules=[down_proj]", "peft.target_modules=all-linear"])
    kept = {p for p in plan.quantization.skipped}
    assert kept == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}  # and lm_head is quantized
    assert "lm_head" in plan.quantization.modules
    down = plan.site("model.layers.0.mlp.down_proj")
    assert down.base_quant is None and plan.site("model.layers.0.mlp.up_proj").base_quant == "int8"
    model = materialize(plan)
    assert type(model.base_model.get_submodule("model.layers.0.mlp.down_proj").base_layer) is nn.Linear
    assert backend_of(model.base_model.get_submodule("model.layers.0.mlp.up_proj").base_layer) is not None


# ----------------------------------------------------------------------------- refusals


def test_a_misspelled_skip_module_is_refused_with_a_suggestion() -> None:
    with pytest.raises(peftc.PlanError, match=r"quant.skip_modules='down_prj'.*did you mean 'down_proj'"):
        peftc.compile(["quant=bnb_int8", "quant.skip_modules=[down_prj]"])


def test_a_model_without_linear_projections_is_refused() -> None:
    with pytest.raises(peftc.PlanError, match=r"quant='bnb_nf4': would quantize no module.*Conv1D"):
        peftc.compile(["quant=bnb_nf4", "model=tiny_gpt2"])


@pytest.mark.parametrize(
    ("backend", "module", "package"),
    [
        ("bnb_nf4", "bitsandbytes", "bitsandbytes"),
        ("quanto_int4", "optimum.quanto", "optimum-quanto"),
        ("torchao_int8", "torchao", "torchao"),
    ],
)
def test_a_missing_backend_names_the_extra_to_install(
    backend: str, module: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # find_spec then reports it as not installed
    with pytest.raises(
        peftc.ConfigError,
        match=rf"quant='{backend}': needs {package}, which is not installed; .*pip install 'peftc\[quant\]'",
    ):
        peftc.compile([f"quant={backend}"])


def test_a_method_that_cannot_wrap_quantized_layers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftc import methods

    monkeypatch.setattr(type(methods.get("lora")), "wraps_quantized", False)
    with pytest.raises(peftc.ConfigError, match=r"quant='bnb_int8': .*has not been made to wrap quantized layers"):
        peftc.compile(["quant=bnb_int8"])
    assert peftc.compile(["quant=none"]).trainable_params > 0


RANDOM_INIT = {
    "lora": "peft.init_lora_weights=false",
    "ia3": "peft.init_ia3_weights=false",
    "loha": "peft.init_weights=false",
    "lokr": "peft.init_weights=false",
    "oft": "peft.init_weights=false",
    # A, E, B ~ N(0, 1): a small alpha keeps the update the size of a trained one (at alpha 8 the
    # two blocks amplify float rounding past 1e-3, which the order of a sum then decides)
    "adalora": "peft.init_lora_weights=false peft.lora_alpha=0.01",
}


def dequantize_in_place(model: nn.Module) -> None:
    """Replace every quantized Linear (adapter layers' base layers included) by an nn.Linear
    holding its dequantized weight."""
    from peftc.planning.graph import replace_module

    for path, module in list(model.named_modules()):
        backend = backend_of(module)
        if backend is not None:
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight.data = backend.dequantize(module)
            if module.bias is not None:
                plain.bias.data = module.bias.data.float()
            replace_module(model, path, plain.requires_grad_(False))


@pytest.mark.parametrize("backend", ["bnb_nf4", "bnb_int8"])
@pytest.mark.parametrize("method", sorted(RANDOM_INIT))
def test_every_injectable_method_over_a_quantized_base_matches_the_dequantized_model(method: str, backend: str) -> None:
    targets = [] if method == "ia3" else ["peft.target_modules=all-linear"]
    plan = peftc.compile([f"peft={method}", f"quant={backend}", *RANDOM_INIT[method].split(), *targets])
    torch.manual_seed(0)  # the random init: the same adapters whatever ran before
    model = materialize(plan).train()
    x = token_batch()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert ours and all(g.abs().sum() > 0 for g in ours.values())
    model.zero_grad()
    dequantize_in_place(model.base_model)
    reference = model(input_ids=x, labels=x).loss
    reference.backward()
    assert abs(loss.item() - reference.item()) <= EXACT * abs(reference.item())
    # Rounding compounds through two blocks of random adapters, and the dequantized nn.Linear
    # takes the fused LoRA/AdaLoRA node where the quantized base takes the general path: the same
    # sums in another order.
    for name, grad in ours.items():
        assert relative(grad, dict(model.named_parameters())[name].grad) <= 1e-4, name


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_methods_train_over_a_quantized_base(method: str) -> None:
    plan = peftc.compile([f"peft={method}", "quant=bnb_nf4"])
    model = materialize(plan)
    x = token_batch()
    model(input_ids=x, labels=x).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert sum(backend_of(m) is not None for m in model.base_model.modules()) == 14


def test_initialisations_that_rewrite_the_base_are_refused_on_a_quantized_base() -> None:
    with pytest.raises(peftc.ConfigError, match=r"peft.init_lora_weights='pissa': PiSSA/OLoRA .* quantized"):
        peftc.compile(["quant=bnb_int8", "peft.init_lora_weights=pissa"])


@pytest.mark.parametrize(
    ("backend", "failure"), [("quanto_int4", "int4 bfloat16 kernel"), ("quanto_int8", "int8 layers")]
)
def test_quanto_refuses_float32_norms_beside_a_bf16_base(backend: str, failure: str) -> None:
    with pytest.raises(peftc.ConfigError, match=rf"quant.float32_unquantized=True: quanto's {failure}"):
        peftc.compile([f"quant={backend}", "model.dtype=bfloat16", "quant.float32_unquantized=true"])
    assert not peftc.compile([f"quant={backend}", "model.dtype=bfloat16"]).spec.quant.float32_unquantized


# ---------------------------------------------------------------------------- numerics


def _site(in_features: int, out_features: int, dora: bool) -> Site:
    tensors = {"lora_A.weight": (8, in_features), "lora_B.weight": (out_features, 8)}
    options = {"r": 8, "alpha": 16, "scaling": 2.0, "dropout": 0.0, "init": False}
    if dora:
        tensors["lora_magnitude_vector"] = (out_features,)
        options["dora"] = True
    return Site("0", "linear", "Linear", in_features, out_features, tensors, options)


def _twin_lora_layers(backend_name: str, seed: int, dora: bool = False) -> tuple[LoraLayer, LoraLayer]:
    """LoRA over a quantized Linear, and the same LoRA over an nn.Linear holding its dequantized weight."""
    torch.manual_seed(seed)
    backend = quant.get(backend_name)
    linear = nn.Linear(256, 96)
    box = nn.Sequential(copy.deepcopy(linear))
    backend.quantize(backend.schema(), box, ("0",))
    reference = nn.Linear(256, 96).requires_grad_(False)
    reference.weight.data = backend.dequantize(box[0])
    reference.bias.data = linear.bias.data.clone()
    layers = []
    for base in (box[0], reference):
        layer = LoraLayer(base, "linear")
        layer.add_adapter("default", _site(256, 96, dora))
        layer.set_active(["default"])
        layers.append(layer)
    layers[1].load_adapter_tensors("default", layers[0].adapter_tensors("default"))
    return layers[0], layers[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dequantized_model_holds_each_layers_dequantized_weight_and_its_bias(backend: str) -> None:
    """What merging into a checkpoint saved quantized starts from (Qwen2's q/k/v_proj have biases)."""
    from peftc.quant.base import dequantized

    box = nn.Sequential(nn.Linear(256, 96))
    bias = box[0].bias.detach().clone()
    quant.get(backend).quantize(quant.get(backend).schema(), box, ("0",))
    weight = quant.get(backend).dequantize(box[0])
    plain = dequantized(box, torch.float32)[0]
    assert type(plain) is nn.Linear and torch.equal(plain.weight, weight) and torch.equal(plain.bias, bias)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_over_a_quantized_layer_matches_the_dequantized_reference(backend: str, dora: bool) -> None:
    for seed in range(3):
        ours, reference = _twin_lora_layers(backend, seed, dora)
        x = torch.randn(4, 10, 256)
        x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_ours, y_ref = ours(x_ours), reference(x_ref)
        upstream = torch.randn_like(y_ref)
        (y_ours * upstream).sum().backward()
        (y_ref * upstream).sum().backward()
        assert relative(y_ours, y_ref) <= EXACT
        assert relative(x_ours.grad, x_ref.grad) <= EXACT  # gradients reach adapters below this layer
        for ours_param, ref_param in zip(ours.adapter_parameters("default"), reference.adapter_parameters("default")):
            assert relative(ours_param.grad, ref_param.grad) <= EXACT
        ours.eval(), reference.eval()
        with torch.no_grad():
            bound = ACTIVATION_ROUNDING if backend == "bnb_int8" else EXACT
            assert relative(ours(x), reference(x)) <= bound


def test_quanto_int4_runs_on_a_cpu_without_building_quantos_cpp_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building it takes 39 s, a compiler and a writable site-packages (README: Quantized bases)."""
    from optimum.quanto.library.extensions.extension import Extension
    from optimum.quanto.tensor.packed import pack_weights

    monkeypatch.setattr(Extension, "lib", property(lambda ext: pytest.fail(f"peftc built quanto's {ext.name}")))
    ours, reference = _twin_lora_layers("quanto_int4", seed=0)
    x = torch.randn(2, 3, 256)
    assert relative(ours(x), reference(x)) <= EXACT
    for bits in (2, 4):  # quanto's packing read back, row counts that do not fill the last byte row
        codes = torch.randint(0, 2**bits, (37, 5), dtype=torch.uint8)
        assert torch.equal(torch.ops.quanto.unpack(pack_weights(codes, bits), bits)[:37], codes)


def count_fused_nodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one each time QLoRA's fused node runs."""
    from peftc.methods.lora import lowrank

    calls: list[int] = []
    apply = lowrank.QuantizedLowRankLinear.apply
    monkeypatch.setattr(lowrank.QuantizedLowRankLinear, "apply", lambda *args: calls.append(1) or apply(*args))
    return calls


@pytest.mark.parametrize("backend", ["bnb_nf4", "bnb_fp4"])
def test_lora_over_4bit_runs_as_one_fused_node_equal_to_the_general_path(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QLoRA's fast path (lowrank.QuantizedLowRankLinear), two active adapters over a 4-bit layer
    with a bias: the output, the input gradient and every adapter gradient equal the general
    path's (the quantized layer called, then each adapter added)."""
    from peftc.methods.layer import AdapterLayer

    layer, _ = _twin_lora_layers(backend, 0)
    layer.add_adapter("second", _site(256, 96, dora=False))
    layer.set_active(["default", "second"])
    calls = count_fused_nodes(monkeypatch)
    x, upstream = torch.randn(4, 10, 256), torch.randn(4, 10, 96)
    results = []
    for forward in (layer.forward, lambda t: AdapterLayer.forward(layer, t)):
        layer.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_(True)
        (forward(inputs) * upstream).sum().backward()
        grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
        results.append((forward(x).detach(), inputs.grad, *grads))
    assert len(calls) == 2, "the fused node ran (forward with and without grad)"
    for fused, general in zip(*results, strict=True):
        assert relative(fused, general) <= EXACT


def test_a_trainable_bias_under_4bit_lora_takes_the_general_path_and_gets_its_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """peft's bias="all" trains the quantized layer's bias: the fused node's product is frozen, so
    such a layer must be called as it is (its bias gradient is bitsandbytes' own)."""
    layer, reference = _twin_lora_layers("bnb_nf4", 0)
    for side in (layer, reference):
        side.base_layer.bias.requires_grad_(True)
    calls = count_fused_nodes(monkeypatch)
    x = torch.randn(4, 10, 256)
    for side in (layer, reference):
        side(x).square().sum().backward()
    assert not calls
    assert relative(layer.base_layer.bias.grad, reference.base_layer.bias.grad) <= EXACT


def test_qlora_under_bf16_autocast_is_fused_and_as_close_to_float32_as_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer=gpu over an NF4 base with bfloat16 compute: float32 activations (the unquantized
    weights prepared in float32, as peft prepares them) under bf16 autocast. Every site runs the
    fused node, and its adapter gradients are as close to the float32-compute step's as peft's."""
    import bitsandbytes as bnb
    from peft import get_peft_config, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training

    from peftc.files.load import fill
    from peftc.planning.layout import config_to_write
    from peftc.quant.prepare import prepare_for_training
    from tests.helpers import twin_bases

    plan = peftc.compile(
        [
            "quant=bnb_nf4",
            "quant.compute_dtype=bfloat16",
            "peft.target_modules=all-linear",
            "peft.init_lora_weights=false",
        ]
    )
    spec = plan.spec.quant
    ours_base, theirs_base = (
        quant.for_spec(spec).quantize(spec, base, plan.quantization.modules).eval() for base in twin_bases(plan)
    )
    ours_base = prepare_for_training(ours_base, spec, plan.spec.trainer)
    theirs_base = prepare_model_for_kbit_training(theirs_base, use_gradient_checkpointing=False)
    theirs_base.enable_input_require_grads()  # peftc's quant.input_grads (peft's with checkpointing)
    config = get_peft_config({**config_to_write(plan.adapter_config), "inference_mode": False})
    theirs = get_peft_model(theirs_base, config).train()
    ours = materialize(plan, base_model=ours_base).train()
    fill(ours, "default", get_peft_model_state_dict(theirs))
    x = token_batch()

    def adapter_grads(model: nn.Module, autocast: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=x, labels=x).loss.backward()
        return {n[n.index("layers.") :]: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
        squared = sum((grads[k] - reference[k]).norm() ** 2 for k in reference)
        return float((squared / sum(t.norm() ** 2 for t in reference.values())) ** 0.5)

    calls = count_fused_nodes(monkeypatch)
    ours_bf16, theirs_bf16 = adapter_grads(ours, autocast=True), adapter_grads(theirs, autocast=True)
    assert len(calls) == len(plan.sites) and all(g.dtype == torch.float32 for g in ours_bf16.values())
    for model in (ours, theirs):  # the same codes, multiplied out in float32: the reference step
        for layer in model.modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                layer.compute_dtype = torch.float32
    exact = adapter_grads(ours, autocast=False)
    assert error(adapter_grads(theirs, autocast=False), exact) < 1e-5
    theirs_error = error(theirs_bf16, exact)
    assert 1e-4 < theirs_error < 0.05, "bf16 rounding shows, and is small"
    assert error(ours_bf16, exact) <= 1.5 * theirs_error


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_updates_only_the_adapter_and_survives_validation(backend: str) -> None:
    plan = peftc.compile([f"quant={backend}", "peft.target_modules=all-linear", "peft.init_lora_weights=false"])
    model = materialize(plan)
    frozen = {
        path: quant.get(backend).dequantize(model.base_model.get_submodule(path).base_layer).clone()
        for path in plan.quantization.modules
        if plan.site(path)
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = token_batch()
    for mode in ("train", "eval", "train"):  # an eval pass between steps, as validation does
        getattr(model, mode)()
        if mode == "eval":
            with torch.no_grad():
                model(input_ids=x)
            continue
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(trainable) == 2 * len(plan.sites) and all(
            p.grad is not None and p.grad.abs().sum() > 0 for p in trainable
        )
        optimizer.step()
        optimizer.zero_grad()
    for path, weight in frozen.items():
        assert torch.equal(quant.get(backend).dequantize(model.base_model.get_submodule(path).base_layer), weight)


def test_float32_unquantized_prepares_a_bf16_base_like_peft() -> None:
    plan = peftc.compile(["quant=bnb_nf4", "model.dtype=bfloat16", "quant.compute_dtype=bfloat16"])
    model = materialize(plan)
    base = model.base_model
    assert base.model.norm.weight.dtype == torch.float32 and base.lm_head.weight.dtype == torch.float32
    assert base.model.embed_tokens.weight.dtype == torch.float32
    assert "bfloat16" not in plan.quantization.bytes_by_dtype
    x = token_batch()
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_gradient_checkpointing_is_enabled_without_deprecation_warnings() -> None:
    plan = peftc.compile(["quant=bnb_nf4", "trainer.gradient_checkpointing=true"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = materialize(plan)
    layers = model.base_model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    x = token_batch()
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    # lora_B starts at zero, so only B's gradient is non-zero after the first backward
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(grad is not None for grad in grads.values())
    assert all(grad.abs().sum() > 0 for name, grad in grads.items() if "lora_B" in name)


# ----------------------------------------------------------------------------- merging


@pytest.mark.parametrize("backend", EIGHT_BIT)
def test_merging_into_an_8bit_base_requantizes_with_a_warning(backend: str) -> None:
    plan = peftc.compile([f"quant={backend}", "peft.init_lora_weights=false"])
    model = materialize(plan).eval()
    x = token_batch()
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
        with model.disable_adapter():
            base = model(input_ids=x).logits
    layer = model.base_model.get_submodule(plan.sites[0].path)
    stored = backend_of(layer.base_layer).stored_bytes(layer.base_layer)
    with pytest.warns(
        peftc.runtime.model.QuantizedMergeWarning, match=rf"merged into 4 quantized layers \({backend}\)"
    ):
        model.merge_adapter()
    with torch.no_grad():
        merged = model(input_ids=x).logits
    # the merge keeps (nearly) all of the adapter's effect: its error is small next to that effect
    assert max_diff(merged, unmerged) < 0.1 * max_diff(unmerged, base)
    assert backend_of(layer.base_layer).name == backend  # still quantized: stored as before
    assert backend_of(layer.base_layer).stored_bytes(layer.base_layer) == stored
    model.unmerge_adapter()  # the stored quantized weights come back exactly
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, unmerged)


@pytest.mark.parametrize("backend", FOUR_BIT)
def test_merging_into_a_4bit_base_is_refused_and_changes_nothing(backend: str) -> None:
    plan = peftc.compile([f"quant={backend}", "peft.init_lora_weights=false"])
    model = materialize(plan).eval()
    x = token_batch()
    with torch.no_grad():
        before = model(input_ids=x).logits
    with pytest.raises(peftc.PlanError, match=rf"quant='{backend}': cannot merge into .*4-bit.*save_merged=true"):
        model.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)
    assert all(not layer.merged_adapters for _, layer in model.adapter_layers())


@pytest.mark.parametrize("backend", ["bnb_nf4", "torchao_int8"])
def test_save_merged_folds_the_adapter_into_the_unquantized_base(backend: str, tmp_path) -> None:
    from peft import PeftModel

    from peftc.cli.export import merged_model
    from tests.helpers import build_base

    plan = peftc.compile([f"quant={backend}", "peft.init_lora_weights=false"])
    torch.manual_seed(0)  # the random adapter: the same whatever ran before in this process
    model = materialize(plan)
    model.save_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftc.runtime.model.QuantizedMergeWarning)  # no requantization happens
        merged = merged_model(model, plan).eval()
    assert not any(backend_of(m) for m in merged.modules())
    oracle = PeftModel.from_pretrained(build_base(plan), tmp_path).eval()
    x = token_batch()
    with torch.no_grad():
        expected = oracle(input_ids=x).logits
        # float rounding only: up to 7e-7 of the largest logit over 8 seeds (1e-5 absolute was
        # exceeded by 1.6e-5 on logits of ~14 when earlier tests moved the RNG)
        assert max_diff(merged(input_ids=x).logits, expected) <= 2e-6 * float(expected.abs().max())


# ------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("backend", ["bnb_int8", "bnb_fp4", "quanto_int4", "torchao_int8"])
def test_a_saved_adapter_loads_back_onto_a_quantized_base(backend: str, tmp_path) -> None:
    plan = peftc.compile([f"quant={backend}", "peft.init_lora_weights=false"])
    model = materialize(plan).eval()
    model.save_adapter(tmp_path)
    x = token_batch()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    rebuilt = peftc.load_adapter(tmp_path)  # base rebuilt from the saved plan, quantized like it
    onto_live = peftc.load_adapter(load_base_model(plan), tmp_path)
    for loaded in (rebuilt, onto_live):
        assert loaded.plan_of("default").quantization.modules == plan.quantization.modules
        assert loaded.plan_of("default").quantization.backend == backend
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=x).logits, expected)


# ------------------------------------------------------------------------ quantize on load
def stored_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The plain tensors a quantized layer's weight is stored in (codes, scales, shifts)."""
    return leaf_tensors(module.weight.data)


# each backend at its defaults, and QLoRA's usual bfloat16 compute over a float32 checkpoint
LOADED_CHECKPOINTS = [(option, ()) for option in BACKENDS] + [("bnb_nf4", ("quant.compute_dtype=bfloat16",))]


@pytest.mark.parametrize(
    ("option", "settings"), LOADED_CHECKPOINTS, ids=[" ".join([o, *s]) for o, s in LOADED_CHECKPOINTS]
)
def test_a_loaded_checkpoint_is_quantized_while_transformers_reads_it(
    option: str, settings: tuple[str, ...], tiny_llama_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QLoRA's point: the unquantized model never exists in memory. The layers transformers'
    loader quantizes are exactly the planned ones, stored bit for bit as peftc's own quantizing
    pass stores them, in the planned bytes, computing in the same dtype."""
    overrides = [
        f"quant={option}",
        "model=hf",
        f"model.name_or_path={tiny_llama_dir}",
        "peft.target_modules=all-linear",
        *settings,
    ]
    plan = peftc.compile(overrides)
    backend = quant.for_spec(plan.spec.quant)
    after_building = load_base_model(peftc.compile([*overrides[:1], "model=tiny_llama", *overrides[3:]]))

    def built_whole_first(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checkpoint was loaded whole, then quantized")

    monkeypatch.setattr(type(backend), "quantize", built_whole_first)
    on_load = load_base_model(plan)
    quantized = {path for path, module in on_load.named_modules() if backend.owns(module)}
    assert quantized == set(plan.quantization.modules) and "lm_head" not in quantized
    assert base_bytes_measured(on_load) == plan.quantization.bytes_by_dtype
    for path in plan.quantization.modules:
        ours, theirs = on_load.get_submodule(path), after_building.get_submodule(path)
        assert type(ours) is type(theirs) and type(ours.weight.data) is type(theirs.weight.data), path
        assert getattr(ours, "compute_dtype", None) == getattr(theirs, "compute_dtype", None), path
        ours_stored, theirs_stored = stored_tensors(ours), stored_tensors(theirs)
        assert len(ours_stored) == len(theirs_stored), path
        for mine, reference in zip(ours_stored, theirs_stored):
            assert mine.dtype == reference.dtype and torch.equal(mine, reference), path
        assert getattr(ours, "support_avx512bf16_for_cpu", False) is False  # one 4-bit layout in train and eval mode
    for name, buffer in after_building.named_buffers():
        loaded = on_load.get_buffer(name)
        assert (loaded.dtype, loaded.device) == (buffer.dtype, buffer.device) and torch.equal(loaded, buffer), name
    x = token_batch()
    assert torch.equal(on_load(input_ids=x).logits, after_building(input_ids=x).logits)
    model = materialize(plan, on_load)  # and adapters go on top as usual
    assert model.trainable_parameters() == plan.trainable_params


@pytest.mark.parametrize("option", ["quanto_int8", "quanto_int4"])
def test_quanto_layers_quantized_while_loading_keep_their_scales_in_the_model_dtype(
    option: str, tiny_llama_dir: str
) -> None:
    """transformers leaves quanto's activation scales float32 in a bf16 model; peftc's own pass
    keeps them in the weight's dtype, and loading must give the same model."""
    plan = peftc.compile(
        [f"quant={option}", "model=hf", f"model.name_or_path={tiny_llama_dir}", "model.dtype=bfloat16"]
        + ["quant.float32_unquantized=false"]
    )
    base = load_base_model(plan)
    for path in plan.quantization.modules:
        layer = base.get_submodule(path)
        assert layer.input_scale.dtype == layer.output_scale.dtype == torch.bfloat16, path


@pytest.mark.parametrize(
    ("override", "kept"),
    [
        ("++model.config.tie_word_embeddings=true", "lm_head"),  # tied to the input embedding
        ("peft.modules_to_save=[lm_head]", "lm_head"),  # trained in full
        ("task=seq_cls", "score"),  # the task head
    ],
    ids=["tied", "modules_to_save", "task-head"],
)
def test_tied_and_fully_trained_heads_stay_plain_whatever_skip_modules_says(override: str, kept: str) -> None:
    """skip_modules lists what else to keep: a head tied to the embedding, in modules_to_save or a
    task head is never quantized (skip_modules=[down_proj] alone would quantize the output head)."""
    plan = peftc.compile(["quant=bnb_int8", "quant.skip_modules=[down_proj]", override])
    assert kept in plan.quantization.skipped and kept not in plan.quantization.modules
    assert type(load_base_model(plan).get_submodule(kept)) is nn.Linear


def test_a_skip_modules_string_is_a_full_match_regex_over_module_paths() -> None:
    layer_0 = peftc.compile(["quant=bnb_int8", "quant.skip_modules='model.layers.0.*'"]).quantization
    assert set(layer_0.skipped) == {p for p in layer_0.skipped + layer_0.modules if p.startswith("model.layers.0.")}
    assert len(layer_0.skipped) == 7 and "lm_head" in layer_0.modules
    assert peftc.compile(["quant=bnb_int8", "quant.skip_modules='layers.0.*'"]).quantization.skipped == ()


@pytest.mark.parametrize("in_features", [100, 160, 192, 256, 320])
def test_quanto_int4_planned_bytes_follow_quantos_groups_for_rows_wider_than_128(in_features: int) -> None:
    """Groups of 128 input columns, else 96, 64 or 32 where that divides the row, else one group
    per row (the tiny test models' rows are all <= 128: one group each)."""
    from peftc.planning.graph import graph_of

    backend = quant.get("quanto_int4")
    box = nn.Sequential(nn.Linear(in_features, 8))
    info = next(m for m in graph_of(box).modules if m.path == "0")
    backend.quantize(backend.schema(), box, ("0",))
    assert backend.weight_bytes(backend.schema(), info, "float32") == backend.stored_bytes(box[0])


@pytest.mark.parametrize(
    ("backend", "setting", "field", "value"),
    [
        ("bnb_nf4", "quant.double_quant=false", "double_quant", False),
        ("bnb_int8", "quant.threshold=6.0", "threshold", 6.0),
    ],
)
def test_a_base_quantized_with_non_default_settings_is_planned_and_read_back_with_them(
    backend: str, setting: str, field: str, value: object, tmp_path
) -> None:
    """The planned bytes are the loaded layers' bytes; an adapter loaded onto such a live base
    describes its quantization with the same settings, and its saved plan rebuilds that base."""
    from peftc.quant.base import add_bytes

    def quantized_bytes(model: nn.Module) -> dict[str, int]:
        return add_bytes(*(backend_of(m).stored_bytes(m) for m in model.modules() if backend_of(m)))

    plan = peftc.compile([f"quant={backend}", setting])
    base = load_base_model(plan)  # quantized while transformers reads the checkpoint
    assert plan.quantization.bytes_by_dtype == base_bytes_measured(base)
    materialize(plan, base_model=base).save_adapter(tmp_path)
    loaded = peftc.load_adapter(load_base_model(plan), tmp_path).plan_of("default")
    assert getattr(loaded.spec.quant, field) == value
    assert loaded.quantization.bytes_by_dtype == plan.quantization.bytes_by_dtype
    rebuilt = peftc.load_adapter(tmp_path)  # built from the saved plan, then quantized by peftc
    assert quantized_bytes(rebuilt.base_model) == quantized_bytes(base)


@pytest.mark.parametrize("input_grads", [True, False])
def test_input_grads_makes_the_input_embeddings_output_require_grad(input_grads: bool) -> None:
    """peft's k-bit preparation hook: gradients reach adapters below frozen (checkpointed) blocks."""
    plan = peftc.compile(["quant=bnb_nf4", f"quant.input_grads={str(input_grads).lower()}"])
    base = load_base_model(plan)
    assert base.get_input_embeddings()(token_batch()).requires_grad is input_grads


def test_float32_unquantized_upcasts_a_float16_base_too() -> None:
    """peft's prepare_model_for_kbit_training upcasts float16 weights as well as bfloat16 ones."""
    plan = peftc.compile(["quant=bnb_nf4", "model.dtype=float16", "quant.compute_dtype=float16"])
    base = load_base_model(plan)
    assert base.model.norm.weight.dtype == base.lm_head.weight.dtype == torch.float32
    assert plan.quantization.bytes_by_dtype == base_bytes_measured(base)
    assert "float16" not in plan.quantization.bytes_by_dtype
