"""Where base models, their configs and tokenizers come from.

A model is either built from a transformers config with a fixed seed (the shipped tiny models:
no download, same seed gives the same weights) or loaded from a local directory or hub id.
Errors name `model.*` keys. `trust_remote_code` is never enabled: a config cannot run code.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftc.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    from peftc.spec import ModelSpec

ASSETS = Path(__file__).parent / "assets"
BYTE_TOKENIZER = ASSETS / "byte_tokenizer"
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


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
        config = AutoConfig.from_pretrained(_resolve_source(model), revision=model.revision, trust_remote_code=False)
        for key, value in overrides.items():
            setattr(config, key, value)
    return config


def _model_type_hint(model_type: str | None) -> str:
    from transformers import CONFIG_MAPPING

    from peftc.errors import did_you_mean

    return (
        did_you_mean(str(model_type), list(CONFIG_MAPPING.keys())) or "see transformers' CONFIG_MAPPING for valid names"
    )


def _resolve_source(model: ModelSpec) -> str:
    """Check a local path exists (or a hub id is reachable) before transformers tries 25 s of retries."""
    source = os.path.expanduser(str(model.name_or_path))
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ConfigError(
                "model.name_or_path",
                model.name_or_path,
                "directory has no config.json",
                "point it at a saved transformers model (save_pretrained output)",
            )
        return source
    if source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.path.exists(source):
        raise ConfigError(
            "model.name_or_path",
            model.name_or_path,
            "no such directory",
            "give an existing local model directory, or a hub id like 'org/name'",
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(source):
        raise ConfigError(
            "model.name_or_path",
            model.name_or_path,
            "is not a local directory and the hub is offline (HF_HUB_OFFLINE=1)",
            "download it first or use a local directory",
        )
    return source


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # the hub client is optional here; treat any failure as "not cached"
        return False


def auto_class(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def build_model(
    model: ModelSpec,
    auto_class_name: str,
    extra_config: dict[str, Any] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Instantiate the base model with real weights (config-built: seeded random init)."""
    import torch

    cls = auto_class(auto_class_name)
    config = hf_config(model, extra_config)
    dtype = getattr(torch, model.dtype)
    if model.is_config_built:
        with _seeded(model.init_seed):
            built = cls.from_config(config, dtype=dtype)
        built.config._name_or_path = model.label
        built.name_or_path = model.label
        return built.to(device).eval()
    try:
        loaded = cls.from_pretrained(
            _resolve_source(model),
            config=config,
            revision=model.revision,
            dtype=dtype,
            trust_remote_code=False,
        )
    except OSError as exc:
        raise ConfigError(
            "model.name_or_path",
            model.name_or_path,
            f"cannot be loaded: {str(exc).splitlines()[0]}",
            "check the directory holds model weights (model.safetensors)",
        ) from exc
    return loaded.to(device).eval()


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


def load_tokenizer(model: ModelSpec) -> Any:
    """The tokenizer for the base model; config-built models use peftc's offline byte tokenizer."""
    from transformers import AutoTokenizer

    source = model.tokenizer
    if source is None:
        source = str(BYTE_TOKENIZER) if model.is_config_built else _resolve_source(model)
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
    return tokenizer


@functools.lru_cache(maxsize=1)
def byte_tokenizer_vocab_size() -> int:
    with open(BYTE_TOKENIZER / "tokenizer.json") as fh:
        data = json.load(fh)
    return len(data["model"]["vocab"])
