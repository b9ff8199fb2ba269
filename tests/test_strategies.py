"""Scale-out through Lightning strategies: compile-time checks, and DDP on 2 CPU processes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import peftc
from peftc.planning.compat import STRATEGIES
from tests.helpers import run_cli


def test_strategy_names_are_lightnings() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    assert set(STRATEGIES) - {"auto"} <= set(StrategyRegistry.available_strategies())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.strategy=dpp"], "trainer.strategy='dpp': is not a Lightning strategy; did you mean 'ddp'?"),
        (["trainer.strategy=fsdp"], "Lightning's FSDP strategy requires a GPU accelerator"),
        (["trainer.strategy=fsdp_cpu_offload"], "Lightning's FSDP strategy requires a GPU accelerator"),
        (["trainer.strategy=deepspeed_stage_3", "trainer.accelerator=gpu"], "pip install deepspeed"),
    ],
)
def test_strategies_that_cannot_run_are_refused_at_compile_time(overrides: list[str], message: str) -> None:
    import importlib.util

    if "deepspeed" in " ".join(overrides) and importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("the rule fires only while deepspeed is not installed")
    with pytest.raises(peftc.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        peftc.compile(overrides)


def test_a_gpu_accelerator_is_apples_mps_where_there_is_no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's `gpu` is MPS on a Mac: not refused as a missing CUDA GPU."""
    from peftc.planning import compat

    monkeypatch.setattr(compat, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(compat, "_mps_available", lambda: True)
    assert peftc.compile(["trainer.accelerator=gpu"]).spec.trainer.accelerator == "gpu"


def test_ddp_cpu_compiles_with_two_processes() -> None:
    plan = peftc.compile(["trainer=ddp_cpu"])
    assert (plan.spec.trainer.strategy, plan.spec.trainer.devices, plan.spec.trainer.accelerator) == ("ddp", 2, "cpu")


# One process with batch 8 and two DDP processes with batch 4 each see the same 8 examples per
# step (DistributedSampler deals the seeded permutation out across ranks) and take the same
# gradient: the mean over the step's trained tokens on both ranks (the built-in instructions train
# on answers only, so the ranks' halves hold different numbers of tokens); only float summation
# order differs.
DDP_TOLERANCE = 1e-4


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_saves_one_adapter_equal_to_one_process(tmp_path: Path) -> None:
    # The whole validation split (123 examples: 2 ranks split it unevenly) is scored once per rank count.
    common = ["trainer.max_steps=3", "trainer.log_every_n_steps=1", "data=instructions"]
    single = run_cli([*common, "data.batch_size=8", f"hydra.run.dir={tmp_path / 'single'}"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = run_cli(
        [*common, "trainer=ddp_cpu", "data.batch_size=4", f"hydra.run.dir={tmp_path / 'ddp'}"],
        cwd=tmp_path,
        timeout=600,
        fresh_process=True,  # Lightning starts the second rank by re-running this command
    )
    assert ddp.returncode == 0, ddp.stderr
    run_dir = tmp_path / "ddp"
    # Rank 0 alone writes: one adapter, one plan, no second rank's log or config.
    # (peftc.log exists only where something was logged: DDP logs its process group.)
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".") and p.name != "peftc.log") == sorted(
        p.name for p in (tmp_path / "single").iterdir() if not p.name.startswith(".") and p.name != "peftc.log"
    )
    assert not list(tmp_path.glob("outputs")) and not list(run_dir.glob("train_ddp_process_*"))
    assert ddp.stdout.count("adapter saved to") == 1
    ours, reference = (
        load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("ddp", "single")
    )
    assert ours.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(ours[name], reference[name], atol=DDP_TOLERANCE, rtol=0), name
    assert any(reference[n].abs().max() > 0 for n in reference if "lora_B" in n), "training must move lora_B"
    # Validation scores each example once on 2 ranks too (Lightning's sampler would count its padding).
    ddp_metrics, single_metrics = (
        json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("ddp", "single")
    )
    assert ddp_metrics["val_loss"] == pytest.approx(single_metrics["val_loss"], rel=1e-6, abs=0)
    assert "UserWarning" not in ddp.stderr and "recommended" not in ddp.stderr, ddp.stderr
    assert "Initializing distributed" not in ddp.stdout + ddp.stderr  # Lightning's line, once per rank


@pytest.mark.parametrize("world", [2, 3])
def test_training_order_is_dealt_across_ranks_like_one_process(monkeypatch: pytest.MonkeyPatch, world: int) -> None:
    """Each step of k ranks with batch b covers the same examples as one process with batch k*b,
    and Lightning keeps the sampler (a DistributedSampler) instead of shuffling its order again."""
    from torch.utils.data import DistributedSampler

    from peftc.files.checkpoints import ResumableSampler

    single = list(ResumableSampler(37, seed=5))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
    shards = []
    for rank in range(world):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        sampler = ResumableSampler(37, seed=5)
        assert isinstance(sampler, DistributedSampler) and len(sampler) == -(-37 // world)
        shards.append(list(sampler))
    batch = 4
    for step in range(len(shards[0]) // batch):
        dealt = sorted(i for shard in shards for i in shard[step * batch : (step + 1) * batch])
        assert dealt == sorted(single[step * batch * world : (step + 1) * batch * world])


@pytest.mark.parametrize(("world", "examples"), [(2, 123), (4, 123), (4, 1)])
def test_validation_on_several_ranks_scores_each_example_once(
    monkeypatch: pytest.MonkeyPatch, world: int, examples: int
) -> None:
    """Every rank runs as many validation batches (sharded strategies gather parameters together
    in each forward), so the split is padded with repeated examples; the repeats are not counted,
    and the ranks' sums are one process's. 123 examples in batches of 5: on 2 ranks the last batch
    of rank 1 is half padding, on 4 ranks that of rank 3 is padding only. One text (two blocks of
    data.max_length) on 4 ranks: ranks 2 and 3 see padding only, and still have every sum (zero),
    since the ranks reduce the sums together, key by key."""
    from peftc import tasks
    from peftc.planning.model_source import load_tokenizer
    from peftc.training.lightning import PeftcLightningModule
    from peftc.training.loaders import dataloaders

    plan = peftc.compile(["data.eval_batch_size=5", f"data.limit_val_examples={examples}"])
    model = peftc.materialize(plan).eval()
    tokenizer = load_tokenizer(plan.spec.model)

    def sums_and_batches() -> tuple[dict[str, float], int]:
        _, val = dataloaders(plan, tokenizer)
        module = PeftcLightningModule(model, tasks.get(plan.task), plan)
        module._trainer = SimpleNamespace(val_dataloaders=val)
        with torch.no_grad():
            for index, batch in enumerate(val):
                module.validation_step(batch, index)
        return dict(module._totals), index + 1

    one_process, batches = sums_and_batches()
    if examples == 123:  # the built-in split's validation examples, none split or packed
        assert batches == -(-examples // 5), "batches of data.eval_batch_size"
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
    ranks = []
    for rank in range(world):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        ranks.append(sums_and_batches())
    assert len({batches for _, batches in ranks}) == 1, "every rank runs as many batches"
    assert all(sums.keys() == one_process.keys() for sums, _ in ranks), "every rank has every sum"
    for key, value in one_process.items():
        assert sum(sums[key] for sums, _ in ranks) == pytest.approx(value, rel=1e-6), key
