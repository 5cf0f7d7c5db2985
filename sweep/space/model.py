"""The study model: the vocabulary of study files, the search `Space`, `Constraint`, `SamplerSpec`
and `StudySpec` (sweep.space documents the file format; sweep.space.parse reads it)."""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from engine.vocab.config import (
    FIELD_NAMES,
    MIXED,
    NATURAL,
    WEIGHT_READERS,
    ConfigError,
    FidelitySetting,
    ModelConfig,
    OpGroup,
    Precision,
    TensorGroup,
    fidelity_of,
    precision_of,
)
from sweep.objectives import direction
from sweep.param import Param


class StudyFileError(ConfigError):
    """A study file that cannot be used; the message names the file, the key and the legal values."""


# --- vocabulary -----------------------------------------------------------------------------
SAMPLERS = ("grid", "nsga2", "tpe", "gp")
TENSOR_FIELDS = tuple(g.value for g in TensorGroup)
OP_FIELDS = tuple(o.value for o in OpGroup)
GROUP_OF: dict[str, TensorGroup | OpGroup] = {g.value: g for g in TensorGroup} | {o.value: o for o in OpGroup}
#: `couple = "weights"`: every weight group drives the linears that read it.
WEIGHT_COUPLING = WEIGHT_READERS

TOP_KEYS = ("study", "eval", "perf", "sampler", "constraints", "space", "numerics", "sensitivity")
SENSITIVITY_KEYS = ("base", "prefill", "decode", "families", "choices", "layers")
SENSITIVITY_DEFAULTS = {"prefill": 128, "decode": 127}  # a short teacher-forced window: a quarter of a trial
NUMERICS_KEYS = ("silu", "lm_head", "tt_metal")  # version switches and model-level numerics (engine.accuracy.evaluator.Evaluator)
STUDY_KEYS = ("name", "model", "devices", "objectives", "storage", "description")
EVAL_KEYS = ("prefill", "decode", "windows")
PERF_KEYS = ("batch", "prefill", "decode", "dp")
SAMPLER_KEYS = {
    "grid": ("kind",),
    "nsga2": ("kind", "n_trials", "seed", "population"),
    "tpe": ("kind", "n_trials", "seed", "n_startup"),
    "gp": ("kind", "n_trials", "seed", "n_startup"),
}
CONSTRAINT_KEYS = ("metric", "min", "max")
SPACE_META_KEYS = ("base", "configs", "couple", "natural", "layers", "probes")
SPACE_KEYS = SPACE_META_KEYS + FIELD_NAMES
LAYERS_KEYS = ("first", "last", "groups")
EVAL_DEFAULTS = {"prefill": 512, "decode": 511, "windows": 1}
MAX_WINDOWS = 128  # the evaluation text holds ~170 windows of 1024 SmolLM2 tokens
PERF_DEFAULTS = {"batch": 1, "prefill": 128, "decode": 200, "dp": 1}
MAX_GRID = 100_000  # configs a grid may enumerate and queue
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def legal_values(group: str) -> tuple[str, ...]:
    """The values a group key may take in a study file."""
    if group in TENSOR_FIELDS:
        vals = tuple(p.value for p in Precision)
        return vals + (MIXED,) if group == "activation" else vals
    return tuple(f.value for f in FidelitySetting)


def canonical_value(group: str, value: str) -> str:
    """`value` as the config vocabulary spells it (`BFP4` -> `bfp4`, `mixed` for None)."""
    g = GROUP_OF[group]
    if isinstance(g, TensorGroup):
        p = precision_of(value, g)
        return p.value if p is not None else MIXED
    return fidelity_of(value).value


# --- the search space -----------------------------------------------------------------------
class Space:
    """A search space over ModelConfigs: a base config, categorical params, coupled fidelities.

    Either a product space (every combination of the params' choices) or, when `configs` is
    given, exactly those configs (params are then the fields that vary among them).
    """

    def __init__(
        self,
        n_layers: int,
        base: ModelConfig,
        params: Sequence[Param],
        couple: Mapping[str, Sequence[str]] | None = None,
        natural: Mapping[str, str] | None = None,
        configs: Sequence[ModelConfig] | None = None,
    ) -> None:
        self.n_layers = n_layers
        self.base = base
        self.params = tuple(params)
        self.couple = {g: tuple(ops) for g, ops in (couple or {}).items()}
        self.natural = dict(NATURAL if natural is None else natural)
        self.configs = tuple(configs) if configs is not None else None
        self._by_name = {p.name: p for p in self.params}

    # --- size and enumeration -----------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of configs in the space."""
        if self.configs is not None:
            return len(self.configs)
        return math.prod(len(p.choices) for p in self.params)

    def config(self, params: Mapping[str, Any]) -> ModelConfig:
        """The ModelConfig for a param assignment (missing params keep the base value)."""
        unknown = set(params) - set(self._by_name)
        if unknown:
            raise ConfigError(f"unknown space parameter {sorted(unknown)[0]!r}; legal: {', '.join(self._by_name)}")
        changes: list[dict[str, str]] = [{} for _ in range(self.n_layers)]
        # shared params first, per-layer params (fewer layers) override them
        for p in sorted(self.params, key=lambda p: -len(p.layers)):
            if p.name not in params:
                continue
            v = str(params[p.name])
            if v not in p.choices:
                raise ConfigError(f"parameter {p.name}: value {v!r} not in its choices {', '.join(p.choices)}")
            for i in p.layers:
                changes[i][p.field] = v
        layers = []
        for i, base in enumerate(self.base.layers):
            ch = changes[i]
            if self.couple:
                cur = dict(base.items()) | ch
                for g, ops in self.couple.items():
                    for op in ops:
                        ch[op] = self.natural[cur[g]]
            layers.append(base.replace(**ch) if ch else base)
        return ModelConfig(tuple(layers))

    def params_of(self, mc: ModelConfig) -> dict[str, str]:
        """The param assignment that gives `mc` (a config of this space)."""
        out = {}
        for p in self.params:
            vals = {dict(mc.layers[i].items())[p.field] for i in p.layers}
            if len(vals) != 1:
                raise ConfigError(f"config is not in the space: parameter {p.name} would need {sorted(vals)}")
            out[p.name] = vals.pop()
        if self.config(out) != mc:
            raise ConfigError(f"config is not in the space: {mc}")
        return out

    def grid(self) -> Iterator[tuple[dict[str, str], ModelConfig]]:
        """Every (params, config) of the space, in file order, without duplicates."""
        seen: set[ModelConfig] = set()
        if self.configs is not None:
            for mc in self.configs:
                if mc not in seen:
                    seen.add(mc)
                    yield self.params_of(mc), mc
            return
        names = [p.name for p in self.params]
        for combo in itertools.product(*(p.choices for p in self.params)):
            params = dict(zip(names, combo))
            mc = self.config(params)
            if mc not in seen:
                seen.add(mc)
                yield params, mc

    # --- Optuna -------------------------------------------------------------------------
    def suggest(self, trial) -> dict[str, str]:
        """Ask `trial` for every param (fixed params of an enqueued trial come back as given)."""
        return {p.name: trial.suggest_categorical(p.name, list(p.choices)) for p in self.params}


