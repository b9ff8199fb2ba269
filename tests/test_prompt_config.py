"""Prompt methods at compile time and around the edges: shapes derived from the model config,
refused combinations with their reasons, init options against peft, task ids from the data."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import peftc
from peftc.errors import ConfigError, DataError, PlanError
from peftc.planning import compat
from tests.helpers import build_base, max_diff, peft_config_from_plan, token_batch


# ------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # (token_dim, layers, heads, submodules): GQA Llama caches 2 kv heads x 16 dims
        (["peft=prefix_tuning"], (32, 2, 2, 1)),
        (["peft=prompt_tuning"], (64, 2, 4, 1)),
        (["peft=prefix_tuning", "model=tiny_gpt2"], (64, 2, 4, 1)),
        (
            ["peft=prefix_tuning", "model=tiny_t5", "task=seq2seq_lm", "model.config.num_decoder_layers=3"],
            (64, 3, 4, 2),
        ),
        (["peft=p_tuning", "model=tiny_t5", "task=seq2seq_lm"], (64, 2, 4, 2)),
        (["peft=prefix_tuning", "model=tiny_bert", "task=seq_cls"], (64, 2, 4, 1)),
    ],
)
def test_prompt_shapes_come_from_the_model_config(overrides: list[str], expected: tuple[int, ...]) -> None:
    plan = peftc.compile(overrides)
    p = plan.prompt
    assert (p.token_dim, p.num_layers, p.num_attention_heads, p.num_transformer_submodules) == expected
    shown = str(plan)
    assert "prompt encoder" in shown and "prompt enters as" in shown and f"{p.params:,}" in shown


def test_dry_run_plan_counts_equal_materialized_counts() -> None:
    for overrides in (
        ["peft=p_tuning", "peft.encoder_reparameterization_type=LSTM", "peft.encoder_num_layers=2"],
        ["peft=prefix_tuning", "peft.prefix_projection=true", "model=tiny_gpt2"],
        ["peft=multitask_prompt_tuning", "peft.num_tasks=4", "peft.num_ranks=3", "model=tiny_t5", "task=seq2seq_lm"],
        ["peft=adaption_prompt", "model=tiny_gpt2", "peft.adapter_layers=2"],
    ):
        plan = peftc.compile(overrides)
        model = peftc.materialize(plan)
        assert model.trainable_parameters() == plan.trainable_params
        assert model.total_parameters() == plan.total_params
        assert sum(t.numel() for t in model.adapter_state_dict("default").values()) * 4 <= plan.adapter_bytes


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            ["peft=adaption_prompt", "model=tiny_bert", "task=seq_cls"],
            ConfigError,
            "model='bert': adaption_prompt (LLaMA-Adapter) wraps Llama/Mistral- or GPT-2-style attention layers",
        ),
        (
            ["peft=adaption_prompt", "model=tiny_t5", "task=seq2seq_lm"],
            ConfigError,
            "model='t5': adaption_prompt (LLaMA-Adapter)",
        ),
        (
            ["peft=prefix_tuning", "trainer.gradient_checkpointing=true"],
            ConfigError,
            "trainer.gradient_checkpointing=True: prefix_tuning hands the model its prefix as a key/value cache",
        ),
        (  # the suggestions: test_too_many_positions_are_refused_suggesting_only_numbers_that_fit
            ["peft=prompt_tuning", "model=tiny_gpt2", "data.max_length=510"],
            PlanError,
            "peft.num_virtual_tokens=8: 8 virtual tokens + data.max_length=510 need 518 positions, but "
            "GPT2LMHeadModel has 512 (max_position_embeddings); ",
        ),
        (
            [
                "peft=prefix_tuning",
                "model=tiny_bert",
                "task=seq_cls",
                "data.max_length=500",
                "peft.num_virtual_tokens=20",
            ],
            PlanError,
            "20 virtual tokens + data.max_length=500 need 520 positions",
        ),
        (
            ["peft=adaption_prompt", "peft.adapter_layers=3"],
            PlanError,
            "peft.adapter_layers=3: LlamaForCausalLM has 2 attention layers named 'self_attn'; use at most 2",
        ),
        (
            ["peft=prompt_tuning", "peft.prompt_tuning_init=TEXT"],
            ConfigError,
            "peft.prompt_tuning_init_text: prompt_tuning_init=TEXT needs the text to start from",
        ),
        (
            ["peft=multitask_prompt_tuning", "peft.prompt_tuning_init=EXACT_SOURCE_TASK"],
            ConfigError,
            "peft.prompt_tuning_init_state_dict_path: prompt_tuning_init=EXACT_SOURCE_TASK starts from a trained multitask adapter",
        ),
        (
            [
                "peft=multitask_prompt_tuning",
                "peft.prompt_tuning_init=AVERAGE_SOURCE_TASKS",
                "peft.prompt_tuning_init_state_dict_path=/x/adapter_model.bin",
            ],
            ConfigError,
            "pickle files are never loaded",
        ),
        (
            ["peft=p_tuning", "peft.encoder_reparameterization_type=GRU"],
            ConfigError,
            "peft.encoder_reparameterization_type='GRU': must be one of 'MLP', 'LSTM'",
        ),
    ],
)
def test_refused_combinations_name_the_reason(overrides: list[str], error: type, message: str) -> None:
    with pytest.raises(error) as caught:
        peftc.compile(overrides)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("virtual_tokens", "max_length", "hint"),
    [
        (8, 510, "use at most 2 virtual tokens or lower data.max_length to at most 504"),
        (8, 512, "lower data.max_length to at most 504"),
        (512, 8, "use at most 504 virtual tokens"),
        (512, 512, "use fewer than 512 virtual tokens and lower data.max_length to fit 512 positions"),
    ],
    ids=["either", "length-alone", "tokens-alone", "both"],
)
def test_too_many_positions_are_refused_suggesting_only_numbers_that_fit(
    virtual_tokens: int, max_length: int, hint: str
) -> None:
    """Each suggestion alone fits GPT-2's 512 positions with at least one virtual token and one
    position of text; where neither number alone can, both must change."""
    overrides = [f"peft.num_virtual_tokens={virtual_tokens}", f"data.max_length={max_length}"]
    with pytest.raises(PlanError) as caught:
        peftc.compile(["peft=prompt_tuning", "model=tiny_gpt2", *overrides])
    assert str(caught.value).endswith(f"(max_position_embeddings); {hint}")


def test_a_model_takes_a_cache_by_the_argument_name_peft_checks() -> None:
    """Prefix tuning is refused where peft refuses it: its check_cache_in_signature looks for
    transformers' cache argument by name (`cache` in transformers 5) on the model's forward, then
    its backbone's; `use_cache` alone, or an older name, is no cache to put a prefix in."""
    from peft.utils.integrations import check_cache_in_signature
    from torch import nn

    from peftc.planning.graph import _takes_cache

    class Cached(nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None):  # noqa: ANN001, ANN202
            return input_ids

    class FlagOnly(nn.Module):
        def forward(self, input_ids=None, use_cache=None):  # noqa: ANN001, ANN202
            return input_ids

    class OldName(nn.Module):
        def forward(self, input_ids=None, past_key_values=None):  # noqa: ANN001, ANN202
            return input_ids

    class Head(FlagOnly):  # a seq_cls head whose backbone takes the cache (BERT's)
        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.model = backbone

        @property
        def base_model(self) -> nn.Module:
            return self.model

    for model in (Cached(), FlagOnly(), OldName(), Head(Cached()), Head(FlagOnly())):
        backbone = getattr(model, "base_model", model)
        expected = check_cache_in_signature(model.forward) or check_cache_in_signature(backbone.forward)
        assert _takes_cache(model) == expected, type(model).__name__
    assert _takes_cache(Head(Cached())) and not _takes_cache(FlagOnly())


