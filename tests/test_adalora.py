"""AdaLoRA's training-time parts against peft: the orthogonal regulariser, the rank allocator
step by step, and a short Lightning fit whose pruned adapter (rank_pattern) loads in peft; the
allocator's per-step cost does not grow with the number of layers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import peftc
from peftc import methods
from peftc.errors import ConfigError
from peftc.methods.adalora.budget import RankAllocator
from tests.helpers import build_base, max_diff, token_batch
from tests.method_cases import Case, logits, paired

SCHEDULE = (
    "peft.init_r=4",
    "peft.target_r=2",
    "peft.tinit=1",
    "peft.tfinal=1",
    "peft.lora_alpha=0.01",
    "trainer.max_steps=6",
)


def test_orthogonal_regulariser_matches_peft() -> None:
    pair = paired(Case("adalora", "tiny_llama", ("peft.lora_alpha=0.01", "peft.orth_reg_weight=0.3")))
    x = token_batch()
    ours = pair.ours.train()(input_ids=x, labels=x).loss
    extra = methods.get("adalora").extra_loss(pair.ours, pair.plan.adapter_name)
    theirs = pair.theirs.train()(input_ids=x, labels=x).loss  # peft adds it inside forward
    assert extra is not None and extra.item() > 0
    assert abs((ours + extra).item() - theirs.item()) <= 1e-5


# A longer schedule: several budgets between tinit and T - tfinal, masking every other step from
# an odd tinit (a schedule that masks on steps counted from tinit, not from 0, differs here).
LONG_SCHEDULE = (
    "peft.init_r=6",
    "peft.target_r=2",
    "peft.tinit=3",
    "peft.tfinal=3",
    "peft.deltaT=2",
    "peft.lora_alpha=0.01",
    "trainer.max_steps=14",
)


def _train_both(pair, steps: int) -> RankAllocator:
    """Identical SGD steps on ours and peft's, each followed by its rank allocator; after each,
    the same budget and the same triplets masked (E) as peft's."""
    allocator = RankAllocator(pair.ours, pair.plan)
    sgd_ours = torch.optim.SGD([p for p in pair.ours.parameters() if p.requires_grad], lr=0.5)
    sgd_theirs = torch.optim.SGD([p for p in pair.theirs.parameters() if p.requires_grad], lr=0.5)
    method = methods.get("adalora")
    for step in range(1, steps + 1):
        x = token_batch(seed=step)
        loss = pair.ours(input_ids=x, labels=x).loss + method.extra_loss(pair.ours, pair.plan.adapter_name)
        loss.backward()
        pair.theirs(input_ids=x, labels=x).loss.backward()
        sgd_ours.step()
        sgd_theirs.step()
        allocator.step(step)
        pair.theirs.base_model.update_and_allocate(step)
        assert allocator.budget(step) == pair.theirs.base_model.rankallocator.budget_schedule(step), step
        for path, layer in pair.ours.adapter_layers():
            theirs_e = pair.theirs.base_model.model.get_submodule(path).lora_E["default"]
            assert torch.equal(layer.lora_E["default"] == 0, theirs_e == 0), f"step {step}: {path}"
            assert max_diff(layer.lora_E["default"], theirs_e) <= 1e-5, f"step {step}: {path}"
        sgd_ours.zero_grad()
        sgd_theirs.zero_grad()
    return allocator


@pytest.mark.parametrize("schedule", [SCHEDULE, LONG_SCHEDULE], ids=["short", "deltaT=2"])
def test_rank_allocator_prunes_like_peft_and_peft_pruned_adapters_load_in_ours(schedule, tmp_path) -> None:
    pair = paired(Case("adalora", "tiny_llama", schedule))
    pair.ours.train(), pair.theirs.train()
    allocator = _train_both(pair, steps=pair.plan.spec.trainer.max_steps)
    theirs_pattern = pair.theirs.peft_config["default"].rank_pattern
    ours_pattern = {f"{path}.lora_E.default": keep for path, keep in allocator.rank_pattern.items()}
    assert ours_pattern == theirs_pattern
    assert sum(sum(keep) for keep in ours_pattern.values()) == 2 * len(pair.plan.sites)  # target_r per module
    for path, layer in pair.ours.adapter_layers():
        theirs_e = pair.theirs.base_model.model.get_submodule(path).lora_E["default"]
        assert max_diff(layer.lora_E["default"], theirs_e) <= 1e-5
    pair.ours.eval(), pair.theirs.eval()
    expected = logits(pair.theirs)
    assert max_diff(logits(pair.ours), expected) <= 1e-5
    pair.theirs.save_pretrained(tmp_path)
    loaded = peftc.load_adapter(build_base(pair.plan), tmp_path)
    ranks = {site.path: site.options["r"] for site in loaded.plan_of("default").sites}
    assert ranks == {path: sum(keep) for path, keep in allocator.rank_pattern.items()}
    assert max_diff(logits(loaded), expected) <= 1e-5


