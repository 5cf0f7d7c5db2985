"""Study files (``studies/*.toml``) -> a validated `StudySpec` with its search `Space`.

Everything in a study file is checked before anything runs: a malformed file, an unknown key or
value, or an empty space raises `StudyFileError` naming the file, the key and the legal
keys/values, and nothing is written to any storage.

Study file format
=================

A study file is TOML. Only ``[study]`` (with ``model``) and ``[space]`` are required::

    [study]
    name = "lt-pareto"                  # default: the file name without .toml
    model = "smollm2-135m"              # an engine.loaders registry name
    devices = ["N150", "N300"]          # speed/TTFT reported for each; the first is primary
    objectives = ["top1", "speed:N150"] # default: top1, top5, speed:<primary>, ttft:<primary>
    storage = "journal:.runs/lt-pareto.log"   # optional, see below
    description = "free text"           # optional

    [eval]                              # accuracy evaluation (teacher forced)
    prefill = 512                       # default 512
    decode = 511                        # default 511; longer = finer Top-1 resolution
    windows = 1                         # default 1 (tt-metal's method); N scores N disjoint
                                        # 1024-token windows of the text (N x 511 positions),
                                        # each against its own cached fp32 reference

    [perf]                              # performance-model settings for speed / TTFT
    batch = 1                           # defaults: the seed's performance runs
    prefill = 128
    decode = 200
    dp = 1

    [sampler]
    kind = "grid"                       # grid | nsga2 | tpe | gp   (default grid)
    # n_trials = 300                    # required for nsga2/tpe/gp, not allowed for grid
    # seed = 0                          # default 0
    # population = 50                   # nsga2 only
    # n_startup = 10                    # tpe / gp only: the first n_startup trials are random
                                        # samples, the model (TPE / GP) proposes the rest;
                                        # must be < n_trials

    [[constraints]]                     # optional, any number
    metric = "top1"                     # top1, top5, kld, ppl, speed:<DEV>, ttft:<DEV>
    min = 85                            # and/or max = ...

    [space]
    base = "defaults"                   # preset (defaults, performance, accuracy) or config
                                        # string: the value of every group not listed
    ff1_3 = ["bfp4", "bfp8", "bf16"]    # a list = the values a group may take
    ff2 = ["bfp4", "bfp8", "bf16"]
    activation = ["mixed", "bf16", "bfp8"]
    li_o_prefill = "hifi2"              # one value = fixed
    couple = { ff1_3 = "li_ff1_3", wqkv = ["li_qkv_decode", "li_qkv_prefill"] }
                                        # "natural fidelity": each listed op group follows its
                                        # weight group; couple = "weights" couples all four
                                        # weight groups to their linears
    # [space.natural]                   # the natural fidelity of each precision (default below)
    # bfp4 = "lofi"
    # bfp8 = "hifi2"
    # bf16 = "hifi4"

    [space.layers]                      # optional per-decoder-layer space
    first = 2                           # layers 0, 1 ...
    last = 2                            # ... and the last 2 get their own parameters,
    groups = ["ff1_3", "ff2"]           # (default: every group given a list) named L0.ff1_3,
                                        # L29.ff2, ...; the other layers share `ff1_3`, `ff2`

Instead of group values a grid may list its configs explicitly (diffs over ``base``; a full
canonical string with ``; decoders = {...}`` sets layers individually)::

    [space]
    configs = [
      "precision_cfg = {ff1_3: bfp4}, fidelity_cfg = {li_ff1_3: lofi}",
      "precision_cfg = {ff1_3: bf16}, fidelity_cfg = {li_ff1_3: hifi4}",
    ]

Group keys are the config vocabulary (docs/NUMERICS.md): tensor groups ``ff1_3, ff2,
wqkv, wo, kv_cache, activation`` take ``bfp4, bfp8, bf16`` (``fp32`` emulator only; ``mixed``
for activation only); op groups ``li_ff1_3, li_ff2, li_qkv_decode, li_o_decode, sdpa_decode,
li_qkv_prefill, li_o_prefill, sdpa_prefill`` take ``lofi, hifi2, hifi2na, hifi2fp16, hifi3,
hifi4, hifi4fp32`` (``exact`` emulator only).

Objectives are named ``top1``, ``top5`` (maximised), ``speed:<DEVICE>`` (maximised),
``ttft:<DEVICE>`` (minimised), ``kld``, ``ppl`` (minimised); the device must be one of the
study's. A constraint is feasible when ``min <= value <= max``.

Storage: any Optuna storage URL (``sqlite:///x.db``, ``postgresql://...``, ``mysql://...``) or
``journal:PATH`` (a JournalFileBackend log; a relative PATH is relative to the study file's
folder). The default is ``journal:.runs/<name>.log`` next to the study file, i.e.
``studies/.runs/<name>.log``, which several processes on one machine can share. SQLite cannot
hand out trials to several workers safely, so it is refused with ``--workers`` > 1; use a
journal file (one machine) or PostgreSQL/MySQL (many machines).

Space parameters (Optuna params) are categorical, named by group (``ff1_3``) or by layer and
group (``L0.ff1_3``); coupled op groups are not parameters (they follow their weight group).
A grid over explicit configs has one parameter per group (or layer.group) that varies among them.
"""
from __future__ import annotations

