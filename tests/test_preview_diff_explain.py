"""Sweep preview, plan diff, explain and method-scoped key errors: all before any weights load."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import peftc
from peftc.cli.diff import diff_plans
from peftc.cli.diff import main as diff_main
from peftc.cli.explain import explain
from peftc.cli.main import check_job, expand_jobs
from peftc.cli.preview import preview_rows
from peftc.config.spec import _SCHEMAS, SpecNode, param, register_schema


def test_preview_flags_a_duplicate_plan_and_an_invalid_point() -> None:
    # target_modules=null resolves to Llama's default [q_proj, v_proj]: the same plan twice.
    jobs = [check_job(j) for j in expand_jobs(["peft.target_modules=null,[q_proj,v_proj],[q_prj]", "peft.r=4"])]
    rows = preview_rows(jobs)
    assert [r.status for r in rows] == ["ok", "duplicate", "invalid"]
    assert rows[1].duplicate_of == 0 and rows[1].plan.fingerprint == rows[0].plan.fingerprint
    assert "did you mean 'q_proj'" in str(rows[2].error)


def test_preview_keeps_a_compose_error_as_an_invalid_row() -> None:
    rows = preview_rows([check_job(j) for j in expand_jobs(["peft.r=4,0"])])
    assert [r.status for r in rows] == ["ok", "invalid"] and "must be >= 1" in str(rows[1].error)


def test_plans_that_differ_in_what_they_train_have_different_fingerprints() -> None:
    fingerprints = {peftc.compile([f"peft.r={r}"]).fingerprint for r in (4, 8)}
    fingerprints.add(peftc.compile(["peft.r=8", "trainer.lr=0.01"]).fingerprint)
    assert len(fingerprints) == 3
    # Run-only switches (dry run, budget, explain) do not change what is trained.
    assert peftc.compile(["budget.memory_gb=1", "dry_run=true"]).fingerprint == peftc.compile([]).fingerprint


def test_plan_diff_lists_sites_parameters_memory_and_adapter_compatibility() -> None:
    a = peftc.compile(["peft.r=8"])  # q_proj, v_proj in 2 layers
    b = peftc.compile(["peft.r=16", "peft.target_modules=[q_proj,k_proj]"])
    diff = diff_plans(a, b)
    assert sorted(s.path.rsplit(".", 1)[-1] for s in diff.added) == ["k_proj", "k_proj"]
    assert sorted(s.path.rsplit(".", 1)[-1] for s in diff.removed) == ["v_proj", "v_proj"]
    assert [pair[0].path.rsplit(".", 1)[-1] for pair in diff.changed] == ["q_proj", "q_proj"]
    assert diff.changed[0][1].tensors["lora_A.weight"] == (16, 64)
    assert diff.trainable_delta == b.trainable_params - a.trainable_params > 0
    assert diff.memory_delta == b.memory.total - a.memory.total > 0
    assert not diff.loads and any("only in A" in p and "v_proj" in p for p in diff.load_problems)
    assert diff.config["peft.r"] == (8, 16)


def test_plan_diff_says_an_adapter_loads_when_only_settings_differ() -> None:
    a = peftc.compile(["peft.target_modules=null"])
    b = peftc.compile(["peft.target_modules=[q_proj,v_proj]", "peft.lora_alpha=16"])
    diff = diff_plans(a, b)
    assert diff.loads and not diff.added and not diff.removed
    assert a.adapter_fingerprint == b.adapter_fingerprint
    assert len(diff.changed) == len(b.sites) == 4  # q and v in 2 layers: only the scaling differs
    assert all("scaling" in str(pair[0].options) for pair in diff.changed)


def test_plan_diff_shows_the_keys_of_either_side_only() -> None:
    """lora -> loha: the keys only LoHa has (alpha, rank_dropout) are changes as much as those
    only LoRA has (lora_alpha)."""
    diff = diff_plans(peftc.compile([]), peftc.compile(["peft=loha"]))
    assert diff.config["peft.alpha"] == (None, 8.0) and diff.config["peft.rank_dropout"] == (None, 0.0)
    assert diff.config["peft.lora_alpha"] == (8.0, None)


def test_plan_diff_refuses_an_adapter_for_another_base_model_by_name() -> None:
    diff = diff_plans(peftc.compile([]), peftc.compile(["model=tiny_gpt2"]))
    assert not diff.loads
    assert diff.load_problems == ("different base models: LlamaForCausalLM vs GPT2LMHeadModel",)


def test_plan_diff_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert diff_main(["peft.r=4", "--", "peft.r=8"]) == 0
    out = capsys.readouterr().out
    assert "adapter compatibility: NO" in out and "lora_A.weight 4x64 → 8x64" in out
    assert "0 sites unchanged" in out  # all four sites changed rank
    deltas = {
        cells[1].strip(): cells[4].strip()
        for cells in (line.split("│") for line in out.splitlines())
        if len(cells) == 6
    }
    assert deltas["adapter file"].startswith("+") and deltas["memory: total"].startswith("+")  # B is the larger
    assert deltas["memory: base weights"] == "±0 B"
    assert diff_main(["peft.r=4", "--", "peft.rr=8"]) == 2
    assert "error: B: peft.rr" in capsys.readouterr().err
    assert diff_main(["peft.r=4"]) == 2  # no `--`: one error line naming the usage
    assert capsys.readouterr().err.splitlines() == [
        "error: the two override sets must be separated by -- (python -m peftc.diff <overrides A> -- <overrides B>)"
    ]
    assert diff_main(["--help"]) == 0


def test_plan_diff_says_how_many_load_problems_it_does_not_show() -> None:
    from peftc.cli.diff import render_diff

    a, b = (peftc.compile([f"peft.r={r}", "peft.target_modules=all-linear"]) for r in (4, 8))
    diff = diff_plans(a, b)
    assert len(diff.load_problems) == 28  # A and B of 7 linears in 2 layers
    assert render_diff(diff)[-1].endswith("\n  ... and 20 more")


def test_explain_names_the_source_of_every_value() -> None:
    sources = {p.key: p for p in explain(["peft.r=4", "model=tiny_gpt2", "+model.config.n_inner=96"])}
    assert sources["peft.r"].value == 4 and sources["peft.r"].source == "command line: peft.r=4"
    assert sources["model.config.n_inner"].source.startswith("added by command line")
    assert (
        sources["model.config.n_embd"].source == "conf/model/tiny_gpt2.yaml (model=tiny_gpt2, chosen by command line)"
    )
    assert sources["peft.lora_alpha"].source.startswith("conf/peft/lora.yaml (peft=lora, chosen by defaults list)")
    assert sources["peft.use_rslora"].source == "schema default (LoraSpec)"
    assert sources["seed"].source == "conf/config.yaml"
    assert not any(key.startswith("hydra") for key in sources)


@dataclass
class _RankedSpec(SpecNode):
    r: int = param(4, "rank")


@pytest.fixture
def second_ranked_method():
    """Another peft schema with an `r`, as a prompt method's neighbours would have."""
    register_schema("peft", "ranked_for_test", _RankedSpec)
    yield
    _SCHEMAS.pop(("peft", "ranked_for_test"))