# --- the study ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Constraint:
    metric: str
    min: float | None = None
    max: float | None = None

    def violation(self, value: float) -> float:
        """Optuna's constraint value: > 0 means violated (by that much)."""
        v = -math.inf
        if self.min is not None:
            v = max(v, self.min - value)
        if self.max is not None:
            v = max(v, value - self.max)
        return float(v)

    @property
    def key(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f">={self.min:g}")
        if self.max is not None:
            parts.append(f"<={self.max:g}")
        return self.metric + "".join(parts)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"metric": self.metric}
        if self.min is not None:
            d["min"] = self.min
        if self.max is not None:
            d["max"] = self.max
        return d


@dataclass(frozen=True)
class SamplerSpec:
    kind: str = "grid"
    n_trials: int | None = None
    seed: int = 0
    population: int = 50
    n_startup: int = 10

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"kind": self.kind}
        if self.kind != "grid":
            d["n_trials"], d["seed"] = self.n_trials, self.seed
        if self.kind == "nsga2":
            d["population"] = self.population
        if self.kind in ("tpe", "gp"):
            d["n_startup"] = self.n_startup
        return d


@dataclass
class StudySpec:
    """A validated study file."""

    name: str
    model: str
    devices: list[str]
    objectives: list[str]
    storage: str  # an Optuna storage URL, or "journal:/abs/path.log"
    eval: dict[str, int]
    perf: dict[str, int]
    sampler: SamplerSpec
    constraints: list[Constraint]
    space: Space
    space_doc: dict  # the normalised [space] table (JSON-able)
    path: str | None = None
    description: str = ""
    n_layers: int = 0
    numerics: dict = field(default_factory=dict)  # [numerics]: silu mode, lm_head (format, fidelity)
    sensitivity: dict | None = None  # [sensitivity], normalised: base, prefill, decode, families, layers
    _lock_dir: str | None = field(default=None, repr=False)

    @property
    def primary(self) -> str:
        return self.devices[0]

    @property
    def directions(self) -> list[str]:
        return [direction(o) for o in self.objectives]

    @property
    def is_grid(self) -> bool:
        return self.sampler.kind == "grid"

    def numerics_kwargs(self) -> dict:
        """[numerics] as `engine.accuracy.evaluator.Evaluator` keywords (silu, lm_head, profile)."""
        num = self.numerics
        return ({"silu": num["silu"]} if "silu" in num else {}) | (
            {"lm_head": tuple(num["lm_head"])} if "lm_head" in num else {}) | (
            {"profile": num["tt_metal"]} if "tt_metal" in num else {})

    @property
    def journal_path(self) -> Path | None:
        return Path(self.storage[len("journal:"):]) if self.storage.startswith("journal:") else None

    @property
    def runs_dir(self) -> Path:
        """Where lock files and worker logs go: the journal's folder, else `.runs` by the study file."""
        if self.journal_path is not None:
            return self.journal_path.parent
        if self._lock_dir:
            return Path(self._lock_dir)
        return (Path(self.path).resolve().parent if self.path else Path.cwd()) / ".runs"

    def to_dict(self) -> dict:
        """The parsed study file as a JSON-able dict (stored as the study's `spec` user attribute)."""
        return {
            "name": self.name,
            "model": self.model,
            "devices": list(self.devices),
            "objectives": list(self.objectives),
            "constraints": [c.to_dict() for c in self.constraints],
            # windows = 1 (the default) is left out, so studies made before windows existed still match
            "eval": {k: v for k, v in self.eval.items() if not (k == "windows" and v == 1)},
            "perf": dict(self.perf),
            "sampler": self.sampler.to_dict(),
            "space": self.space_doc,
            "storage": self.storage,
            "description": self.description,
            "file": self.path,
            "n_layers": self.n_layers,
            "space_size": self.space.size,
        } | ({"numerics": dict(self.numerics)} if self.numerics else {}) | (
            {"sensitivity": dict(self.sensitivity)} if self.sensitivity else {})

    def comparable(self) -> dict:
        """The parts that must not change when a study is resumed."""
        d = self.to_dict()
        for k in ("storage", "file", "description", "sensitivity"):  # the profile is a study of its own
            d.pop(k, None)
        return d
