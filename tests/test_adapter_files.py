"""Adapter files from strangers: pickle never runs, configs are screened, lenient loads report,
writes are atomic and recover from a writer killed mid-swap."""

from __future__ import annotations

import copy
import inspect
import json
import os
import pickle
import shutil
import stat
import threading
import warnings
from pathlib import Path

import pytest
import torch

import peftc
from peftc.files import atomic
from peftc.files.screening import peft_fields, peft_table_version
from tests.catalogue import Payload, edit_tensors, write_pickle_adapter
from tests.helpers import build_base, peft_lora_config, token_batch

OVERRIDES = ["peft.target_modules=[q_proj,v_proj]", "peft.init_lora_weights=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[peftc.planning.plan.Plan, torch.nn.Module, Path]:
    """A plan, its base model and a saved adapter with non-trivial weights."""
    plan = peftc.compile(OVERRIDES)
    base = build_base(plan)
    directory = tmp_path_factory.mktemp("adapter") / "adapter"
    peftc.materialize(plan, base_model=copy.deepcopy(base)).save_adapter(directory)
    return plan, base, directory


def copy_adapter(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


# ------------------------------------------------------------------------------------ pickle
def test_the_sentinel_payload_really_runs_when_unpickled(tmp_path: Path) -> None:
    """Guard for the tests below: the payload is live, so its absence later means it never ran."""
    sentinel = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(sentinel)))
    assert sentinel.exists()
    sentinel.unlink()
    write_pickle_adapter(tmp_path, sentinel)
    torch.load(tmp_path / "adapter_model.bin", weights_only=False)
    assert sentinel.exists()


@pytest.mark.parametrize("beside_safetensors", [False, True])
def test_adapter_model_bin_is_never_unpickled(trained, tmp_path: Path, beside_safetensors: bool) -> None:
    plan, base, good = trained
    directory = copy_adapter(good, tmp_path / "adapter")
    sentinel = tmp_path / "SENTINEL"
    write_pickle_adapter(directory, sentinel)
    if beside_safetensors:
        model = peftc.load_adapter(copy.deepcopy(base), directory)  # safetensors is read; .bin is ignored
        assert model.adapter_names == ["default"]
    else:
        (directory / "adapter_model.safetensors").unlink()
        with pytest.raises(peftc.AdapterFileError, match="pickle adapter files are never loaded"):
            peftc.load_adapter(copy.deepcopy(base), directory)
    assert not sentinel.exists()


# ---------------------------------------------------------------------------- config fields
def test_field_table_matches_installed_peft() -> None:
    """Regenerate peftc/assets/peft_config_fields.json when peft is upgraded (it names its version)."""
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    assert peft_table_version() == peft.__version__
    installed = {
        str(getattr(k, "value", k)): frozenset(p for p in inspect.signature(cls.__init__).parameters if p != "self")
        for k, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()
    }
    assert peft_fields() == installed


