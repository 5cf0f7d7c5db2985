"""Reading a study file: `load_spec` / `parse_spec` validate the TOML into a `StudySpec`, table by
table, with messages naming the file, the key and the legal values ([space]: sweep.space.grid)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Mapping, Sequence

from engine.vocab.config import (
    ConfigError,
)
from sweep.objectives import OBJECTIVES, default_objectives, legal_names
from sweep.probes import DEFAULT_FAMILIES, FAMILIES, parse_probes
from sweep.space.checks import as_int, check_keys, fail, str_list
from sweep.space.grid import parse_space
from sweep.space.model import (
    _NAME_RE,
    CONSTRAINT_KEYS,
    EVAL_DEFAULTS,
    EVAL_KEYS,
    MAX_WINDOWS,
    NUMERICS_KEYS,
    PERF_DEFAULTS,
    PERF_KEYS,
    SAMPLER_KEYS,
    SAMPLERS,
    SENSITIVITY_DEFAULTS,
    SENSITIVITY_KEYS,
    SPACE_KEYS,
    STUDY_KEYS,
    TOP_KEYS,
    Constraint,
    SamplerSpec,
    StudyFileError,
    StudySpec,
)


# --- parsing --------------------------------------------------------------------------------
def load_spec(path: str | Path, n_layers: int | None = None, storage: str | None = None) -> StudySpec:
    """Read and validate a study file; `storage` overrides the file's storage URL.

    `n_layers` overrides the model's layer count (normally from `engine.models.loaders.model_spec`).
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


def legal_devices() -> tuple[str, ...]:
    """The systems of the engine's device table (engine/data/devices.json): one source of truth."""
    from engine.vocab.devices import device_names

    return device_names()


