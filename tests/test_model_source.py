"""Bring your own model: its tokenizer is checked when the plan is compiled (present, and its token
ids fit the model's embeddings), before anything is loaded or written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import peftc
from peftc.errors import ConfigError
from tests.helpers import run_cli


def copy_model(source: str, target: Path, *, tokenizer: bool) -> Path:
    target.mkdir()
    for name in Path(source).iterdir():
        if tokenizer or not name.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(name, target / name.name)
    return target


def test_a_model_directory_without_a_tokenizer_is_refused_by_the_dry_run(tiny_llama_dir: str, tmp_path: Path) -> None:
    bare = copy_model(tiny_llama_dir, tmp_path / "bare", tokenizer=False)
    with pytest.raises(ConfigError, match="has no tokenizer") as caught:
        peftc.compile(["model=hf", f"model.name_or_path={bare}"])
    assert caught.value.key == "model.name_or_path" and "model.tokenizer=DIR" in str(caught.value)


def test_a_tokenizer_elsewhere_is_taken_from_model_tokenizer(tiny_llama_dir: str, tmp_path: Path) -> None:
    bare = copy_model(tiny_llama_dir, tmp_path / "bare", tokenizer=False)
    plan = peftc.compile(["model=hf", f"model.name_or_path={bare}", f"model.tokenizer={tiny_llama_dir}"])
    assert plan.trainable_params > 0


def test_a_tokenizer_larger_than_the_embeddings_is_refused(tiny_llama_dir: str, tmp_path: Path) -> None:
    big = tmp_path / "big_tokenizer"
    big.mkdir()
    vocab = {f"t{i}": i for i in range(300)}
    (big / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "WordLevel", "vocab": vocab}, "added_tokens": []})
    )
    with pytest.raises(ConfigError, match="300 token ids but the model embeds only 260") as caught:
        peftc.compile(["model=hf", f"model.name_or_path={tiny_llama_dir}", f"model.tokenizer={big}"])
    assert caught.value.key == "model.tokenizer"


def test_a_config_built_model_too_small_for_the_byte_tokenizer_names_its_vocab_size() -> None:
    with pytest.raises(ConfigError, match="below the 260 token ids") as caught:
        peftc.compile(["model=tiny_llama", "model.config.vocab_size=100"])
    assert caught.value.key == "model.config.vocab_size"


def test_the_cli_refuses_a_missing_tokenizer_in_one_line_and_writes_nothing(
    tiny_llama_dir: str, tmp_path: Path
) -> None:
    bare = copy_model(tiny_llama_dir, tmp_path / "bare", tokenizer=False)
    run_dir = tmp_path / "run"
    result = run_cli(["model=hf", f"model.name_or_path={bare}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has no tokenizer" in errors[0] and "Traceback" not in result.stderr
    assert not (run_dir / "plan.json").exists()


def test_pickle_weights_are_never_loaded(tiny_llama_dir: str, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    pickled = copy_model(tiny_llama_dir, tmp_path / "pickled", tokenizer=True)
    weights = pickled / "model.safetensors"
    torch.save(load_file(weights), pickled / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ConfigError, match=r"only pickle weights \(pytorch_model.bin\)") as caught:
        peftc.compile(["model=hf", f"model.name_or_path={pickled}"])
    assert "convert them to safetensors" in str(caught.value)


def test_loading_a_checkpoint_emits_no_load_report_for_a_new_head() -> None:
    """transformers' LOAD REPORT lists the new task head as MISSING on every run: only noise."""
    import logging

    from peftc.planning import model_source

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logging.getLogger("transformers.modeling_utils").addHandler(handler)
    try:
        plan = peftc.compile(["model=minilm", "task=seq_cls"])
        model_source.build_model(plan.spec.model, "AutoModelForSequenceClassification")
    finally:
        logging.getLogger("transformers.modeling_utils").removeHandler(handler)
    assert not [r for r in records if "LOAD REPORT" in r.getMessage()]


