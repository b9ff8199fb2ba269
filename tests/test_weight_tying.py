"""LoRA's ensure_weight_tying against peft 0.22 on a tied tiny Llama (tie_word_embeddings) and
GPT-2: the output head follows the input embedding's trained copy (modules_to_save) or LoRA
(target_modules, the head's factors the embedding's transposed). Files either side writes load
on the other with the same outputs; training moves the one shared copy or pair of factors; a
merge adds the update once to the one shared weight.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import peftc
from peftc.errors import AdapterFileError, MergeError, PlanError
from tests.helpers import build_base, token_batch

TIED_LLAMA = ("model=tiny_llama", "++model.config.tie_word_embeddings=true")
MODELS = {"llama": TIED_LLAMA, "gpt2": ("model=tiny_gpt2",)}
EMBEDDING = {"llama": "model.embed_tokens", "gpt2": "transformer.wte"}
# case -> (model, LoraConfig fields); every case sets ensure_weight_tying
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "copy-of-embed_tokens": ("llama", {"modules_to_save": ["embed_tokens"], "target_modules": ["q_proj"]}),
    "copy-of-lm_head": ("llama", {"modules_to_save": ["lm_head"], "target_modules": ["q_proj"]}),
    "lora-on-embed_tokens": ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    "lora-on-embed_tokens-and-lm_head": ("llama", {"target_modules": ["embed_tokens", "lm_head"]}),
    "gpt2-copy-of-lm_head": ("gpt2", {"modules_to_save": ["lm_head"], "target_modules": ["c_attn"]}),
    "gpt2-lora-on-lm_head": ("gpt2", {"target_modules": ["lm_head", "c_attn"]}),
    # a regex naming lm_head: peft widens it to the embedding's path, whose LoRA the head follows
    "lora-on-a-regex-naming-lm_head": ("llama", {"target_modules": r"lm_head|.*\.q_proj"}),
    # peft 0.22 gives the head a DoRA magnitude of its own (vocab,), beside the embedding's (dim,)
    "lora-with-dora-on-embed_tokens": ("llama", {"target_modules": ["embed_tokens", "q_proj"], "use_dora": True}),
}
TOLERANCE = 1e-5
DROPOUT = 0.1  # every case trains with it: in training the head drops its input out as peft's does
# peft 0.22 rewrites GPT-2's target_modules to `transformer.wte`, then on loading ties only what
# is named embed_tokens or lm_head: the head's saved factors are dropped, its outputs change.
PEFT_LOSES_THE_TIE = {"gpt2-lora-on-lm_head"}
# The head's and the embedding's DoRA rescale one W + dW two ways (by vocabulary row and by
# embedding dimension): no one tied weight gives both, so merging is refused.
MERGE_REFUSED = {"lora-with-dora-on-embed_tokens"}


def overrides(model: str, fields: dict[str, Any]) -> list[str]:
    listed = [
        f"peft.{key}={str(value).lower()}"
        if isinstance(value, bool)
        else f"peft.{key}='{value}'"
        if isinstance(value, str)
        else f"peft.{key}=[{','.join(value)}]"
        for key, value in fields.items()
    ]
    return [*MODELS[model], "peft.r=4", f"peft.lora_dropout={DROPOUT}", "peft.ensure_weight_tying=true", *listed]


def peft_model(plan: Any, fields: dict[str, Any], **extra: Any) -> Any:
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=DROPOUT, ensure_weight_tying=True, **fields, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(build_base(plan), config)


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """peft's model for the case, moved off its init (every trainable tensor, seeded), saved."""
    model, fields = CASES[request.param]
    plan = peftc.compile(overrides(model, fields))
    theirs = peft_model(plan, fields)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in {p.data_ptr(): p for p in theirs.parameters() if p.requires_grad}.values():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    directory = tmp_path_factory.mktemp(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(directory)
    found = {"name": request.param, "model": model, "fields": fields, "plan": plan, "dir": directory}
    # ours loaded once per case (trainable; in eval mode: gradients without GPT-2's dropout)
    return {**found, "theirs": theirs.eval(), "ours": load_ours(found, is_trainable=True).eval()}


def logits(model: Any) -> torch.Tensor:
    return model(input_ids=token_batch()).logits


def load_ours(case: dict[str, Any], **options: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peftc.load_adapter(build_base(case["plan"]), case["dir"], **options)


def test_the_plan_writes_the_config_fields_peft_writes(case: dict[str, Any]) -> None:
    written = json.loads((case["dir"] / "adapter_config.json").read_text())
    ours = case["plan"].adapter_config
    for key in ("target_modules", "modules_to_save"):
        assert sorted(ours[key] or []) == sorted(written[key] or []), key
    assert ours["ensure_weight_tying"] is written["ensure_weight_tying"] is True


def test_an_adapter_peft_wrote_loads_with_peft_s_outputs(case: dict[str, Any]) -> None:
    with torch.no_grad():
        assert (logits(case["ours"]) - logits(case["theirs"])).abs().max() < TOLERANCE


def test_in_training_ours_drops_out_what_peft_s_drops_out(case: dict[str, Any]) -> None:
    """Under one seed the training outputs are peft's: the tied head's LoRA drops out its input
    with the embedding's lora_dropout (the head is a LoRA layer of its own in peft)."""
    ours, theirs = load_ours(case).train(), case["theirs"]
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            trained = logits(ours)
            torch.manual_seed(0)
            assert (trained - logits(theirs.train())).abs().max() < TOLERANCE
            assert (trained - logits(ours.eval())).abs().max() > TOLERANCE, "dropout changed nothing"
    finally:
        theirs.eval()


def peft_loaded(case: dict[str, Any], directory: Path) -> Any:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(build_base(case["plan"]), directory).eval()


def test_ours_saves_peft_s_tensor_names_and_peft_loads_it_as_its_own(case, tmp_path: Path) -> None:
    """peft reads our file as it reads its own: with our outputs, except where peft cannot read
    its own (PEFT_LOSES_THE_TIE)."""
    ours = case["ours"]
    ours.save_adapter(tmp_path)
    written = load_file(case["dir"] / "adapter_model.safetensors")
    assert load_file(tmp_path / "adapter_model.safetensors").keys() == written.keys()
    with torch.no_grad():
        again = logits(peft_loaded(case, tmp_path))
        assert (again - logits(peft_loaded(case, case["dir"]))).abs().max() < TOLERANCE
        if case["name"] not in PEFT_LOSES_THE_TIE:
            assert (again - logits(ours)).abs().max() < TOLERANCE


def _grads(model: Any, prefix: str) -> dict[str, torch.Tensor]:
    """Gradients by module path and peft's saved tensor name."""
    logits(model).pow(2).mean().backward()
    names = {
        n.replace(".default", "")
        .replace(".modules_to_save", "")
        .replace("magnitude_vector.weight", "magnitude_vector"): p
        for n, p in model.named_parameters()
    }
    return {n.removeprefix(prefix): p.grad for n, p in names.items() if p.grad is not None}


def test_the_shared_copy_or_factors_get_the_gradient_of_both_modules(case: dict[str, Any]) -> None:
    """One trained tensor: its gradient is the sum of what the embedding and the head send it.
    peft's modules_to_save copy is one parameter too; its tied LoRA factors are two parameters on
    one storage (gradients apart, each its own optimizer state), whose sum is ours."""
    ours, theirs = case["ours"], case["theirs"]
    ours.zero_grad()
    theirs.zero_grad()
    ours_grads, their_grads = _grads(ours, "base_model."), _grads(theirs, "base_model.model.")
    embedding = EMBEDDING[case["model"]]
    if "lora" in case["name"]:
        for own, head in (("lora_embedding_A", "lora_B.weight"), ("lora_embedding_B", "lora_A.weight")):
            expected = their_grads[f"{embedding}.{own}"] + their_grads[f"lm_head.{head}"].T
            assert torch.allclose(ours_grads.pop(f"{embedding}.{own}"), expected, atol=1e-5)
            their_grads.pop(f"{embedding}.{own}"), their_grads.pop(f"lm_head.{head}")
    assert ours_grads.keys() == their_grads.keys()
    assert all(torch.allclose(ours_grads[n], their_grads[n], atol=1e-5) for n in ours_grads)


def test_the_tied_tensors_are_trained_and_counted_once(case: dict[str, Any]) -> None:
    """As peft's modules_to_save count; peft counts tied LoRA factors twice (two parameters)."""
    ours = case["ours"]
    trainable, _ = case["theirs"].get_nb_trainable_parameters()
    if "lora" in case["name"]:
        factors = ("lm_head.lora_A", "lm_head.lora_B")  # not the head's own DoRA magnitude
        trainable -= sum(p.numel() for n, p in case["theirs"].named_parameters() if any(f in n for f in factors))
    assert ours.trainable_parameters() == case["plan"].trainable_params == trainable


def test_a_merge_adds_the_update_once_to_the_shared_weight(case: dict[str, Any]) -> None:
    """The merged model keeps the head tied and gives the unmerged outputs. peft's merge agrees
    for a trained copy; for tied LoRA it adds the update twice to the one weight (its merged
    outputs are not its unmerged ones), so ours is checked against peft's unmerged model. With
    DoRA the merge is refused by the head's name, before any weight changes."""
    ours = load_ours(case)
    if case["name"] in MERGE_REFUSED:
        with pytest.raises(MergeError, match=r"lm_head is tied .* cannot hold two different DoRA results") as error:
            ours.merge_and_unload()
        assert "\n" not in str(error.value)
        with torch.no_grad():
            assert (logits(ours) - logits(case["theirs"])).abs().max() < TOLERANCE
        return
    with torch.no_grad():
        unmerged = logits(ours)
        merged = ours.merge_and_unload()
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
        assert (logits(merged) - unmerged).abs().max() < TOLERANCE
        assert (logits(merged) - logits(case["theirs"])).abs().max() < TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_unmerge_gives_back_the_shared_weight(case: dict[str, Any], dtype: torch.dtype) -> None:
    """Merged then unmerged, the one weight is the base's again (bf16: exactly, from the copy kept
    before the embedding's merge) and the outputs are the unmerged ones."""
    if case["name"] in MERGE_REFUSED:
        pytest.skip("merging is refused (test_a_merge_adds_the_update_once_to_the_shared_weight)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = peftc.load_adapter(build_base(case["plan"]).to(dtype), case["dir"])
    weight = ours.base_model.get_input_embeddings().weight
    before, pristine = logits(ours), weight.detach().clone()
    with torch.no_grad():
        ours.merge_adapter()
        ours.unmerge_adapter()
        torch.testing.assert_close(weight, pristine, rtol=0.0, atol=0.0 if dtype == torch.bfloat16 else TOLERANCE)
        assert (logits(ours) - before).abs().max() < TOLERANCE


def test_a_continued_run_plans_the_tie_and_starts_from_the_saved_tensors(case, tmp_path: Path) -> None:
    """`adapter=DIR` goes through the same reading of the file: the head follows again, and the
    tensors training starts from are the file's, checked strictly."""
    from peftc.files.load import initial_tensors

    peftc.materialize(case["plan"], base_model=build_base(case["plan"])).save_adapter(tmp_path)
    plan = peftc.compile([f"adapter={tmp_path}", "task=causal_lm", "trainer.max_steps=1"])
    assert [m.follows for m in plan.modules_to_save] == [m.follows for m in case["plan"].modules_to_save]
    assert [s.shares_with for s in plan.sites] == [s.shares_with for s in case["plan"].sites]
    assert initial_tensors(plan).keys() == load_file(tmp_path / "adapter_model.safetensors").keys()


@pytest.mark.parametrize(("init", "dora"), [("true", False), ("gaussian", False), ("false", False), ("false", True)])
def test_a_seeded_tied_lora_starts_from_peft_s_draws(init: str, dora: bool) -> None:
    """peft builds the head's two Linear layers (drawing their init), ties them to the
    embedding's factors and resets them there: under one seed ours holds the same numbers. With
    DoRA the head's magnitude is ||W + dW|| per vocabulary row of those factors (init false:
    random ones, so dW is not zero)."""
    from peft import get_peft_model_state_dict

    model, fields = CASES["lora-on-embed_tokens"]
    fields = {**fields, "use_dora": True} if dora else fields
    plan = peftc.compile([*overrides(model, fields), f"peft.init_lora_weights={init}"])
    base = build_base(plan)
    torch.manual_seed(0)
    ours = peftc.materialize(plan, base_model=base).adapter_state_dict("default")
    torch.manual_seed(0)
    theirs = get_peft_model_state_dict(
        peft_model(plan, fields, init_lora_weights={"true": True, "false": False}.get(init, init))
    )
    lora = {k for k in theirs if "lora" in k}
    assert ("base_model.model.lm_head.lora_magnitude_vector" in lora) is dora
    assert all(torch.equal(ours[k], theirs[k]) for k in lora)
    assert theirs[f"base_model.model.{EMBEDDING[model]}.lora_embedding_B"].std() > 0


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        (["peft.init_lora_weights=pissa"], "init_lora_weights true, false or gaussian"),
        (["peft.exclude_modules=[embed_tokens]"], "keep model.embed_tokens adapted"),
        (["model.model_type=phi"], "lm_head has a bias, which peft's tied head drops"),  # Phi's head has one
    ],
    ids=["pissa", "embedding-excluded", "head-with-a-bias"],
)
def test_ties_that_cannot_be_honoured_are_refused_by_name_before_loading(setting: list[str], named: str) -> None:
    fields = CASES["lora-on-embed_tokens"][1]
    with pytest.raises(PlanError, match=r"peft\.ensure_weight_tying") as error:
        peftc.compile([*overrides("llama", fields), *setting])
    assert named in str(error.value) and "\n" not in str(error.value)


def test_an_adalora_file_with_the_flag_is_refused_by_name(tmp_path: Path) -> None:
    """peft's AdaLoRA inherits the tie; peftc implements it for LoRA only."""
    plan = peftc.compile(overrides(*CASES["copy-of-embed_tokens"]))
    peftc.materialize(plan, base_model=build_base(plan)).save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "ADALORA", "total_step": 10}))
    with pytest.raises(AdapterFileError, match="ensure_weight_tying"):
        peftc.load_adapter(build_base(plan), tmp_path)


