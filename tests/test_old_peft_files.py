"""Adapters that older peft releases wrote (most of those on the Hub: peft 0.2-0.17, under
transformers 4) load in peftc with the outputs that release computed, float32 to 1e-5; where the
format cannot be run, peftc refuses it in one line naming the file and what would work.

The fixtures (tests/fixtures/peft_<version>/<case>/, their README says how) were written by the
releases themselves (experiments/make_old_peft_fixtures.py) on tiny config-built Llama, GPT-2,
BERT and T5 models whose weights are tests/fixtures/old_peft_bases/, every adapter tensor noised
so that no partial load reproduces the recorded logits. peft before 0.6 wrote pickles only: those
fixtures are the safetensors that peftc's own conversion line (printed when it refuses the
pickle) made of the release's adapter_model.bin. Where a release's format differs from today's,
the case is here:

- peft 0.2 wrote enable_lora / merge_weights; enable_lora (its MergedLinear on GPT-2's fused
  c_attn, B a grouped Conv1d weight) loads as the plain LoRA it equals, which peft 0.22 refuses;

- peft 0.6 wrote LoRA on embed_tokens without the embedding's base weight (peft 0.7 on saves it);
- peft < 0.14 left alpha / r out of LoKr's update: peftc keeps its outputs (peft 0.22 does not);
- peft < 0.14's OFT is another parameterization: refused, by peftc as by peft 0.22;
- peft 0.15-0.17's OFT Cayley-Neumann series ends in 2 Q^(n-1): peftc computes peft 0.22's
  series, as peft 0.22 does, and says so;
- AdaLoRA's rank_pattern with rank-pruned tensors, VeRA without saved projections, prompt
  methods' saved keys, fields absent from old configs: loaded as they are, with their outputs.
"""

from __future__ import annotations

import functools
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import peftc
from peftc.errors import AdapterFileError
from tests.helpers import max_diff

FIXTURES = Path(__file__).parent / "fixtures"
BASES = FIXTURES / "old_peft_bases"
RELEASES = ("0.2.0", "0.3.0", "0.4.0", "0.5.0", "0.6.2", "0.10.0", "0.13.2", "0.17.1")
MODELS = ("llama", "gpt2", "bert", "t5")
TOLERANCE = 1e-5

# (release, case) -> the start of the one warning peftc gives (after the file's path)
WARNED = {
    **{
        (release, case): "LoKr adapter of a peft before 0.14 (its config has no rank_dropout_scale)"
        for release in ("0.6.2", "0.13.2")
        for case in ("lokr_llama", "lokr_llama_decompose_both")
    },
    ("0.17.1", "oft_llama"): "OFT adapter of a peft before 0.18 (no peft_version)",
}
# (release, case) -> what the refusal says, after the path of the file it names
REFUSED = {
    (release, "oft_llama"): "adapter_config.json: OFT adapter without oft_block_size: written by peft < 0.14"
    for release in ("0.10.0", "0.13.2")
}
# peft 0.15-0.17's Cayley-Neumann series differs from peft 0.22's in its last term: peftc gives
# peft 0.22's outputs (peft's own choice), which differ from the release's by about this much
OTHER_SERIES = {("0.17.1", "oft_llama"): 3.6e-3}
LOKR_DECOMPOSED = ("model=tiny_llama", "peft=lokr", "peft.decompose_both=true", "peft.target_modules=[gate_proj]")


def fixture_dir(release: str, case: str) -> Path:
    return FIXTURES / f"peft_{release.replace('.', '_')}" / case


CASES = [
    (release, directory.name)
    for release in RELEASES
    for directory in sorted(fixture_dir(release, "").iterdir())
    if directory.is_dir()
]