def test_long_inputs_are_fine_for_relative_positions() -> None:
    plan = peftc.compile(["peft=prompt_tuning", "model=tiny_t5", "task=seq2seq_lm", "data.max_length=4096"])
    assert plan.prompt.num_virtual_tokens == 8


@pytest.mark.parametrize("task", ["token_cls", "question_ans", "feature_extraction"])
def test_virtual_tokens_are_refused_for_per_token_tasks(task: str) -> None:
    run = peftc.compile(["peft=prompt_tuning"]).spec
    with pytest.raises(ConfigError, match="per-token outputs would no longer line up"):
        compat.check(compat.Context("prompt_tuning", task, "none", "auto", run))
    compat.check(compat.Context("prefix_tuning", task, "none", "auto", run))  # keeps the length: allowed


def test_prompt_adapters_refuse_to_merge() -> None:
    for method in ("prompt_tuning", "adaption_prompt"):
        model = peftc.materialize(peftc.compile([f"peft={method}"]))
        with pytest.raises(ConfigError, match="cannot be merged into the base weights"):
            model.merge_and_unload()
        assert model.adapter_names == ["default"], "a refused merge leaves the adapter in place"


# ------------------------------------------------------------------------------------- inits
@pytest.mark.parametrize("text", ["Rate it:", "Hi"], ids=["cut to 8 tokens", "repeated to 8 tokens"])
def test_text_init_is_the_tokenized_text_like_peft(text: str) -> None:
    from peft import get_peft_model

    plan = peftc.compile(
        ["peft=prompt_tuning", "peft.prompt_tuning_init=TEXT", f"peft.prompt_tuning_init_text='{text}'"]
    )
    from peftc.planning.model_source import load_tokenizer

    ids = plan.prompt.options["init_token_ids"]
    text_ids = load_tokenizer(plan.spec.model)(text)["input_ids"]
    assert (len(text_ids) > 8) == (text == "Rate it:"), text_ids
    assert ids == (text_ids * 8)[:8]  # tiled (or cut) to the 8 virtual tokens, as peft does
    base = build_base(plan)
    theirs = get_peft_model(copy.deepcopy(base), peft_config_from_plan(plan))
    ours = peftc.materialize(plan, base_model=base)
    ours_table = ours.prompt_encoders["default"].embedding.weight
    assert torch.equal(ours_table, theirs.prompt_encoder["default"].embedding.weight)
    assert torch.equal(ours_table, base.get_input_embeddings().weight[ids])