@pytest.mark.parametrize(
    ("model", "targets", "said"),
    [
        (("model=tiny_llama",), "embed_tokens", "peft.ensure_weight_tying=true ties nothing: LlamaForCausalLM has no"),
        (TIED_LLAMA, "q_proj", "peft.ensure_weight_tying=true ties no adapter: neither modules_to_save nor"),
    ],
    ids=["untied-model", "no-tied-module-named"],
)
def test_a_flag_that_ties_nothing_says_so_as_peft_warns(model: tuple[str, ...], targets: str, said: str) -> None:
    plan = peftc.compile([*model, "peft.ensure_weight_tying=true", f"peft.target_modules=[{targets}]"])
    assert not any(s.shares_with for s in plan.sites)
    assert [w[: len(said)] for w in plan.warnings] == [said]


@pytest.mark.parametrize(
    "overrides",
    [
        [*TIED_LLAMA, "peft=loha", "peft.modules_to_save=[embed_tokens]"],  # LoHa has no such setting
        ["model=tiny_t5", "task=seq2seq_lm", "peft.ensure_weight_tying=true", "peft.target_modules=[shared,q]"],
    ],
    ids=["a-method-without-the-flag", "sharers-the-flag-never-ties"],
)
def test_the_tied_weight_warning_suggests_the_flag_only_where_it_would_tie(overrides: list[str]) -> None:
    warned = [w for w in peftc.compile(overrides).warnings if "(tied weights)" in w]
    assert warned and not any("ensure_weight_tying" in w for w in warned)