import itertools
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from engine.config import (
    FIELD_NAMES,
    MIXED,
    NATURAL,
    WEIGHT_READERS,
    Config,
    ConfigError,
    FidelitySetting,
    ModelConfig,
    OpGroup,
    Precision,
    TensorGroup,
    fidelity_of,
    precision_of,
    resolve,
)
from sweep.param import Param
from sweep.probes import DEFAULT_FAMILIES, FAMILIES, parse_probes
from sweep.objectives import OBJECTIVES, default_objectives, direction, legal_names


class StudyFileError(ConfigError):
    """A study file that cannot be used; the message names the file, the key and the legal values."""


# --- vocabulary -----------------------------------------------------------------------------
SAMPLERS = ("grid", "nsga2", "tpe", "gp")
DEFAULT_DEVICES = ("N150", "N300", "T3K", "TG")
TENSOR_FIELDS = tuple(g.value for g in TensorGroup)
OP_FIELDS = tuple(o.value for o in OpGroup)
GROUP_OF: dict[str, TensorGroup | OpGroup] = {g.value: g for g in TensorGroup} | {o.value: o for o in OpGroup}
#: `couple = "weights"`: every weight group drives the linears that read it.
WEIGHT_COUPLING = WEIGHT_READERS

TOP_KEYS = ("study", "eval", "perf", "sampler", "constraints", "space", "numerics", "sensitivity")
SENSITIVITY_KEYS = ("base", "prefill", "decode", "families", "choices", "layers")
SENSITIVITY_DEFAULTS = {"prefill": 128, "decode": 127}  # a short teacher-forced window: a quarter of a trial
NUMERICS_KEYS = ("silu", "lm_head")  # version switches and model-level numerics (engine.accuracy.Evaluator)
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
        """[numerics] as `engine.accuracy.Evaluator` keywords (silu, lm_head)."""
        num = self.numerics
        return ({"silu": num["silu"]} if "silu" in num else {}) | (
            {"lm_head": tuple(num["lm_head"])} if "lm_head" in num else {})

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

    @classmethod
    def from_dict(cls, d: Mapping, n_layers: int | None = None) -> "StudySpec":
        """Rebuild a spec from `to_dict()` output (how workers read it back from the storage)."""
        doc = {
            "study": {"name": d["name"], "model": d["model"], "devices": d["devices"],
                      "objectives": d["objectives"], "storage": d["storage"],
                      "description": d.get("description", "")},
            "eval": d["eval"],
            "perf": d["perf"],
            "sampler": d["sampler"],
            "constraints": d.get("constraints", []),
            "space": d["space"],
            "numerics": d.get("numerics", {}),
        } | ({"sensitivity": d["sensitivity"]} if d.get("sensitivity") else {})
        where = d.get("file") or f"study {d['name']!r}"
        return parse_spec(doc, where=where, path=d.get("file"), n_layers=n_layers or d.get("n_layers") or None)

    def comparable(self) -> dict:
        """The parts that must not change when a study is resumed."""
        d = self.to_dict()
        for k in ("storage", "file", "description", "sensitivity"):  # the profile is a study of its own
            d.pop(k, None)
        return d

    def sensitivity_study(self) -> "StudySpec":
        """The study that measures this study's sensitivity profile: `<name>.sensitivity` in the same
        storage, every probe of [sensitivity] (sweep.probes) on its short window, a grid."""
        if not self.sensitivity:
            raise StudyFileError(f"{self.path or self.name}: no [sensitivity] section; add one (base, prefill, decode, "
                                 "families) to profile this study's model")
        s = self.sensitivity
        doc = {
            "study": {"name": f"{self.name}.sensitivity", "model": self.model, "devices": self.devices,
                      "objectives": self.objectives, "storage": self.storage,
                      "description": f"sensitivity profile of {self.name}"},
            "eval": {"prefill": s["prefill"], "decode": s["decode"]},
            "perf": self.perf,
            "sampler": {"kind": "grid"},
            "space": {"probes": {k: s[k] for k in ("base", "families", "layers") if k in s}},
            "numerics": self.numerics,
        }
        return parse_spec(doc, where=f"{self.path or self.name} [sensitivity]", path=self.path, n_layers=self.n_layers)