def test_sample_vocab_init_draws_like_peft() -> None:
    from peft import get_peft_model

    plan = peftc.compile(["peft=prompt_tuning", "peft.prompt_tuning_init=SAMPLE_VOCAB"])
    base = build_base(plan)
    torch.manual_seed(7)
    theirs = get_peft_model(copy.deepcopy(base), peft_config_from_plan(plan))
    torch.manual_seed(7)
    ours = peftc.materialize(plan, base_model=base)
    table = ours.prompt_encoders["default"].embedding.weight
    assert torch.equal(table, theirs.prompt_encoder["default"].embedding.weight)
    vocab = base.get_input_embeddings().weight
    assert all(any(torch.equal(row, v) for v in vocab) for row in table)


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_multitask_source_inits_match_peft(init: str, tmp_path) -> None:
    from peft import get_peft_model

    source = peftc.materialize(peftc.compile(["peft=multitask_prompt_tuning", "peft.num_tasks=3", "peft.num_ranks=2"]))
    source.save_adapter(tmp_path / "source")
    overrides = [
        "peft=multitask_prompt_tuning",
        "peft.num_ranks=2",
        f"peft.prompt_tuning_init={init}",
        f"peft.prompt_tuning_init_state_dict_path={tmp_path / 'source'}",
        "peft.prompt_tuning_init_task=2",
    ]
    plan = peftc.compile(overrides)
    config = peft_config_from_plan(plan)
    config.prompt_tuning_init_state_dict_path = str(tmp_path / "source" / "adapter_model.safetensors")
    base = build_base(plan)
    torch.manual_seed(3)
    theirs = get_peft_model(copy.deepcopy(base), config).prompt_encoder["default"]
    torch.manual_seed(3)
    ours = peftc.materialize(plan, base_model=base).prompt_encoders["default"]
    for name in ("embedding.weight", "prefix_task_cols", "prefix_task_rows"):
        assert torch.equal(ours.get_parameter(name), theirs.get_parameter(name)), name
    # with more target tasks, every task starts from the source (peft only allows one)
    wide = peftc.compile([*overrides, "peft.num_tasks=2"])
    cols = peftc.materialize(wide, base_model=build_base(wide)).prompt_encoders["default"].prefix_task_cols
    if init != "ONLY_SOURCE_SHARED":
        assert torch.equal(cols[0], cols[1]) and torch.equal(cols[0], ours.prefix_task_cols[0])


def test_multitask_source_must_fit_the_prompt(tmp_path) -> None:
    source = peftc.materialize(peftc.compile(["peft=multitask_prompt_tuning", "peft.num_tasks=2"]))
    source.save_adapter(tmp_path / "source")
    common = [
        "peft=multitask_prompt_tuning",
        f"peft.prompt_tuning_init_state_dict_path={tmp_path / 'source'}",
    ]
    with pytest.raises(PlanError, match=r"prefix_task_cols is \(2, 8, 1\) there, this prompt needs \(2, 8, 3\)"):
        peftc.compile([*common, "peft.prompt_tuning_init=AVERAGE_SOURCE_TASKS", "peft.num_ranks=3"])
    with pytest.raises(PlanError, match="peft.prompt_tuning_init_task=5: the source adapter has 2 tasks"):
        peftc.compile([*common, "peft.prompt_tuning_init=EXACT_SOURCE_TASK", "peft.prompt_tuning_init_task=5"])