def test_the_plan_names_who_follows_whom_and_stops_warning_of_the_untied_head() -> None:
    untied = peftc.compile([*TIED_LLAMA, "peft.modules_to_save=[embed_tokens]"])
    assert any(w.endswith("; peft.ensure_weight_tying=true ties lm_head to it") for w in untied.warnings)
    model, fields = CASES["copy-of-lm_head"]
    tied = peftc.compile(overrides(model, fields))
    assert tied.warnings == ()
    assert {m.path: m.follows for m in tied.modules_to_save} == {
        "model.embed_tokens": None,
        "lm_head": "model.embed_tokens",
    }
    lora = peftc.compile(overrides(*CASES["lora-on-embed_tokens"]))
    assert "lm_head (follows model.embed_tokens)" in str(lora)


@pytest.mark.parametrize("flag", [True, False])
def test_trainable_tokens_follow_the_embedding_with_or_without_the_flag(flag: bool) -> None:
    """peft ties the head's rows to the embedding's whenever the weights are tied and the indices
    agree; with the flag and other indices for the head it raises, and peftc refuses by name."""
    tied = [*TIED_LLAMA, f"peft.ensure_weight_tying={str(flag).lower()}"]
    plan = peftc.compile([*tied, "peft.trainable_token_indices=[3,5]"])
    assert plan.site("lm_head").shares_with == "model.embed_tokens"
    with pytest.raises(PlanError, match="trainable_token_indices.lm_head"):
        peftc.compile([*tied, "peft.trainable_token_indices={embed_tokens: [3], lm_head: [4]}"])