def test_a_key_the_chosen_method_lacks_names_the_methods_that_have_it(second_ranked_method: None) -> None:
    from peftc.config.spec import unknown_key_error

    error = unknown_key_error("peft.r", "r", _NoRank)
    message = str(error)
    assert "peft.r is a key of peft=" in message and "pick one of those with peft=<name>" in message
    owners = message.split("peft.r is a key of peft=")[1].split(";")[0].split(", ")
    assert "lora" in owners and "ranked_for_test" in owners
    assert "did you mean 'rank_dim'" in str(unknown_key_error("peft.rank_dimm", "rank_dimm", _NoRank))


@dataclass
class _NoRank(SpecNode):
    num_virtual_tokens: int = param(8, "tokens")
    rank_dim: int = param(8, "not a rank")


def test_a_rank_under_prompt_tuning_points_to_the_methods_with_a_rank() -> None:
    with pytest.raises(
        peftc.ConfigError, match=r"peft.r: unknown key for peft \(PromptTuningSpec\).*peft.r is a key of peft=.*lora"
    ):
        peftc.compile(["peft=prompt_tuning", "peft.r=8"])


def test_unknown_key_from_the_command_line_says_did_you_mean() -> None:
    with pytest.raises(
        peftc.ConfigError, match=r"peft.lora_alpah: unknown key for peft \(LoraSpec\); did you mean 'lora_alpha'"
    ):
        peftc.compile(["peft.lora_alpah=4"])
