"""Local Hugging Face directories: config.json (engine.models.spec.from_hf_config) and safetensors
shards read on access (engine.models.store), the checkpoint's own tokenizer files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from engine.models.loaders.common import (
    BYTE_TOKENIZER_FILE,
    ByteTokenizer,
    LoadedModel,
    _file_fingerprint,
    check_weights,
)
from engine.models.spec import ModelFormatError, ModelSpec, from_hf_config
from engine.models.store import CanonicalStore, SafetensorsStore, safetensors_files


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    try:
        return json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: no config.json; a model directory needs config.json + *.safetensors") from None
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{cfg_path}: not valid JSON ({exc})") from None


def _safetensors_files(path: Path) -> list[Path]:
    return safetensors_files(path)


def read_hf_state_dict(path: str | os.PathLike) -> dict:
    """The checkpoint's tensors as stored (original names and layout), widened to fp32, all in memory."""
    raw = SafetensorsStore(Path(path))
    return {k: raw[k] for k in raw}


def _hf_tokenizer_factory(path: Path) -> Callable[[], Any] | None:
    if (path / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None

    def make():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise ModelFormatError(f"{path}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from None

    return make


def load_hf_dir(path: str | os.PathLike, name: str | None = None) -> LoadedModel:
    """A local Hugging Face checkpoint (config.json + safetensors, sharded or not)."""
    path = Path(path)
    spec = from_hf_config(_read_config(path), name or path.name, path)
    files = _safetensors_files(path)
    raw = SafetensorsStore(path)  # headers only: tensors are read when used, one at a time
    weights = CanonicalStore(raw, spec)
    check_weights(spec, weights, path)
    fp = _file_fingerprint([*files, path / "config.json"])  # the config changes the model too (e.g. rope)
    return LoadedModel(spec, weights, None, str(path), kind="hf", fingerprint=fp,
                       tokenizer_factory=_hf_tokenizer_factory(path), raw=raw)




# --- the source interface (engine.models.loaders.SOURCES) ---------------------------------------
def spec(path: Path, name: str) -> ModelSpec:
    return from_hf_config(_read_config(path), name, path)


def load(path: Path, name: str, cache: str | os.PathLike | None = None) -> LoadedModel:
    return load_hf_dir(path, name=name)


def check(path: Path, name: str) -> None:
    """Every safetensors header parsed and checked against config.json (no tensor is read), and
    the tokenizer files present."""
    loaded = load_hf_dir(path, name)
    if not len(loaded.raw):
        raise ModelFormatError(f"{path}: the safetensors files hold no tensors")
    loaded.require_tokenizer()