def test_embeddings_sharing_the_input_embedding_s_weight_are_not_heads_that_follow_it() -> None:
    """T5's encoder and decoder embed_tokens are `shared` itself, not output heads: trainable
    tokens on `shared` stay refused (peft does not tie their rows), only a Linear head follows."""
    with pytest.raises(PlanError, match="decoder.embed_tokens, encoder.embed_tokens, which peft does not tie"):
        peftc.compile(["model=tiny_t5", "task=seq2seq_lm", "peft.trainable_token_indices=[3,5]"])


# ------------------------------------------------------- the tie through what users do with a model
def trained(case: str) -> Any:
    """Our model for a tied case, its trainable tensors moved off their init (seeded)."""
    model, fields = CASES[case]
    plan = peftc.compile([*overrides(model, fields), "model.config.num_hidden_layers=1"])
    ours = peftc.materialize(plan, base_model=build_base(plan))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in ours.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return ours.eval()


TIED_FORMS = ["copy-of-embed_tokens", "lora-on-embed_tokens"]


@pytest.mark.parametrize("name", TIED_FORMS)
def test_a_deep_copy_s_head_follows_the_copy_s_embedding(name: str) -> None:
    """Training the copy moves its head with its own embedding, and leaves the original alone."""
    import copy

    original = trained(name)
    expected = logits(original)
    clone = copy.deepcopy(original)
    with torch.no_grad():
        head_before = clone.base_model.get_output_embeddings()(torch.ones(1, 64))
        for param in clone.base_model.get_input_embeddings().parameters():
            if param.requires_grad:
                param.mul_(-1.5)
        head_after = clone.base_model.get_output_embeddings()(torch.ones(1, 64))
        assert not torch.allclose(head_after, head_before), "the copy's head follows the original's embedding"
        assert torch.equal(logits(original), expected), "the original moved with its copy"