@functools.cache
def _base_weights(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return json.loads((BASES / f"{name}.json").read_text()), load_file(BASES / f"{name}.safetensors")


def base_model(case: str) -> torch.nn.Module:
    """The base the release wrote the adapter on, built by transformers 5 from the same config."""
    import transformers

    name = next(model for model in MODELS if f"_{model}" in case)
    spec, weights = _base_weights(name)
    config = getattr(transformers, spec["config_class"])(**spec["config"])
    config._attn_implementation = "eager"
    model = getattr(transformers, spec["class"])(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}  # GPT-2's, T5's
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def recorded(release: str, case: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(fixture_dir(release, case) / "expected.safetensors")


def logits(model: torch.nn.Module, recorded: dict[str, torch.Tensor], *, base: bool = False) -> torch.Tensor:
    """The model's logits on the recorded batch (T5's decoder tokens, the task ids of multitask
    prompt tuning, which a base model does not take)."""
    inputs = {k: v for k, v in recorded.items() if k != "logits" and not (base and k == "task_ids")}
    with torch.no_grad():
        return model(**inputs).logits


def loaded(directory: Path, case: str) -> tuple[peftc.PeftcModel, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peftc.load_adapter(base_model(case), directory)
    return model, [str(w.message) for w in caught if str(w.message).startswith(str(directory))]


RUN = [c for c in CASES if c not in REFUSED]


@pytest.mark.parametrize(("release", "case"), RUN, ids=[f"{r}-{c}" for r, c in RUN])
def test_an_old_release_adapter_gives_the_logits_that_release_recorded(release: str, case: str) -> None:
    directory = fixture_dir(release, case)
    expected = recorded(release, case)
    model, messages = loaded(directory, case)
    plain = logits(base_model(case), expected, base=True)
    real_tokens = expected["logits"][:, -plain.shape[1] :]  # after any virtual tokens
    assert max_diff(plain, real_tokens) > 1e-3, "not a no-op"
    diff = max_diff(logits(model, expected), expected["logits"])
    if (release, case) in OTHER_SERIES:
        assert TOLERANCE < diff <= 1.1 * OTHER_SERIES[release, case]
    else:
        assert diff <= TOLERANCE
    warned = WARNED.get((release, case))
    assert [m.partition(": ")[2][: len(warned)] for m in messages] == ([warned] if warned else [])


@pytest.mark.parametrize(("release", "case"), list(REFUSED), ids=[f"{r}-{c}" for r, c in REFUSED])
def test_an_old_format_peftc_cannot_run_is_refused_naming_the_file_and_what_works(release: str, case: str) -> None:
    directory = fixture_dir(release, case)
    with pytest.raises(AdapterFileError) as error:
        peftc.load_adapter(base_model(case), directory)
    message = str(error.value)
    assert message.startswith(f"{directory}/{REFUSED[release, case]}")
    assert "load it with peft <= 0.13, or retrain" in message and "\n" not in message


def test_an_old_lokr_adapter_saved_again_means_the_same_to_peft_0_22(tmp_path: Path) -> None:
    """The unscaled update is stored scaled-compatible: W1 divided by alpha / r, and the config
    now has rank_dropout_scale, so neither peftc nor peft 0.22 scales it again."""
    from peft import PeftModel

    expected = recorded("0.6.2", "lokr_llama")
    model, _ = loaded(fixture_dir("0.6.2", "lokr_llama"), "lokr_llama")
    model.save_adapter(tmp_path)
    assert "rank_dropout_scale" in json.loads((tmp_path / "adapter_config.json").read_text())
    again, messages = loaded(tmp_path, "lokr_llama")
    assert messages == []
    assert max_diff(logits(again, expected), expected["logits"]) <= TOLERANCE
    theirs = PeftModel.from_pretrained(base_model("lokr_llama"), tmp_path).eval()
    assert max_diff(logits(theirs, expected), expected["logits"]) <= TOLERANCE


def test_an_old_lokr_adapter_with_a_decomposed_w1_keeps_its_unscaled_update(tmp_path: Path) -> None:
    """peft < 0.14's update W1 ⊗ W2 had no alpha / r, W1 = W1a W1b included (decompose_both on
    larger layers than the fixtures'): such a file gives the outputs its tensors give today at
    alpha = r."""
    from tests.helpers import build_base, token_batch

    plan = peftc.compile([*LOKR_DECOMPOSED, "peft.r=2", "peft.alpha=8"])
    assert "lokr_w1_a" in plan.sites[0].tensors
    model = peftc.materialize(plan, base_model=build_base(plan))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))
    model.save_adapter(tmp_path / "today")
    config = json.loads((tmp_path / "today" / "adapter_config.json").read_text())
    outputs = {}
    for name, edited in {
        "today": config,
        "old": {k: v for k, v in config.items() if k != "rank_dropout_scale"},
        "unscaled": {**config, "alpha": config["r"]},
    }.items():
        if name != "today":
            shutil.copytree(tmp_path / "today", tmp_path / name)
            (tmp_path / name / "adapter_config.json").write_text(json.dumps(edited))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outputs[name] = logits(peftc.load_adapter(build_base(plan), tmp_path / name), {"input_ids": token_batch()})
    assert max_diff(outputs["old"], outputs["unscaled"]) <= TOLERANCE
    assert max_diff(outputs["old"], outputs["today"]) > 1e-3, "alpha / r changes nothing: the case is vacuous"


@pytest.mark.parametrize(
    "edit",
    [{"peft_version": "0.18.0"}, {"use_cayley_neumann": False}, {"num_cayley_neumann_terms": 2}],
    ids=["written-by-peft-0.18", "no-cayley-neumann", "two-terms"],
)
def test_an_oft_adapter_whose_series_peft_0_18_left_alone_loads_without_the_warning(edit, tmp_path: Path) -> None:
    """The old-series warning is for peft < 0.18 files that sum more than two Neumann terms: the
    first two (I + 2Q) and the exact Cayley transform are the same in every release."""
    shutil.copytree(fixture_dir("0.17.1", "oft_llama"), tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    assert loaded(tmp_path, "oft_llama")[1] == []


def test_an_oft_config_without_the_cayley_neumann_fields_reads_peft_s_defaults(tmp_path: Path) -> None:
    """A hand-trimmed or early-0.14 config: absent, use_cayley_neumann is true (5 terms) as peft
    reads it, so the adapter runs as the fixture that writes those values does."""
    shutil.copytree(fixture_dir("0.17.1", "oft_llama"), tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["use_cayley_neumann"], config["num_cayley_neumann_terms"]) == (True, 5)
    del config["use_cayley_neumann"], config["num_cayley_neumann_terms"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    batch = recorded("0.17.1", "oft_llama")
    written, _ = loaded(fixture_dir("0.17.1", "oft_llama"), "oft_llama")
    assert max_diff(logits(loaded(tmp_path, "oft_llama")[0], batch), logits(written, batch)) == 0


def test_a_config_with_a_null_dropout_and_a_whole_float_rank_reads_as_peft_reads_it(tmp_path: Path) -> None:
    """Hand-edited and converted configs write r: 4.0 and lora_dropout: null (peft reads no
    dropout); the adapter is the one written with r: 4, and saved again writes r: 4."""
    shutil.copytree(fixture_dir("0.2.0", "lora_llama_head"), tmp_path / "edited")
    config = json.loads((tmp_path / "edited" / "adapter_config.json").read_text())
    (tmp_path / "edited" / "adapter_config.json").write_text(json.dumps({**config, "r": 4.0, "lora_dropout": None}))
    expected = recorded("0.2.0", "lora_llama_head")
    model, _ = loaded(tmp_path / "edited", "lora_llama_head")
    assert max_diff(logits(model, expected), expected["logits"]) <= TOLERANCE
    model.save_adapter(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_dropout"]) == (4, 0)


def test_a_peft_0_6_pickle_adapter_is_refused_with_its_conversion_line(tmp_path: Path) -> None:
    """peft 0.6 saved adapter_model.bin by default: never unpickled, the error says how to
    convert it (test_peft_interop runs that line)."""
    shutil.copy(fixture_dir("0.6.2", "lora_llama_patterns") / "adapter_config.json", tmp_path)
    torch.save({}, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="never loaded") as error:
        peftc.load_adapter(base_model("lora_llama"), tmp_path)
    assert str(error.value).startswith(str(tmp_path / "adapter_model.bin"))
    assert "torch.load(" in str(error.value) and "weights_only=True" in str(error.value)


def test_a_peft_0_2_enable_lora_adapter_saved_again_is_a_plain_lora_peft_0_22_runs(tmp_path: Path) -> None:
    """peft 0.22 refuses the file (B is a grouped Conv1d weight); saved by peftc it is the plain
    LoRA of rank 2r it equals, and peft 0.22 gives the release's outputs."""
    from peft import PeftModel

    expected = recorded("0.2.0", "lora_gpt2_enable_lora")
    model, _ = loaded(fixture_dir("0.2.0", "lora_gpt2_enable_lora"), "lora_gpt2")
    model.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], "enable_lora" in config) == (8, 16, False)
    theirs = PeftModel.from_pretrained(base_model("lora_gpt2"), tmp_path).eval()
    assert max_diff(logits(theirs, expected), expected["logits"]) <= TOLERANCE


def test_an_enable_lora_peft_0_2_could_not_run_is_refused_in_one_line(tmp_path: Path) -> None:
    """peft 0.2's MergedLinear built its Conv1d with groups=2: only two enabled parts ever ran."""
    shutil.copytree(fixture_dir("0.2.0", "lora_gpt2_enable_lora"), tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "enable_lora": [True, True, True]}))
    with pytest.raises(AdapterFileError) as error:
        peftc.load_adapter(base_model("lora_gpt2"), tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'adapter_config.json'}: enable_lora=[True, True, True] enables 3 parts")
    assert "\n" not in message