@pytest.mark.slow
def test_lightning_fit_prunes_ranks_and_the_saved_rank_pattern_loads_in_peft(tmp_path) -> None:
    from peft import PeftModel

    from peftc.planning.model_source import load_tokenizer
    from peftc.training.lightning import fit
    from peftc.training.loaders import dataloaders

    plan = peftc.compile(
        ["peft=adalora", *SCHEDULE[:-2], "trainer.max_steps=8", "trainer.logger=none"]
        + ["data.max_length=32", "data.batch_size=2", "data.limit_examples=32"]
    )
    torch.manual_seed(0)
    model = peftc.materialize(plan)
    fit(model, plan, tmp_path / "run", dataloaders(plan, load_tokenizer(plan.spec.model)))
    trained = model.plan_of("default")
    pattern = trained.spec.peft.rank_pattern
    assert pattern is not None and set(pattern) == {f"{s.path}.lora_E" for s in plan.sites}
    ranks = [site.options["r"] for site in trained.sites]
    assert sum(ranks) == 2 * len(plan.sites) and min(ranks) < 4, "the allocator must have pruned ranks"
    assert model.trainable_parameters() == trained.trainable_params < plan.trainable_params
    expected = logits(model)
    model.save_adapter(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(build_base(plan), tmp_path / "adapter").eval()
    assert theirs.peft_config["default"].rank_pattern == pattern
    assert max_diff(logits(theirs), expected) <= 1e-5


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["trainer.max_steps=-1", "trainer.max_epochs=1"], "trainer.max_steps"),
        (["trainer.max_steps=40", "peft.tinit=30", "peft.tfinal=10"], "peft.tinit"),
        (["peft.target_r=16"], "peft.target_r"),
        (["peft.total_step=100"], "peft.total_step"),
        (["peft.rank_pattern={q_proj: [true]}"], "peft.rank_pattern"),
        (["peft.beta1=1.0"], "peft.beta1"),
    ],
)
def test_schedule_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        peftc.compile(["peft=adalora", *overrides])
    assert error.value.key == key


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += 1
        return func(*args, **(kwargs or {}))


def _importance_update_ops(targets: str) -> tuple[int, int]:
    """(sites, operators one importance update dispatches once the averages exist)."""
    plan = peftc.compile(["peft=adalora", f"peft.target_modules={targets}", "trainer.max_steps=10"])
    model = peftc.materialize(plan, base_model=build_base(plan)).train()
    x = token_batch()
    model(input_ids=x, labels=x).loss.backward()
    allocator = RankAllocator(model, plan)
    allocator.update_importance()
    with _CountOps() as counter:
        allocator.update_importance()
    return len(plan.sites), counter.count


def test_importance_update_costs_the_same_few_ops_for_any_number_of_layers() -> None:
    """peft's update_ipt runs ~8 ops per tensor (on a GPU, a kernel launch each: 672 tensors at
    1.1B all-linear); ours runs each step of it over all tensors at once (foreach)."""
    few, few_ops = _importance_update_ops("[q_proj,v_proj]")
    many, many_ops = _importance_update_ops("all-linear")
    assert many > 3 * few
    assert many_ops == few_ops < 20


def test_the_budget_callback_runs_the_allocator_once_per_optimizer_step() -> None:
    """Lightning ends several batches per optimizer step under gradient accumulation; the
    allocator (peft's update_and_allocate) runs once per step, after it."""
    from types import SimpleNamespace

    from peftc.methods.adalora.budget import AdaLoraBudget

    plan = peftc.compile(["peft=adalora", *SCHEDULE])
    callback = AdaLoraBudget(peftc.materialize(plan, base_model=build_base(plan)), plan)
    steps: list[int] = []
    callback.allocator.step = steps.append
    for global_step in (0, 0, 1, 1, 2, 2, 3):
        callback.on_train_batch_end(SimpleNamespace(global_step=global_step), None, None, None, 0)
    assert steps == [1, 2, 3]


def test_target_r_equal_to_init_r_trains_without_pruning() -> None:
    """A budget that never shrinks masks no triplet (peft 0.21 fails at its first mask:
    torch.kthvalue with k = 0)."""
    plan = peftc.compile(["peft=adalora", "peft.init_r=4", "peft.target_r=4", "trainer.max_steps=3"])
    model = peftc.materialize(plan, base_model=build_base(plan)).train()
    allocator = RankAllocator(model, plan)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in (1, 2, 3):
        x = token_batch(seed=step)
        model(input_ids=x, labels=x).loss.backward()
        sgd.step()
        allocator.step(step)
        sgd.zero_grad()
    assert allocator.rank_pattern == {site.path: [True] * 4 for site in plan.sites}
    assert all(bool((layer.lora_E["default"] != 0).all()) for _, layer in model.adapter_layers())