def test_unknown_fields_warn_once_and_are_ignored_like_peft(trained, tmp_path: Path) -> None:
    from peft import PeftModel

    plan, base, good = trained
    directory = copy_adapter(good, tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(future_option=True, another_new_field={"x": 1})
    (directory / "adapter_config.json").write_text(json.dumps(config))

    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        model = peftc.load_adapter(copy.deepcopy(base), directory)
    mentions = [w for w in ours if "future_option" in str(w.message)]
    assert len(mentions) == 1 and "another_new_field" in str(mentions[0].message)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(copy.deepcopy(base), directory)
    assert len([w for w in theirs if "future_option" in str(w.message)]) == 1, "peft parity: one warning"
    assert model.adapter_names == ["default"]


@pytest.mark.parametrize(
    ("peft_version", "said"),
    [
        ("99.0.0", "written by peft 99.0.0; peftc reads"),
        ("0.18.0", "written by peft 0.18.0, whose fields peft has since dropped;"),
        (None, "probably written by a peft before 0.18, which had fields peft has since dropped;"),
        ("99.0.0.dev0@1a2b3c4", "written by peft 99.0.0.dev0@1a2b3c4; peftc reads"),  # a source install
        ("a-fork", "written by peft 'a-fork'; peftc reads"),
    ],
)
def test_the_unknown_fields_warning_says_whether_a_newer_or_an_older_peft_wrote_them(
    peft_version: str | None, said: str
) -> None:
    from peftc.files.screening import screen

    config = {"peft_type": "LORA", "r": 4, "retired_field": 1}
    if peft_version is not None:
        config["peft_version"] = peft_version
    with pytest.warns(UserWarning, match="unexpected fields") as caught:
        assert "retired_field" not in screen(config, "adapter_config.json", None)
    assert said in str(caught[0].message)


def test_a_true_false_field_written_null_reads_as_false_as_peft_reads_it(trained, tmp_path: Path) -> None:
    plan, base, good = trained
    directory = copy_adapter(good, tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    flags = ("use_rslora", "use_dora", "lora_bias", "ensure_weight_tying")
    (directory / "adapter_config.json").write_text(json.dumps({**config, **dict.fromkeys(flags)}))
    spec = peftc.load_adapter(copy.deepcopy(base), directory).plan_of("default").spec.peft
    assert [getattr(spec, flag) for flag in flags] == [False] * len(flags)


def test_only_known_fields_reach_the_method(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peftc.methods.lora.method import Lora

    plan, base, good = trained
    directory = copy_adapter(good, tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    config["sneaky"] = "value"
    (directory / "adapter_config.json").write_text(json.dumps(config))
    seen = {}
    real = Lora.spec_from_peft_config

    def spy(self, fields):
        seen.update(fields)
        return real(self, fields)

    monkeypatch.setattr(Lora, "spec_from_peft_config", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftc.load_adapter(copy.deepcopy(base), directory)
    assert "sneaky" not in seen and seen["peft_type"] == "LORA"


def test_harmless_values_of_dangerous_fields_are_accepted(trained, tmp_path: Path) -> None:
    """peft writes tokenizer_kwargs: null for prompt methods; false/null carry nothing."""
    plan, base, good = trained
    directory = copy_adapter(good, tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(trust_remote_code=False, tokenizer_kwargs=None)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert peftc.load_adapter(copy.deepcopy(base), directory).adapter_names == ["default"]


# ------------------------------------------------------------------------------- lenient mode
def test_lenient_load_reports_what_it_could_not_use(trained, tmp_path: Path) -> None:
    plan, base, good = trained
    directory = copy_adapter(good, tmp_path / "adapter")
    reference = peftc.load_adapter(copy.deepcopy(base), good).adapter_state_dict("default")
    names = sorted(reference)
    missing, mis_shaped = names[0], names[1]

    def damage(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[missing]
        tensors[mis_shaped] = torch.zeros(3, 3)
        tensors["base_model.model.extra.lora_A.weight"] = torch.zeros(2, 2)

    edit_tensors(damage)(directory)
    with pytest.raises(peftc.AdapterFileError):
        peftc.load_adapter(copy.deepcopy(base), directory)  # strict by default
    with pytest.warns(UserWarning, match="loaded leniently"):
        model = peftc.load_adapter(copy.deepcopy(base), directory, strict=False)
    report = model.load_reports["default"]
    assert report.missing == (missing,)
    assert report.unexpected == ("base_model.model.extra.lora_A.weight",)
    assert report.mismatched == ((mis_shaped, (3, 3), tuple(reference[mis_shaped].shape)),)
    loaded = model.adapter_state_dict("default")
    for name in names[2:]:
        assert torch.equal(loaded[name], reference[name]), "every usable tensor is loaded"
    assert (
        not torch.equal(loaded[mis_shaped], reference[mis_shaped])
        and loaded[mis_shaped].shape == reference[mis_shaped].shape
    )


def test_strict_load_records_an_empty_report(trained) -> None:
    plan, base, good = trained
    model = peftc.load_adapter(copy.deepcopy(base), good)
    assert not model.load_reports["default"] and model.load_reports["default"].summary() == "all tensors loaded"


def test_a_loaded_adapter_is_frozen_for_inference_unless_asked_to_train(trained) -> None:
    """peft's from_pretrained(is_trainable=False): no trainable parameter, eval mode (no dropout)."""
    plan, base, good = trained
    frozen = peftc.load_adapter(copy.deepcopy(base), good)
    assert frozen.trainable_parameters() == 0 and not frozen.training
    assert not any(module.training for module in frozen.modules())
    trainable = peftc.load_adapter(copy.deepcopy(base), good, is_trainable=True)
    assert trainable.trainable_parameters() == plan.trainable_params


def test_lenient_load_still_refuses_non_finite_values(trained, tmp_path: Path) -> None:
    plan, base, good = trained
    directory = copy_adapter(good, tmp_path / "adapter")
    edit_tensors(lambda t: t[sorted(t)[0]].view(-1).__setitem__(0, float("nan")))(directory)
    with pytest.raises(peftc.AdapterFileError, match="NaN or Inf"):
        peftc.load_adapter(copy.deepcopy(base), directory, strict=False)


# ---------------------------------------------------------------------------------- hub ids
def test_a_hub_id_loads_from_the_hugging_face_cache_offline(
    trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """adapter=<org/name> as peft takes it: the snapshot huggingface_hub keeps in its cache."""
    import shutil

    from tests.helpers import offline_hub_snapshot

    plan, base, good = trained
    shutil.copytree(good, offline_hub_snapshot(tmp_path, monkeypatch, "models--someone--tiny-lora"))
    from_hub = peftc.load_adapter(copy.deepcopy(base), "someone/tiny-lora")
    local = peftc.load_adapter(copy.deepcopy(base), good)
    x = token_batch()
    assert torch.equal(from_hub(input_ids=x).logits, local(input_ids=x).logits)
    with pytest.raises(peftc.AdapterFileError, match="neither a local directory nor a hub adapter") as missing:
        peftc.load_adapter(copy.deepcopy(base), "someone/not-cached")
    assert str(missing.value).startswith("someone/not-cached: ") and "\n" not in str(missing.value)


def test_a_missing_local_directory_is_never_looked_up_on_the_hub(
    trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`runs/adaptr` (a typo under an existing directory) reads like a hub id: it is a local
    path all the same, refused as missing without a request that would send its name to the hub."""
    import huggingface_hub

    plan, base, good = trained
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: asked.append(args))
    with pytest.raises(peftc.AdapterFileError, match="runs/adaptr: no such adapter directory"):
        peftc.load_adapter(copy.deepcopy(base), "runs/adaptr")
    assert asked == []


def test_a_run_directory_given_as_the_adapter_points_at_its_adapter(trained, tmp_path: Path) -> None:
    """`adapter=RUN` where RUN/adapter is meant; a run with checkpoints only is resumed instead."""
    plan, base, good = trained
    run = tmp_path / "run"
    shutil.copytree(good, run / "adapter")
    with pytest.raises(peftc.AdapterFileError, match=f"this is a run directory; its adapter is {run / 'adapter'}$"):
        peftc.load_adapter(copy.deepcopy(base), run)
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    with pytest.raises(
        peftc.AdapterFileError, match=f"has checkpoints but no adapter yet; continue it with resume={interrupted}$"
    ):
        peftc.load_adapter(copy.deepcopy(base), interrupted)


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_file_of_the_adapter_given_as_the_adapter_points_at_its_directory(trained, name: str) -> None:
    plan, base, good = trained
    with pytest.raises(peftc.AdapterFileError, match=f"{name}: is a file; .* give {good}$"):
        peftc.load_adapter(copy.deepcopy(base), good / name)


def test_a_directory_of_named_adapters_as_peft_saves_them_points_at_them(trained, tmp_path: Path) -> None:
    """peft's save_pretrained writes an adapter not named `default` into a subdirectory of its name."""
    from peft import PeftModel

    plan, base, good = trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(copy.deepcopy(base), good, adapter_name="second").save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists() and (tmp_path / "second" / "adapter_config.json").exists()
    with pytest.raises(peftc.AdapterFileError) as error:
        peftc.load_adapter(copy.deepcopy(base), tmp_path)
    assert str(error.value).endswith(
        f"it holds adapters in subdirectories (second, as peft saves named adapters); give one: {tmp_path / 'second'}"
    )
    assert peftc.load_adapter(copy.deepcopy(base), tmp_path / "second").adapter_names == ["default"]


# ------------------------------------------------------------------------------ atomic writes
def test_a_save_killed_between_renames_is_recovered_on_load_and_on_next_save(trained, tmp_path: Path) -> None:
    """Without RENAME_EXCHANGE the old dir is moved aside first; a kill right then leaves no
    target. Loading puts the old copy back; so does the next save."""
    plan, base, good = trained
    target = copy_adapter(good, tmp_path / "adapter")
    before = (target / "adapter_model.safetensors").read_bytes()
    os.rename(target, tmp_path / ".adapter.old-999999-deadbeef")  # what a killed writer (pid 999999) leaves
    (tmp_path / ".adapter.tmp-999999-x1y2z3").mkdir()  # and its half-written staging dir
    model = peftc.load_adapter(copy.deepcopy(base), target)
    assert (target / "adapter_model.safetensors").read_bytes() == before
    assert model.adapter_names == ["default"]
    model.save_adapter(target)  # the next save clears the dead writer's leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_save_replaces_only_the_adapters_own_files(trained, tmp_path: Path) -> None:
    """A tokenizer saved into the directory first, notes, another tool's subfolder and a link
    survive a save (peft's save_pretrained leaves them too); the adapter's files are replaced."""
    plan, base, good = trained
    target = copy_adapter(good, tmp_path / "adapter")
    (target / "tokenizer.json").write_text('{"version": "1.0"}')
    (target / "notes.txt").write_text("lr 3e-3 looked best")
    os.chmod(target / "notes.txt", 0o600)
    (target / "eval").mkdir()
    (target / "eval" / "scores.csv").write_text("step,loss\n")
    (target / "latest").symlink_to("notes.txt")
    stale = target / "adapter_model.safetensors"
    stale.write_bytes(b"not the adapter")
    model = peftc.load_adapter(copy.deepcopy(base), good)
    model.save_adapter(target)
    model.save_adapter(target)  # twice: the second swap carries the same files again
    assert (target / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (target / "notes.txt").read_text() == "lr 3e-3 looked best"
    assert (target / "notes.txt").stat().st_mode & 0o777 == 0o600
    assert (target / "eval" / "scores.csv").read_text() == "step,loss\n"
    assert os.readlink(target / "latest") == "notes.txt"
    assert stale.read_bytes() == (good / "adapter_model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no staging leftovers"


def test_the_next_write_clears_temp_files_of_dead_writers_only(tmp_path: Path) -> None:
    dead = tmp_path / ".plan.json.tmp-999999-abc123"  # pid 999999: a writer killed mid-write
    live = tmp_path / f".metrics.json.tmp-{os.getpid()}-def456"  # a writer still running
    dead.write_text("{")
    live.write_text("{")
    atomic.write_text_atomic(tmp_path / "plan.json", "{}\n")
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "plan.json"]


def test_files_another_process_adds_while_a_save_stages_survive_the_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tokenizer written into the directory after the save copied the others over (and before
    the swap) is carried into the new copy too, not dropped with the old one."""
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "notes.txt").write_text("kept")
    swap = atomic._swap_into_place

    def tokenizer_lands_first(staging: Path, into: Path) -> None:
        (into / "tokenizer.json").write_text("{}")
        swap(staging, into)

    monkeypatch.setattr(atomic, "_swap_into_place", tokenizer_lands_first)
    with atomic.atomic_directory(target, keep_others=True) as staging:
        (staging / "adapter_config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "notes.txt", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no staging leftovers"


def test_recovery_puts_back_the_newest_copy_moved_aside(tmp_path: Path) -> None:
    for age, name in enumerate([".adapter.old-999998-aaaa", ".adapter.old-999999-bbbb"]):  # dead writers
        aside = tmp_path / name
        aside.mkdir()
        (aside / "adapter_config.json").write_text(str(age))
        os.utime(aside, (1_000_000 + age, 1_000_000 + age))
    atomic.recover(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_exchange_swaps_directories_in_one_step(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not atomic.exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this system")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_two_writers_to_one_directory_leave_one_complete_adapter(trained, tmp_path: Path) -> None:
    plan, base, good = trained
    first = peftc.load_adapter(copy.deepcopy(base), good)
    second = peftc.materialize(peftc.compile([*OVERRIDES, "peft.r=4"]), base_model=copy.deepcopy(base))
    target = tmp_path / "adapter"
    errors: list[BaseException] = []

    def write(model: peftc.runtime.model.PeftcModel) -> None:
        try:
            for _ in range(5):
                model.save_adapter(target)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(m,)) for m in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    loaded = peftc.load_adapter(copy.deepcopy(base), target)  # config and weights from the same save
    assert loaded.plan_of("default").spec.peft.r in (4, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_our_adapter_with_unknown_peft_fields_still_loads_in_peft(trained) -> None:
    """The files we write stay what peft expects (the field table did not leak into them)."""
    from peft import PeftModel

    plan, base, good = trained
    config = json.loads((good / "adapter_config.json").read_text())
    assert set(config) <= peft_fields()["LORA"]
    assert peft_lora_config(plan).r == config["r"]
    PeftModel.from_pretrained(copy.deepcopy(base), good)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_adapter_directories_follow_the_users_umask(trained, tmp_path: Path, umask: int) -> None:
    plan, base, _ = trained
    model = peftc.materialize(plan, base_model=copy.deepcopy(base))
    previous = os.umask(umask)
    try:
        model.save_adapter(tmp_path / "adapter")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o777 & ~umask
    for file in (tmp_path / "adapter").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file.name


def test_saving_through_a_symlinked_directory_keeps_the_link(trained, tmp_path: Path) -> None:
    plan, base, _ = trained
    model = peftc.materialize(plan, base_model=copy.deepcopy(base))
    (tmp_path / "real").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    model.save_adapter(link)
    assert link.is_symlink() and (tmp_path / "real" / "adapter_model.safetensors").is_file()


def test_loading_a_second_adapter_leaves_the_active_one_active(trained) -> None:
    """As peft's PeftModel.load_adapter: the new adapter is added beside, not switched to."""
    plan, base, good = trained
    model = peftc.load_adapter(copy.deepcopy(base), good)
    peftc.load_adapter(model, good, adapter_name="second")
    assert model.adapter_names == ["default", "second"] and model.active_adapters == ["default"]


def test_a_strict_load_names_the_tensor_that_does_not_fit(trained, tmp_path: Path) -> None:
    plan, base, good = trained
    directory = copy_adapter(good, tmp_path / "adapter")
    missing = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    edit_tensors(lambda tensors: tensors.pop(missing))(directory)
    with pytest.raises(
        peftc.AdapterFileError, match=f"1 tensors the adapter config implies are missing, e.g. {missing}"
    ):
        peftc.load_adapter(copy.deepcopy(base), directory)