def test_base_weights_missing_from_the_checkpoint_are_a_warning_naming_them(
    tiny_llama_dir: str, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    from peftc.planning import model_source

    partial = copy_model(tiny_llama_dir, tmp_path / "partial", tokenizer=True)
    weights = load_file(partial / "model.safetensors")
    del weights["model.layers.0.mlp.down_proj.weight"]
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    plan = peftc.compile(["model=hf", f"model.name_or_path={partial}"])
    with pytest.warns(UserWarning, match=r"1 base-model weights are not in the checkpoint .*layers\.0\.mlp\.down_proj"):
        model_source.build_model(plan.spec.model, "AutoModelForCausalLM")


def test_a_path_on_a_config_built_model_says_to_use_model_hf(tiny_llama_dir: str) -> None:
    with pytest.raises(ConfigError, match=r"is set on model=tiny_llama, which is built from a config") as caught:
        peftc.compile(["model=tiny_llama", f"model.name_or_path={tiny_llama_dir}"])
    assert caught.value.key == "model.name_or_path"
    assert f"use model=hf model.name_or_path={tiny_llama_dir}" in str(caught.value)


def test_a_path_given_on_the_default_model_is_the_model_the_plan_names(tiny_llama_dir: str) -> None:
    """demo_llama's option with the user's checkpoint: the plan (its header, plan.json) names the
    checkpoint, not the option's built-in model."""
    assert peftc.compile([f"model.name_or_path={tiny_llama_dir}"]).model.name == tiny_llama_dir
    assert peftc.compile([]).model.name == "demo_llama"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_checkpoint_loads_in_model_dtype_with_its_own_values(tiny_llama_dir: str, dtype: str) -> None:
    """model.dtype is what the base is loaded in (the float32 checkpoint cast once, on load); the
    adapter stays float32, as peft keeps it over a low-precision base."""
    import torch
    from safetensors.torch import load_file

    plan = peftc.compile(["model=hf", f"model.name_or_path={tiny_llama_dir}", f"model.dtype={dtype}"])
    model = peftc.materialize(plan)
    saved = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))
    base = {n.removeprefix("base_model."): p for n, p in model.named_parameters() if not p.requires_grad}
    assert {p.dtype for p in base.values()} == {getattr(torch, dtype)}
    weight = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(base[weight], saved[weight].to(getattr(torch, dtype)))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_a_hub_id_is_looked_up_on_the_hub_not_refused_as_a_missing_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """`org/name` with no such local directory is a hub id (offline here: refused as not cached)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="'someone/tiny-llama': is not a local directory and the hub is offline"):
        peftc.compile(["model=hf", "model.name_or_path=someone/tiny-llama"])


def test_a_hub_id_that_cannot_be_fetched_is_one_error_without_transformers_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No network and HF_HUB_OFFLINE unset: one try, not transformers' ~25 s of retried requests."""
    import huggingface_hub
    import transformers

    def no_network(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ConnectionError("Name or service not known")

    def retried(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("transformers was asked for the config of a hub id that cannot be fetched")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", retried)
    with pytest.raises(ConfigError) as info:
        peftc.compile(["model=hf", "model.name_or_path=someone/tiny-llama"])
    assert str(info.value).startswith("model.name_or_path='someone/tiny-llama': is not a local directory or in")
    assert "could not be fetched (Name or service not known)" in str(info.value)
    assert "hf download someone/tiny-llama" in str(info.value)


@pytest.mark.parametrize("source", ["model=hf", "model=tiny_llama"])
def test_model_config_overrides_reach_the_model_and_the_task_labels_size_its_head(
    tiny_llama_dir: str, source: str
) -> None:
    """model.config fields override a loaded model's config.json as they do a config-built
    one's; the task's label set decides the head, over a num_labels given there."""
    from tests.helpers import build_base

    where = [f"model.name_or_path={tiny_llama_dir}"] if source == "model=hf" else []
    overrides = [
        "task=seq_cls",
        "task.labels=[a,b,c]",
        "++model.config.rms_norm_eps=0.001",
        "+model.config.num_labels=7",
    ]
    plan = peftc.compile([source, *where, *overrides])
    assert [m.tensors["weight"] for m in plan.modules_to_save] == [(3, 64)]
    base = build_base(plan)
    assert base.config.rms_norm_eps == 0.001
    assert base.score.weight.shape == (3, 64)
    assert base.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_a_sharded_checkpoint_missing_a_shard_is_refused_by_the_dry_run(tiny_llama_dir: str, tmp_path: Path) -> None:
    """transformers only says so when loading reaches the shard; the dry run already knows."""
    from safetensors.torch import load_file, save_file

    sharded = copy_model(tiny_llama_dir, tmp_path / "sharded", tokenizer=True)
    weights = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {name: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, name in enumerate(names)}
    save_file({n: weights[n] for n in names if shards[n].startswith("model-00001")}, sharded / shards[names[0]])
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    with pytest.raises(
        ConfigError, match=r"names 2 weight shards but 1 are not in the directory \(model-00002"
    ) as caught:
        peftc.compile(["model=hf", f"model.name_or_path={sharded}", "dry_run=true"])
    assert caught.value.key == "model.name_or_path" and "download the checkpoint again" in str(caught.value)


def test_a_whole_checkpoint_beside_a_stale_shard_index_is_not_refused(tiny_llama_dir: str, tmp_path: Path) -> None:
    """transformers reads model.safetensors when there is one: an index beside it names nothing it loads."""
    whole = copy_model(tiny_llama_dir, tmp_path / "whole", tokenizer=True)
    shards = {"lm_head.weight": "model-00002-of-00002.safetensors"}
    (whole / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    assert peftc.compile(["model=hf", f"model.name_or_path={whole}", "dry_run=true"]).spec.model.name_or_path


def test_a_model_type_transformers_does_not_know_is_named_with_its_version(
    config_only_dir: str, tmp_path: Path
) -> None:
    import transformers

    unknown = tmp_path / "unknown"
    shutil.copytree(config_only_dir, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "llama9"}))
    with pytest.raises(
        ConfigError, match=f"names model_type 'llama9', unknown to transformers {transformers.__version__}"
    ):
        peftc.compile(["model=hf", f"model.name_or_path={unknown}", "dry_run=true"])