def _model_layers(where: str, model: str, runs: Mapping[str, Mapping[str, int]] = {},  # noqa: B006 - read only
                  devices: Sequence[str] = ()) -> int:
    """The model's decoder-layer count from the engine's registry; unknown names list the legal ones.
    The weights must be readable, each of `runs` ([eval], [perf]) fit in the model's context, and
    tt_transformers must be able to lay the model out on each device (accuracy is per device)."""
    try:
        from engine.models import loaders
    except ImportError as exc:
        raise fail(where, f"cannot check study.model {model!r}: engine.models.loaders is unavailable ({exc})") from None
    try:
        spec = loaders.check_model_files(model)  # weights present and readable, not only config.json
    except Exception as exc:  # noqa: BLE001 - any lookup failure is an unknown model
        names = _model_names(loaders)
        if names and type(exc).__name__ == "UnknownModel":
            raise fail(where, f"unknown study.model {model!r}; legal values: {', '.join(names)} "
                               "(or a path to a .gguf file or a Hugging Face model directory)") from None
        legal = f"; registry names: {', '.join(names)}" if names and not isinstance(exc, ValueError) else ""
        raise fail(where, f"study.model {model!r} cannot be used ({type(exc).__name__}: {exc}){legal}") from None
    from engine.accuracy.evaluator import device_layout
    from engine.models.programs import Unsupported, check_tp

    for d in devices:
        try:
            check_tp(spec, device_layout(d)[0])
        except Unsupported as exc:
            raise fail(where, f"study.devices: {d}: {exc}") from None
        except ValueError:  # a layout whose accuracy is not emulated (TG): its cells use the primary's
            pass
    for table, run in runs.items():
        if run["prefill"] + run["decode"] > spec.max_seq:
            raise fail(where, f"{table}.prefill + {table}.decode = {run['prefill'] + run['decode']} tokens exceeds "
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
        raise fail(where, f"{key}: {name!r} is not an objective name")
    kind, sep, dev = name.partition(":")
    legal = legal_names(devices)
    if kind not in OBJECTIVES:
        raise fail(where, f"{key}: unknown objective {name!r}; legal values: {legal}")
    if OBJECTIVES[kind].per_device:
        if dev not in devices:
            raise fail(where, f"{key}: {name!r} names no device of the study; legal values: {legal}")
    elif sep:
        raise fail(where, f"{key}: {kind!r} takes no device; legal values: {legal}")
    return name


def parse_spec(doc: Mapping, where: str = "<study>", path: str | None = None, n_layers: int | None = None) -> StudySpec:
    """Validate a parsed study file (a dict shaped like the TOML) into a StudySpec."""
    check_keys(where, "", doc, TOP_KEYS)
    if "study" not in doc:
        raise fail(where, f"missing [study] table (keys: {', '.join(STUDY_KEYS)}; model is required)")
    st = check_keys(where, "study", doc["study"], STUDY_KEYS)
    model, name, description = _parse_study_names(where, st, path)
    devices = _parse_devices(where, st)
    objectives = _parse_objectives(where, st, devices)
    ev, pf = _parse_eval_perf(where, doc)
    sampler = _parse_sampler(where, doc.get("sampler", {}))
    constraints = _parse_constraints(where, doc.get("constraints", []), devices)
    storage = _parse_storage(where, st.get("storage"), name, path)

    if "space" not in doc:
        raise fail(where, f"missing [space] table: the search space is empty (legal keys: {', '.join(SPACE_KEYS)})")
    numerics = _parse_numerics(where, doc.get("numerics", {}))
    if n_layers is None:
        n_layers = _model_layers(where, model, {"eval": ev, "perf": pf}, devices)
    space, space_doc = parse_space(where, doc["space"], model, n_layers, sampler)
    sensitivity = _parse_sensitivity(where, doc["sensitivity"], model, n_layers) if "sensitivity" in doc else None

    return StudySpec(
        name=name, model=model, devices=devices, objectives=objectives, storage=storage, eval=ev, perf=pf,
        sampler=sampler, constraints=constraints, space=space, space_doc=space_doc, path=path,
        description=description, n_layers=n_layers, numerics=numerics, sensitivity=sensitivity,
    )


def _parse_study_names(where: str, st: dict, path: str | None) -> tuple[str, str, str]:
    """(model, name, description) of the [study] table."""
    if "model" not in st or not isinstance(st["model"], str) or not st["model"].strip():
        raise fail(where, "study.model is required: a model registry name such as 'smollm2-135m' or 'tiny-llama'")
    model = st["model"].strip()
    default_name = Path(path).stem if path else "study"
    name = st.get("name", default_name)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise fail(where, f"study.name {name!r} must be letters, digits, '_', '.', '-' (it names files)")
    description = st.get("description", "")
    if not isinstance(description, str):
        raise fail(where, "study.description must be a string")
    return model, name, description


def _parse_devices(where: str, st: dict) -> list[str]:
    """study.devices, spelled as the engine's device table spells them (default: N150)."""
    legal_dev = legal_devices()
    devices = str_list(where, "study.devices", st.get("devices", ["N150"]))
    if not devices:
        raise fail(where, f"study.devices is empty; legal values: {', '.join(legal_dev)}")
    norm_dev = []
    for d in devices:
        match = [x for x in legal_dev if x.lower() == d.strip().lower()]
        if not match:
            raise fail(where, f"study.devices: unknown device {d!r}; legal values: {', '.join(legal_dev)}")
        if match[0] in norm_dev:
            raise fail(where, f"study.devices: {match[0]} is listed twice")
        norm_dev.append(match[0])
    return norm_dev


def _parse_objectives(where: str, st: dict, devices: list[str]) -> list[str]:
    """study.objectives (default: sweep.objectives.default_objectives of the first device)."""
    objectives = st.get("objectives")
    if objectives is None:
        objectives = default_objectives(devices[0])
    objectives = [_metric(where, "study.objectives", o, devices) for o in str_list(where, "study.objectives", objectives)]
    if not objectives:
        raise fail(where, f"study.objectives is empty; legal values: {legal_names(scalar_first=False)}")
    if len(set(objectives)) != len(objectives):
        raise fail(where, f"study.objectives lists an objective twice: {objectives}")
    return objectives


def _parse_eval_perf(where: str, doc: Mapping) -> tuple[dict, dict]:
    """The [eval] and [perf] tables over their defaults."""
    ev = dict(EVAL_DEFAULTS)
    for k, v in check_keys(where, "eval", doc.get("eval", {}), EVAL_KEYS).items():
        ev[k] = as_int(where, f"eval.{k}", v)
    if ev["windows"] > MAX_WINDOWS:
        raise fail(where, f"eval.windows must be <= {MAX_WINDOWS}, not {ev['windows']}")
    pf = dict(PERF_DEFAULTS)
    for k, v in check_keys(where, "perf", doc.get("perf", {}), PERF_KEYS).items():
        pf[k] = as_int(where, f"perf.{k}", v)
    return ev, pf


def _parse_constraints(where: str, raw_c: Any, devices: list[str]) -> list[Constraint]:
    """[[constraints]]: metric with min and/or max."""
    if isinstance(raw_c, dict):
        raw_c = [raw_c]
    if not isinstance(raw_c, list):
        raise fail(where, "constraints must be [[constraints]] tables with metric and min and/or max")
    constraints = []
    for i, c in enumerate(raw_c):
        c = check_keys(where, f"constraints[{i}]", c, CONSTRAINT_KEYS)
        if "metric" not in c:
            raise fail(where, f"constraints[{i}] needs metric ({legal_names(('DEV',))})")
        metric = _metric(where, f"constraints[{i}].metric", c["metric"], devices)
        bounds = {}
        for b in ("min", "max"):
            if b in c:
                if isinstance(c[b], bool) or not isinstance(c[b], (int, float)):
                    raise fail(where, f"constraints[{i}].{b} must be a number, not {c[b]!r}")
                bounds[b] = float(c[b])
        if not bounds:
            raise fail(where, f"constraints[{i}] ({metric}) needs min and/or max")
        constraints.append(Constraint(metric, bounds.get("min"), bounds.get("max")))
    return constraints


def _parse_sensitivity(where: str, d: Any, model: str, n_layers: int) -> dict:
    """[sensitivity]: base config, short window, families (names; [sensitivity.choices] overrides a
    family's choices), layers. Checked by building the probe space once."""
    d = check_keys(where, "sensitivity", d, SENSITIVITY_KEYS)
    out: dict[str, Any] = {"base": d.get("base", "defaults")}
    for k, v in SENSITIVITY_DEFAULTS.items():
        out[k] = as_int(where, f"sensitivity.{k}", d.get(k, v))
    fams = d.get("families", list(DEFAULT_FAMILIES))
    if isinstance(fams, dict):  # the normalised form (a stored spec): {family: [choices]}
        names, choices = list(fams), check_keys(where, "sensitivity.families", fams, tuple(FAMILIES))
    else:
        names = str_list(where, "sensitivity.families", fams)
        choices = check_keys(where, "sensitivity.choices", d.get("choices", {}), tuple(FAMILIES))
    for k in choices:
        if k not in names:
            raise fail(where, f"sensitivity.choices.{k}: family {k!r} is not in sensitivity.families ({', '.join(names)})")
    out["families"] = {n: choices.get(n, FAMILIES[n].choices if n in FAMILIES else []) for n in names}
    if "layers" in d:
        out["layers"] = d["layers"]
    try:
        _, doc = parse_probes(out, model, n_layers)
    except ConfigError as exc:
        raise fail(where, f"[sensitivity]: {exc}") from None
    return out | doc


def _parse_numerics(where: str, d: Any) -> dict:
    """[numerics]: `silu = "sfpu-piecewise" | "exact"`, `lm_head = ["bfp8", "hifi2fp16"]`,
    `tt_metal = "seed" | "current"` (engine.vocab.profiles)."""
    from engine.vocab import fidelity
    from engine.vocab.config import lm_head_of

    d = check_keys(where, "numerics", d, NUMERICS_KEYS)
    out: dict[str, Any] = {}
    if "silu" in d:
        if d["silu"] not in fidelity.SILU_MODES:
            raise fail(where, f"numerics.silu {d['silu']!r}; legal values: {', '.join(fidelity.SILU_MODES)}")
        out["silu"] = d["silu"]
    if "tt_metal" in d:
        from engine.vocab.profiles import PROFILES

        if d["tt_metal"] not in PROFILES:
            raise fail(where, f"numerics.tt_metal {d['tt_metal']!r}; legal values: {', '.join(PROFILES)}")
        out["tt_metal"] = d["tt_metal"]
    if "lm_head" in d:
        v = d["lm_head"]
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)):
            raise fail(where, f"numerics.lm_head {v!r} must be [FORMAT, FIDELITY], e.g. [\"bfp8\", \"hifi2fp16\"]")
        try:
            out["lm_head"] = list(lm_head_of(*v))
        except ConfigError as exc:
            raise fail(where, f"numerics.lm_head: {exc}") from None
    return out