# ---------------------------------------------------------------------------------- task ids
def write_rows(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def multitask_plan(tmp_path, rows: list[dict], *extra: str):
    data = write_rows(tmp_path / "rows.jsonl", rows)
    return peftc.compile(
        [
            "peft=multitask_prompt_tuning",
            "peft.num_tasks=3",
            "data.source=jsonl",
            f"data.path={data}",
            "data.val_fraction=0",
            "data.batch_size=4",
            *extra,
        ]
    )


def test_task_ids_come_from_a_data_column(tmp_path) -> None:
    from peftc.planning.model_source import load_tokenizer
    from peftc.training.loaders import dataloaders

    rows = [{"text": f"story number {i} is short", "kind": i % 3} for i in range(8)]
    plan = multitask_plan(tmp_path, rows, "task.packing=false", "data.columns={task_id: kind}")
    train, _ = dataloaders(plan, load_tokenizer(plan.spec.model))
    model = peftc.materialize(plan)
    seen = []
    for batch in train:
        assert batch["task_ids"].shape == (batch["input_ids"].shape[0],)
        seen += batch["task_ids"].tolist()
        assert torch.isfinite(model(**batch).loss)
    assert sorted(seen) == sorted(r["kind"] for r in rows)


def test_rows_without_task_ids_are_task_zero_and_bad_ids_are_refused(tmp_path) -> None:
    from peftc.planning.model_source import load_tokenizer
    from peftc.training.loaders import dataloaders

    plan = multitask_plan(tmp_path, [{"text": "a plain story about a duck"}] * 4)
    tokenizer = load_tokenizer(plan.spec.model)
    batch = next(iter(dataloaders(plan, tokenizer)[0]))
    assert batch["task_ids"].tolist() == [0] * batch["input_ids"].shape[0]
    rows = [{"text": "a story about an owl", "task_id": t} for t in (0, 3, 1, 2)]
    with pytest.raises(DataError, match="value 3 is out of range: peft.num_tasks=3 allows 0..2"):
        list(dataloaders(multitask_plan(tmp_path, rows, "task.packing=false"), tokenizer)[0])
    with pytest.raises(DataError, match="packing would put rows with different task_id values"):
        dataloaders(multitask_plan(tmp_path, rows), tokenizer)
    with pytest.raises(DataError, match="task_id must be a non-negative integer, got 'x'"):
        dataloaders(multitask_plan(tmp_path, [{"text": "an owl", "task_id": "x"}] * 4), tokenizer)


def test_other_methods_do_not_accept_a_task_id_column(tmp_path) -> None:
    from peftc.planning.model_source import load_tokenizer
    from peftc.training.loaders import dataloaders

    data = write_rows(tmp_path / "rows.jsonl", [{"text": "a story about an owl", "kind": 1}] * 4)
    plan = peftc.compile(
        ["peft=prompt_tuning", "data.source=jsonl", f"data.path={data}", "data.columns={task_id: kind}"]
    )
    with pytest.raises(ConfigError, match="data.columns.task_id='kind': is not a field of this task"):
        dataloaders(plan, load_tokenizer(plan.spec.model))


# --------------------------------------------------------------------------------- loading
def test_loaded_prompt_adapters_can_keep_training(tmp_path) -> None:
    plan = peftc.compile(["peft=p_tuning"])
    trained = peftc.materialize(plan)
    trained.save_adapter(tmp_path)
    x = token_batch()
    expected = trained(input_ids=x).logits
    loaded = peftc.load_adapter(build_base(plan), tmp_path, is_trainable=True)
    loaded_plan = loaded.plan_of("default")
    assert loaded_plan.spec.peft.inference_mode and loaded_plan.prompt.encoder == "PromptEncoder (saved prompt only)"
    assert loaded.trainable_parameters() == 8 * 64  # the saved prompt table; the MLP is not in peft's files
    assert max_diff(loaded(input_ids=x).logits, expected) <= 1e-6


def test_calls_without_task_ids_use_task_zero_with_a_warning() -> None:
    model = peftc.materialize(peftc.compile(["peft=multitask_prompt_tuning", "peft.num_tasks=2"])).eval()
    x = token_batch()
    with pytest.warns(UserWarning, match="no task_ids given, every row uses task 0 of 2"):
        implicit = model(input_ids=x).logits
    assert torch.equal(implicit, model(input_ids=x, task_ids=torch.zeros(2, dtype=torch.long)).logits)
    with pytest.raises(ValueError, match=r"task_ids must hold one index in \[0, 2\) per row"):
        model(input_ids=x, task_ids=torch.tensor([0, 2]))