# --- parsing --------------------------------------------------------------------------------
def load_spec(path: str | Path, n_layers: int | None = None, storage: str | None = None) -> StudySpec:
    """Read and validate a study file; `storage` overrides the file's storage URL.

    `n_layers` overrides the model's layer count (normally from `engine.loaders.model_spec`).
    Raises `StudyFileError` (a ValueError) naming the file, the key and the legal values.
    """
    p = Path(path)
    where = str(path)
    if p.is_dir():
        raise StudyFileError(f"{where} is a directory; give a study file such as studies/lt-pareto.toml")
    if not p.is_file():
        raise FileNotFoundError(f"study file {where} not found")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise StudyFileError(f"{where}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise StudyFileError(f"{where}: not a UTF-8 text file ({exc})") from None
    if storage:
        doc.setdefault("study", {})
        if isinstance(doc["study"], dict):
            doc["study"]["storage"] = storage
    return parse_spec(doc, where=where, path=str(p.resolve()), n_layers=n_layers)


def _fail(where: str, msg: str) -> StudyFileError:
    return StudyFileError(f"{where}: {msg}")


def _check_keys(where: str, table: str, d: Any, legal: Sequence[str]) -> dict:
    if not isinstance(d, dict):
        raise _fail(where, f"[{table}] must be a table of keys ({', '.join(legal)}), not {type(d).__name__}")
    for k in d:
        if k not in legal:
            full = f"{table}.{k}" if table else str(k)
            raise _fail(where, f"unknown key {full!r}; legal keys in [{table or 'top level'}]: {', '.join(legal)}")
    return d


def _int(where: str, key: str, v: Any, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(where, f"{key} must be an integer, not {v!r}")
    if v < lo:
        raise _fail(where, f"{key} must be >= {lo}, not {v}")
    return v


def _str_list(where: str, key: str, v: Any, allow_str: bool = True) -> list[str]:
    if isinstance(v, str) and allow_str:
        return [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _fail(where, f"{key} must be a list of strings, not {v!r}")
    return list(v)


def _legal_devices() -> tuple[str, ...]:
    """The systems of the engine's device table (engine/data/devices.json): one source of truth."""
    try:
        from engine.devices import device_names
    except ImportError:  # the engine's device table is optional here
        return DEFAULT_DEVICES
    return device_names()


def _model_layers(where: str, model: str, runs: Mapping[str, Mapping[str, int]] = {},  # noqa: B006 - read only
                  devices: Sequence[str] = ()) -> int:
    """The model's decoder-layer count from the engine's registry; unknown names list the legal ones.
    The weights must be readable, each of `runs` ([eval], [perf]) fit in the model's context, and
    tt_transformers must be able to lay the model out on each device (accuracy is per device)."""
    try:
        from engine import loaders
    except ImportError as exc:
        raise _fail(where, f"cannot check study.model {model!r}: engine.loaders is unavailable ({exc})") from None
    try:
        spec = loaders.check_model_files(model)  # weights present and readable, not only config.json
    except Exception as exc:  # noqa: BLE001 - any lookup failure is an unknown model
        names = _model_names(loaders)
        if names and type(exc).__name__ == "UnknownModel":
            raise _fail(where, f"unknown study.model {model!r}; legal values: {', '.join(names)} "
                               "(or a path to a .gguf file or a Hugging Face model directory)") from None
        legal = f"; registry names: {', '.join(names)}" if names and not isinstance(exc, ValueError) else ""
        raise _fail(where, f"study.model {model!r} cannot be used ({type(exc).__name__}: {exc}){legal}") from None
    from engine.accuracy import device_layout
    from engine.programs import Unsupported, check_tp

    for d in devices:
        try:
            check_tp(spec, device_layout(d)[0])
        except Unsupported as exc:
            raise _fail(where, f"study.devices: {d}: {exc}") from None
        except ValueError:  # a layout whose accuracy is not emulated (TG): its cells use the primary's
            pass
    for table, run in runs.items():
        if run["prefill"] + run["decode"] > spec.max_seq:
            raise _fail(where, f"{table}.prefill + {table}.decode = {run['prefill'] + run['decode']} tokens exceeds "
                               f"{spec.name}'s context of {spec.max_seq}; lower {table}.prefill or {table}.decode")
    return int(spec.n_layers)


def _model_names(loaders) -> list[str]:
    for attr in ("model_names", "names", "registry_names"):
        fn = getattr(loaders, attr, None)
        if callable(fn):
            try:
                return sorted(str(n) for n in fn())
            except Exception:  # noqa: BLE001
                pass
    for attr in ("REGISTRY", "MODELS", "REGISTERED"):
        table = getattr(loaders, attr, None)
        if table:
            return sorted(str(n) for n in table)
    return []


def _metric(where: str, key: str, name: Any, devices: Sequence[str]) -> str:
    if not isinstance(name, str):
        raise _fail(where, f"{key}: {name!r} is not an objective name")
    kind, sep, dev = name.partition(":")
    legal = legal_names(devices)
    if kind not in OBJECTIVES:
        raise _fail(where, f"{key}: unknown objective {name!r}; legal values: {legal}")
    if OBJECTIVES[kind].per_device:
        if dev not in devices:
            raise _fail(where, f"{key}: {name!r} names no device of the study; legal values: {legal}")
    elif sep:
        raise _fail(where, f"{key}: {kind!r} takes no device; legal values: {legal}")
    return name


def parse_spec(doc: Mapping, where: str = "<study>", path: str | None = None, n_layers: int | None = None) -> StudySpec:
    """Validate a parsed study file (a dict shaped like the TOML) into a StudySpec."""
    _check_keys(where, "", doc, TOP_KEYS)
    if "study" not in doc:
        raise _fail(where, f"missing [study] table (keys: {', '.join(STUDY_KEYS)}; model is required)")
    st = _check_keys(where, "study", doc["study"], STUDY_KEYS)
    if "model" not in st or not isinstance(st["model"], str) or not st["model"].strip():
        raise _fail(where, "study.model is required: a model registry name such as 'smollm2-135m' or 'tiny-llama'")
    model = st["model"].strip()
    default_name = Path(path).stem if path else "study"
    name = st.get("name", default_name)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _fail(where, f"study.name {name!r} must be letters, digits, '_', '.', '-' (it names files)")
    description = st.get("description", "")
    if not isinstance(description, str):
        raise _fail(where, "study.description must be a string")

    legal_dev = _legal_devices()
    devices = _str_list(where, "study.devices", st.get("devices", ["N150"]))
    if not devices:
        raise _fail(where, f"study.devices is empty; legal values: {', '.join(legal_dev)}")
    norm_dev = []
    for d in devices:
        match = [x for x in legal_dev if x.lower() == d.strip().lower()]
        if not match:
            raise _fail(where, f"study.devices: unknown device {d!r}; legal values: {', '.join(legal_dev)}")
        if match[0] in norm_dev:
            raise _fail(where, f"study.devices: {match[0]} is listed twice")
        norm_dev.append(match[0])
    devices = norm_dev

    objectives = st.get("objectives")
    if objectives is None:
        objectives = default_objectives(devices[0])
    objectives = [_metric(where, "study.objectives", o, devices) for o in _str_list(where, "study.objectives", objectives)]
    if not objectives:
        raise _fail(where, f"study.objectives is empty; legal values: {legal_names(scalar_first=False)}")
    if len(set(objectives)) != len(objectives):
        raise _fail(where, f"study.objectives lists an objective twice: {objectives}")

    ev = dict(EVAL_DEFAULTS)
    for k, v in _check_keys(where, "eval", doc.get("eval", {}), EVAL_KEYS).items():
        ev[k] = _int(where, f"eval.{k}", v)
    if ev["windows"] > MAX_WINDOWS:
        raise _fail(where, f"eval.windows must be <= {MAX_WINDOWS}, not {ev['windows']}")
    pf = dict(PERF_DEFAULTS)
    for k, v in _check_keys(where, "perf", doc.get("perf", {}), PERF_KEYS).items():
        pf[k] = _int(where, f"perf.{k}", v)

    sampler = _parse_sampler(where, doc.get("sampler", {}))

    raw_c = doc.get("constraints", [])
    if isinstance(raw_c, dict):
        raw_c = [raw_c]
    if not isinstance(raw_c, list):
        raise _fail(where, "constraints must be [[constraints]] tables with metric and min and/or max")
    constraints = []
    for i, c in enumerate(raw_c):
        c = _check_keys(where, f"constraints[{i}]", c, CONSTRAINT_KEYS)
        if "metric" not in c:
            raise _fail(where, f"constraints[{i}] needs metric ({legal_names(('DEV',))})")
        metric = _metric(where, f"constraints[{i}].metric", c["metric"], devices)
        bounds = {}
        for b in ("min", "max"):
            if b in c:
                if isinstance(c[b], bool) or not isinstance(c[b], (int, float)):
                    raise _fail(where, f"constraints[{i}].{b} must be a number, not {c[b]!r}")
                bounds[b] = float(c[b])
        if not bounds:
            raise _fail(where, f"constraints[{i}] ({metric}) needs min and/or max")
        constraints.append(Constraint(metric, bounds.get("min"), bounds.get("max")))

    storage = _parse_storage(where, st.get("storage"), name, path)

    if "space" not in doc:
        raise _fail(where, f"missing [space] table: the search space is empty (legal keys: {', '.join(SPACE_KEYS)})")
    numerics = _parse_numerics(where, doc.get("numerics", {}))
    if n_layers is None:
        n_layers = _model_layers(where, model, {"eval": ev, "perf": pf}, devices)
    space, space_doc = _parse_space(where, doc["space"], model, n_layers, sampler)
    sensitivity = _parse_sensitivity(where, doc["sensitivity"], model, n_layers) if "sensitivity" in doc else None

    return StudySpec(
        name=name, model=model, devices=devices, objectives=objectives, storage=storage, eval=ev, perf=pf,
        sampler=sampler, constraints=constraints, space=space, space_doc=space_doc, path=path,
        description=description, n_layers=n_layers, numerics=numerics, sensitivity=sensitivity,
    )


def _parse_sensitivity(where: str, d: Any, model: str, n_layers: int) -> dict:
    """[sensitivity]: base config, short window, families (names; [sensitivity.choices] overrides a
    family's choices), layers. Checked by building the probe space once."""
    d = _check_keys(where, "sensitivity", d, SENSITIVITY_KEYS)
    out: dict[str, Any] = {"base": d.get("base", "defaults")}
    for k, v in SENSITIVITY_DEFAULTS.items():
        out[k] = _int(where, f"sensitivity.{k}", d.get(k, v))
    fams = d.get("families", list(DEFAULT_FAMILIES))
    if isinstance(fams, dict):  # the normalised form (a stored spec): {family: [choices]}
        names, choices = list(fams), _check_keys(where, "sensitivity.families", fams, tuple(FAMILIES))
    else:
        names = _str_list(where, "sensitivity.families", fams)
        choices = _check_keys(where, "sensitivity.choices", d.get("choices", {}), tuple(FAMILIES))
    for k in choices:
        if k not in names:
            raise _fail(where, f"sensitivity.choices.{k}: family {k!r} is not in sensitivity.families ({', '.join(names)})")
    out["families"] = {n: choices.get(n, FAMILIES[n].choices if n in FAMILIES else []) for n in names}
    if "layers" in d:
        out["layers"] = d["layers"]
    try:
        _, doc = parse_probes(out, model, n_layers)
    except ConfigError as exc:
        raise _fail(where, f"[sensitivity]: {exc}") from None
    return out | doc


def _parse_numerics(where: str, d: Any) -> dict:
    """[numerics]: `silu = "sfpu-piecewise" | "exact"`, `lm_head = ["bfp8", "hifi2fp16"]`."""
    from engine import fidelity
    from engine.config import lm_head_of

    d = _check_keys(where, "numerics", d, NUMERICS_KEYS)
    out: dict[str, Any] = {}
    if "silu" in d:
        if d["silu"] not in fidelity.SILU:
            raise _fail(where, f"numerics.silu {d['silu']!r}; legal values: {', '.join(fidelity.SILU)}")
        out["silu"] = d["silu"]
    if "lm_head" in d:
        v = d["lm_head"]
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)):
            raise _fail(where, f"numerics.lm_head {v!r} must be [FORMAT, FIDELITY], e.g. [\"bfp8\", \"hifi2fp16\"]")
        try:
            out["lm_head"] = list(lm_head_of(*v))
        except ConfigError as exc:
            raise _fail(where, f"numerics.lm_head: {exc}") from None
    return out


def _parse_sampler(where: str, d: Any) -> SamplerSpec:
    if not isinstance(d, dict):
        raise _fail(where, "[sampler] must be a table with kind = grid | nsga2 | tpe | gp")
    kind = d.get("kind", "grid")
    if kind not in SAMPLERS:
        raise _fail(where, f"sampler.kind: unknown value {kind!r}; legal values: {', '.join(SAMPLERS)}")
    legal = SAMPLER_KEYS[kind]
    for k in d:
        if k not in legal:
            other = [s for s in SAMPLERS if k in SAMPLER_KEYS[s]]
            hint = f" ({k} is for {', '.join(other)})" if other else ""
            raise _fail(where, f"unknown key 'sampler.{k}' for kind = {kind!r}{hint}; legal keys: {', '.join(legal)}")
    if kind == "grid":
        return SamplerSpec("grid")
    if "n_trials" not in d:
        raise _fail(where, f"sampler.n_trials is required for kind = {kind!r} (the trial budget)")
    out = SamplerSpec(
        kind=kind,
        n_trials=_int(where, "sampler.n_trials", d["n_trials"]),
        seed=_int(where, "sampler.seed", d.get("seed", 0), lo=0),
        population=_int(where, "sampler.population", d.get("population", 50), lo=2),
        n_startup=_int(where, "sampler.n_startup", d.get("n_startup", 10), lo=1),
    )
    if kind in ("tpe", "gp") and out.n_startup >= out.n_trials:
        given = "" if "n_startup" in d else " (the default)"
        raise _fail(where, f"sampler.n_startup = {out.n_startup}{given} >= n_trials = {out.n_trials}: every trial would be "
                           f"a random sample, never {kind.upper()}; set n_startup below n_trials, e.g. "
                           f"n_startup = {max(1, out.n_trials // 4)}")
    return out


def canonical_storage_url(url: str) -> str:
    """`postgres://` (and `postgres+driver://`), the scheme many tools print, as SQLAlchemy's
    `postgresql://`; any other URL unchanged."""
    m = re.match(r"^postgres(?=[+:])", url, flags=re.IGNORECASE)
    return "postgresql" + url[m.end():] if m else url


def _parse_storage(where: str, url: Any, name: str, path: str | None) -> str:
    folder = Path(path).resolve().parent if path else Path.cwd()
    if url is None:
        return f"journal:{folder / '.runs' / (name + '.log')}"
    if not isinstance(url, str) or not url.strip():
        raise _fail(where, f"study.storage must be a string URL, not {url!r}")
    url = url.strip()
    if url.startswith("journal:"):
        rest = url[len("journal:"):]
        if rest.startswith("//"):  # journal:///abs/path
            rest = rest[2:]
        if not rest:
            raise _fail(where, "study.storage: journal: needs a file path, e.g. journal:.runs/study.log")
        p = Path(rest).expanduser()
        return f"journal:{p if p.is_absolute() else (folder / p).resolve()}"
    if re.match(r"^[a-z][a-z0-9+]*://", url):
        return canonical_storage_url(url)
    raise _fail(where, f"study.storage {url!r} is not a storage URL; legal forms: journal:PATH, sqlite:///PATH, "
                       "postgresql://..., mysql://... (any Optuna/SQLAlchemy URL)")


def _value_list(where: str, key: str, v: Any) -> list[str]:
    if isinstance(v, str):
        vals = [v]
    elif isinstance(v, list) and all(isinstance(x, str) for x in v):
        vals = list(v)
    else:
        raise _fail(where, f"space.{key} must be a value or a list of values; legal values: {', '.join(legal_values(key))}")
    if not vals:
        raise _fail(where, f"space.{key} is an empty list: the space is empty; legal values: {', '.join(legal_values(key))}")
    out = []
    for x in vals:
        try:
            c = canonical_value(key, x)
        except ConfigError:
            raise _fail(where, f"space.{key}: unknown value {x!r}; legal values: {', '.join(legal_values(key))}") from None
        if c not in out:
            out.append(c)
    return out


def _parse_space(where: str, d: Any, model: str, n_layers: int, sampler: SamplerSpec) -> tuple[Space, dict]:
    d = _check_keys(where, "space", d, SPACE_KEYS)
    if "probes" in d:  # a sensitivity study (StudySpec.sensitivity_study): the base and its probes
        if len(d) > 1:
            raise _fail(where, "space.probes cannot be combined with other space keys")
        try:
            probes, probes_doc = parse_probes(d["probes"], model, n_layers)
            return probes, {"probes": probes_doc}
        except ConfigError as exc:
            raise _fail(where, f"space.probes: {exc}") from None
    base_text = d.get("base", "defaults")
    if not isinstance(base_text, str):
        raise _fail(where, "space.base must be a preset name (defaults, performance, accuracy) or a config string")
    try:
        base_mc = ModelConfig.parse(base_text, n_layers, model)
    except ConfigError as exc:
        raise _fail(where, f"space.base: {exc}; legal: defaults, performance, accuracy or a config string") from None

    groups = {k: _value_list(where, k, d[k]) for k in FIELD_NAMES if k in d}
    doc: dict[str, Any] = {"base": base_text}

    # --- explicit configs ---------------------------------------------------------------
    if "configs" in d:
        extra = [k for k in ("couple", "natural", "layers") if k in d] + list(groups)
        if extra:
            raise _fail(where, f"space.configs cannot be combined with space.{extra[0]}: list whole configs (diffs over base) instead")
        if sampler.kind != "grid":
            raise _fail(where, f"space.configs needs sampler.kind = 'grid' (got {sampler.kind!r}); for other samplers give group values")
        raw = d["configs"]
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise _fail(where, "space.configs must be a list of config strings")
        if not raw:
            raise _fail(where, "space.configs is empty: the space is empty")
        if not base_mc.is_uniform:
            raise _fail(where, "space.base must be uniform (no '; decoders = ...') when space.configs is given")
        configs: list[ModelConfig] = []
        for i, text in enumerate(raw):
            try:
                if "; decoders = {" in text:
                    mc = ModelConfig.parse(text, n_layers, model)
                elif text.strip().lower() in ("performance", "accuracy", "reference"):
                    mc = ModelConfig.uniform(resolve(text, model), n_layers)
                else:
                    mc = ModelConfig.uniform(Config.parse(text, base_mc.base), n_layers)
            except ConfigError as exc:
                raise _fail(where, f"space.configs[{i}]: {exc}") from None
            if mc in configs:
                raise _fail(where, f"space.configs[{i}] repeats space.configs[{configs.index(mc)}] ({text!r})")
            configs.append(mc)
        space = _explicit_space(n_layers, configs)
        doc["configs"] = list(raw)
        return space, doc

    # --- product space ------------------------------------------------------------------
    couple: dict[str, tuple[str, ...]] = {}
    if "couple" in d:
        c = d["couple"]
        if c == "weights":
            couple = dict(WEIGHT_COUPLING)
        elif isinstance(c, dict):
            for g, ops in c.items():
                if g not in TENSOR_FIELDS or g == "activation":
                    legal = [x for x in TENSOR_FIELDS if x != "activation"]
                    raise _fail(where, f"space.couple: unknown weight group {g!r}; legal keys: {', '.join(legal)}")
                ops = _str_list(where, f"space.couple.{g}", ops)
                for op in ops:
                    if op not in OP_FIELDS:
                        raise _fail(where, f"space.couple.{g}: unknown op group {op!r}; legal values: {', '.join(OP_FIELDS)}")
                    if any(op in v for v in couple.values()):
                        raise _fail(where, f"space.couple: op group {op!r} is coupled twice")
                if not ops:
                    raise _fail(where, f"space.couple.{g} lists no op group; legal values: {', '.join(OP_FIELDS)}")
                couple[g] = tuple(ops)
        else:
            raise _fail(where, "space.couple must be \"weights\" or a table {weight_group = op_group or [op_groups]}")
        doc["couple"] = {g: list(v) for g, v in couple.items()}
    natural = dict(NATURAL)
    if "natural" in d:
        nat = _check_keys(where, "space.natural", d["natural"], tuple(p.value for p in Precision))
        for k, v in nat.items():
            if not isinstance(v, str):
                raise _fail(where, f"space.natural.{k} must be a fidelity name; legal values: {', '.join(legal_values('li_ff2'))}")
            try:
                natural[k] = fidelity_of(v).value
            except ConfigError:
                raise _fail(where, f"space.natural.{k}: unknown value {v!r}; legal values: {', '.join(legal_values('li_ff2'))}") from None
        doc["natural"] = dict(natural)

    coupled_ops = {op: g for g, ops in couple.items() for op in ops}
    for k in groups:
        if k in coupled_ops:
            raise _fail(where, f"space.{k} is coupled to space.{coupled_ops[k]} (space.couple); remove one of them")

    # fixed values go into the base; lists of 2+ values become params
    fixed = {k: v[0] for k, v in groups.items() if len(v) == 1}
    free = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        raise _fail(where, f"[space] is empty: give values for at least one group or a configs list; legal keys: {', '.join(SPACE_KEYS)}")
    try:
        base_mc = ModelConfig(tuple(c.replace(**fixed) for c in base_mc.layers))
    except ConfigError as exc:
        raise _fail(where, f"[space]: {exc}") from None

    for g in couple:  # every value a coupled group can take needs a natural fidelity
        vals = set(free.get(g, [])) | {dict(c.items())[g] for c in base_mc.layers}
        for v in sorted(vals):
            if v not in natural:
                raise _fail(where, f"space.couple.{g}: precision {v!r} has no natural fidelity; add it to [space.natural] "
                                   f"(legal keys: {', '.join(p.value for p in Precision)})")

    layer_groups: list[str] = []
    first = last = 0
    if "layers" in d:
        ly = _check_keys(where, "space.layers", d["layers"], LAYERS_KEYS)
        first = _int(where, "space.layers.first", ly.get("first", 0), lo=0)
        last = _int(where, "space.layers.last", ly.get("last", 0), lo=0)
        if first + last == 0:
            raise _fail(where, "space.layers needs first and/or last >= 1 (how many layers get their own parameters)")
        layer_groups = _str_list(where, "space.layers.groups", ly.get("groups", list(free)))
        for g in layer_groups:
            if g not in free:
                legal = ", ".join(free) or "(none: no group has a list of values)"
                raise _fail(where, f"space.layers.groups: {g!r} is not a group with a list of values; legal values: {legal}")
        if not layer_groups:
            raise _fail(where, "space.layers.groups is empty; name groups that have a list of values")
        doc["layers"] = {"first": first, "last": last, "groups": list(layer_groups)}

    own = sorted(set(range(min(first, n_layers))) | set(range(max(0, n_layers - last), n_layers)))
    shared = tuple(i for i in range(n_layers) if i not in own)
    params: list[Param] = []
    for g in FIELD_NAMES:
        if g not in free:
            continue
        if g in layer_groups:
            if shared:
                params.append(Param(g, g, tuple(free[g]), shared))
        else:
            params.append(Param(g, g, tuple(free[g]), tuple(range(n_layers))))
    for i in own:
        for g in FIELD_NAMES:
            if g in layer_groups:
                params.append(Param(f"L{i}.{g}", g, tuple(free[g]), (i,)))
    for k in FIELD_NAMES:
        if k in groups:
            doc[k] = groups[k]
    space = Space(n_layers, base_mc, params, couple, natural)
    if sampler.kind == "grid" and space.size > MAX_GRID:
        raise _fail(where, f"[space] has {space.size} configs, too many for kind = 'grid' (at most {MAX_GRID}); "
                           "use sampler.kind = nsga2, tpe or gp with n_trials, or fewer values")
    return space, doc


def _explicit_space(n_layers: int, configs: Sequence[ModelConfig]) -> Space:
    """Params = the fields (or layer.fields) that vary among `configs`; the rest is the base."""
    values = [[dict(c.items()) for c in mc.layers] for mc in configs]
    base_layers = [dict(layer) for layer in values[0]]
    params: list[Param] = []
    per_layer: list[Param] = []
    for f in FIELD_NAMES:
        cols = [tuple(v[i][f] for i in range(n_layers)) for v in values]
        if all(len(set(c)) == 1 for c in cols):
            vals = list(dict.fromkeys(c[0] for c in cols))
            if len(vals) > 1:
                params.append(Param(f, f, tuple(vals), tuple(range(n_layers))))
            continue
        for i in range(n_layers):
            vals = list(dict.fromkeys(c[i] for c in cols))
            if len(vals) > 1:
                per_layer.append(Param(f"L{i}.{f}", f, tuple(vals), (i,)))
    per_layer.sort(key=lambda p: (p.layers[0], FIELD_NAMES.index(p.field)))
    base = ModelConfig(tuple(Config().replace(**layer) for layer in base_layers))
    space = Space(n_layers, base, params + per_layer, configs=configs)
    for mc in configs:  # every listed config must be reachable from its params
        space.params_of(mc)
    return space