def _parse_sampler(where: str, d: Any) -> SamplerSpec:
    if not isinstance(d, dict):
        raise fail(where, "[sampler] must be a table with kind = grid | nsga2 | tpe | gp")
    kind = d.get("kind", "grid")
    if kind not in SAMPLERS:
        raise fail(where, f"sampler.kind: unknown value {kind!r}; legal values: {', '.join(SAMPLERS)}")
    legal = SAMPLER_KEYS[kind]
    for k in d:
        if k not in legal:
            other = [s for s in SAMPLERS if k in SAMPLER_KEYS[s]]
            hint = f" ({k} is for {', '.join(other)})" if other else ""
            raise fail(where, f"unknown key 'sampler.{k}' for kind = {kind!r}{hint}; legal keys: {', '.join(legal)}")
    if kind == "grid":
        return SamplerSpec("grid")
    if "n_trials" not in d:
        raise fail(where, f"sampler.n_trials is required for kind = {kind!r} (the trial budget)")
    out = SamplerSpec(
        kind=kind,
        n_trials=as_int(where, "sampler.n_trials", d["n_trials"]),
        seed=as_int(where, "sampler.seed", d.get("seed", 0), lo=0),
        population=as_int(where, "sampler.population", d.get("population", 50), lo=2),
        n_startup=as_int(where, "sampler.n_startup", d.get("n_startup", 10), lo=1),
    )
    if kind in ("tpe", "gp") and out.n_startup >= out.n_trials:
        given = "" if "n_startup" in d else " (the default)"
        raise fail(where, f"sampler.n_startup = {out.n_startup}{given} >= n_trials = {out.n_trials}: every trial would be "
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
        raise fail(where, f"study.storage must be a string URL, not {url!r}")
    url = url.strip()
    if url.startswith("journal:"):
        rest = url[len("journal:"):]
        if rest.startswith("//"):  # journal:///abs/path
            rest = rest[2:]
        if not rest:
            raise fail(where, "study.storage: journal: needs a file path, e.g. journal:.runs/study.log")
        p = Path(rest).expanduser()
        return f"journal:{p if p.is_absolute() else (folder / p).resolve()}"
    if re.match(r"^[a-z][a-z0-9+]*://", url):
        return canonical_storage_url(url)
    raise fail(where, f"study.storage {url!r} is not a storage URL; legal forms: journal:PATH, sqlite:///PATH, "
                       "postgresql://..., mysql://... (any Optuna/SQLAlchemy URL)")


def spec_from_dict(d: Mapping, n_layers: int | None = None) -> StudySpec:
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


def sensitivity_study(spec: StudySpec) -> StudySpec:
    """The study that measures this study's sensitivity profile: `<name>.sensitivity` in the same
    storage, every probe of [sensitivity] (sweep.probes) on its short window, a grid."""
    if not spec.sensitivity:
        raise StudyFileError(f"{spec.path or spec.name}: no [sensitivity] section; add one (base, prefill, decode, "
                             "families) to profile this study's model")
    s = spec.sensitivity
    doc = {
        "study": {"name": f"{spec.name}.sensitivity", "model": spec.model, "devices": spec.devices,
                  "objectives": spec.objectives, "storage": spec.storage,
                  "description": f"sensitivity profile of {spec.name}"},
        "eval": {"prefill": s["prefill"], "decode": s["decode"]},
        "perf": spec.perf,
        "sampler": {"kind": "grid"},
        "space": {"probes": {k: s[k] for k in ("base", "families", "layers") if k in s}},
        "numerics": spec.numerics,
    }
    return parse_spec(doc, where=f"{spec.path or spec.name} [sensitivity]", path=spec.path, n_layers=spec.n_layers)
