"""The seed's models as ModelSpecs (engine.models.spec), for the performance model and the benchmarks.

`shape_for(x)` accepts a seed model name exactly as the seed's tables write it (`Llama3.1-8B`,
`Phi-3-mini-128k-instruct`), a Hugging Face id or alias (`meta-llama/Llama-3.1-8B-Instruct`,
`smollm2-135m`), a local directory (or file) holding a Hugging Face `config.json`, a `ModelSpec`, or a registry name that `engine.models.loaders.model_spec` knows (tiny
random test models). The table lives in `engine/data/model_shapes.json`; the values are the public
config.json values of each model.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.models.spec import ModelSpec, from_hf_config

DATA = Path(__file__).resolve().parents[1] / "data" / "model_shapes.json"


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


@lru_cache(maxsize=1)
def _table() -> tuple[dict[str, ModelSpec], dict[str, str]]:
    data = json.loads(DATA.read_text())
    shapes: dict[str, ModelSpec] = {}
    index: dict[str, str] = {}
    fields = set(ModelSpec.__dataclass_fields__)
    for entry in data["models"]:
        values = {k: v for k, v in entry.items() if k in fields}
        values["prefill_chunk_k"] = tuple(sorted((entry.get("prefill_chunk_k") or {}).items()))
        values["max_seq"] = entry["context"]
        shape = ModelSpec(**values, source=f"config.json of {entry.get('hf', entry['name'])}")
        shapes[shape.name] = shape
        for alias in [shape.name, entry.get("hf", ""), entry.get("hf", "").split("/")[-1], *entry.get("aliases", [])]:
            if alias:
                index.setdefault(_norm(alias), shape.name)
    return shapes, index


def known_models() -> list[str]:
    """The names in the shape table, in table order."""
    return list(_table()[0])


def check_context(shape: ModelSpec, prefill: int, decode: int, what: str = "prefill + decode") -> None:
    """Refuse a run longer than the model's context (prefill + decode tokens in the KV cache)."""
    if shape.max_seq and prefill + decode > shape.max_seq:
        raise ValueError(f"{what} = {prefill} + {decode} = {prefill + decode} tokens exceeds {shape.name}'s context of "
                         f"{shape.max_seq}; use at most {max(0, shape.max_seq - decode)} prefill tokens with {decode} decode")


def shape_for(model: Any) -> ModelSpec:
    """The ModelSpec of a model given by name, HF id, local config.json directory or ModelSpec."""
    if isinstance(model, ModelSpec):
        return model
    if not isinstance(model, (str, Path)):
        raise TypeError(f"shape_for wants a model name, a path or a ModelSpec, not {type(model).__name__}")
    text = str(model)
    shapes, index = _table()
    hit = index.get(_norm(text))
    if hit:
        return shapes[hit]
    path = Path(text).expanduser()
    cfg_file = path / "config.json" if path.is_dir() else path
    if cfg_file.is_file() and cfg_file.suffix == ".json":
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_file} is not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_file} is not a config.json object")
        return from_hf_config(cfg, path.name if path.is_dir() else path.parent.name, cfg_file.parent, runnable=False)
    try:  # registry names (tiny random models, GGUF files): the loaders know their specs
        from engine.models.loaders import model_spec
    except ImportError:
        model_spec = None
    if model_spec is not None:
        try:
            return model_spec(text)
        except Exception:  # noqa: BLE001 - fall through to the helpful error below
            pass
    raise ValueError(
        f"unknown model {text!r}; known models: {', '.join(known_models())} "
        "(or a registry name, a Hugging Face directory with config.json, or a ModelSpec)"
    )