@pytest.mark.parametrize("name", TIED_FORMS)
def test_a_merged_model_saved_by_transformers_reloads_tied_with_the_adapter_s_outputs(name: str, tmp_path) -> None:
    """One weight saved once: transformers ties the head back to it (tie_word_embeddings stays)."""
    from transformers import AutoModelForCausalLM

    ours = trained(name)
    with torch.no_grad():
        expected = logits(ours)
        ours.merge_and_unload().save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert reloaded.config.tie_word_embeddings
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
        assert (logits(reloaded) - expected).abs().max() < TOLERANCE


def test_a_second_tied_adapter_loads_tied_into_a_model_that_has_one(tmp_path: Path) -> None:
    """Planned on the adapted model, whose wrappers hide the tie unless the graph sees through them
    (a trained copy plans the same way)."""
    name = "lora-on-embed_tokens"
    ours = trained(name)
    expected = logits(ours)
    ours.save_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = peftc.load_adapter(trained(name), tmp_path, adapter_name="second")
    assert [s.shares_with for s in both.plan_of("second").sites] == [s.shares_with for s in ours.plans["default"].sites]
    both.set_adapter("second")
    with torch.no_grad():
        assert torch.equal(logits(both), expected)


def test_a_weighted_tied_lora_is_the_embedding_s_combination_and_the_head_follows_it() -> None:
    """peft's linear rule on the embedding (the sign on A); the head's factors are those,
    transposed, so a merge still adds the combined update once to the one weight."""
    ours = trained("lora-on-embed_tokens")
    ours.add_adapter("second", ours.plans["default"])
    with torch.no_grad():
        for param in ours.base_model.get_input_embeddings().lora_embedding_A.values():
            param.add_(0.1)
    embedding, scaling = ours.base_model.get_input_embeddings(), 2.0
    factors = [
        (embedding.lora_embedding_A[n].clone(), embedding.lora_embedding_B[n].clone()) for n in ("default", "second")
    ]
    ours.add_weighted_adapter(["default", "second"], [0.7, -0.3], "mix", combination_type="linear")
    roots = [(0.7 * scaling) ** 0.5, (0.3 * scaling) ** 0.5]
    assert torch.allclose(embedding.lora_embedding_A["mix"], roots[0] * factors[0][0] - roots[1] * factors[1][0])
    assert torch.allclose(embedding.lora_embedding_B["mix"], roots[0] * factors[0][1] + roots[1] * factors[1][1])
    ours.set_adapter("mix")
    with torch.no_grad():
        unmerged = logits(ours)
        merged = ours.merge_and_unload()
        assert (logits(merged) - unmerged).abs().max() < TOLERANCE
