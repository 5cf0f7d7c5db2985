"""The [space] table of a study file -> the search `Space`: probes (a sensitivity study), an explicit
list of configs, or the product of group values (coupling, natural fidelities, per-layer params)."""
from __future__ import annotations

from typing import Any, Sequence

from engine.vocab.config import (
    FIELD_NAMES,
    NATURAL,
    Config,
    ConfigError,
    ModelConfig,
    Precision,
    fidelity_of,
    resolve,
)
from sweep.param import Param
from sweep.probes import parse_probes
from sweep.space.checks import as_int, check_keys, fail, str_list
from sweep.space.model import (
    LAYERS_KEYS,
    MAX_GRID,
    OP_FIELDS,
    SPACE_KEYS,
    TENSOR_FIELDS,
    WEIGHT_COUPLING,
    SamplerSpec,
    Space,
    canonical_value,
    legal_values,
)


def _value_list(where: str, key: str, v: Any) -> list[str]:
    if isinstance(v, str):
        vals = [v]
    elif isinstance(v, list) and all(isinstance(x, str) for x in v):
        vals = list(v)
    else:
        raise fail(where, f"space.{key} must be a value or a list of values; legal values: {', '.join(legal_values(key))}")
    if not vals:
        raise fail(where, f"space.{key} is an empty list: the space is empty; legal values: {', '.join(legal_values(key))}")
    out = []
    for x in vals:
        try:
            c = canonical_value(key, x)
        except ConfigError:
            raise fail(where, f"space.{key}: unknown value {x!r}; legal values: {', '.join(legal_values(key))}") from None
        if c not in out:
            out.append(c)
    return out


def parse_space(where: str, d: Any, model: str, n_layers: int, sampler: SamplerSpec) -> tuple[Space, dict]:
    d = check_keys(where, "space", d, SPACE_KEYS)
    if "probes" in d:  # a sensitivity study (StudySpec.sensitivity_study): the base and its probes
        if len(d) > 1:
            raise fail(where, "space.probes cannot be combined with other space keys")
        try:
            probes, probes_doc = parse_probes(d["probes"], model, n_layers)
            return probes, {"probes": probes_doc}
        except ConfigError as exc:
            raise fail(where, f"space.probes: {exc}") from None
    base_text = d.get("base", "defaults")
    if not isinstance(base_text, str):
        raise fail(where, "space.base must be a preset name (defaults, performance, accuracy) or a config string")
    try:
        base_mc = ModelConfig.parse(base_text, n_layers, model)
    except ConfigError as exc:
        raise fail(where, f"space.base: {exc}; legal: defaults, performance, accuracy or a config string") from None

    groups = {k: _value_list(where, k, d[k]) for k in FIELD_NAMES if k in d}
    doc: dict[str, Any] = {"base": base_text}
    if "configs" in d:
        return _configs_space(where, d, groups, model, n_layers, sampler, base_mc, doc)
    return _product_space(where, d, groups, n_layers, sampler, base_mc, doc)


def _configs_space(where: str, d: dict, groups: dict, model: str, n_layers: int, sampler: SamplerSpec,
                   base_mc: ModelConfig, doc: dict) -> tuple[Space, dict]:
    """space.configs: a grid over explicit configs (diffs over the base, presets or per-layer configs)."""
    extra = [k for k in ("couple", "natural", "layers") if k in d] + list(groups)
    if extra:
        raise fail(where, f"space.configs cannot be combined with space.{extra[0]}: list whole configs (diffs over base) instead")
    if sampler.kind != "grid":
        raise fail(where, f"space.configs needs sampler.kind = 'grid' (got {sampler.kind!r}); for other samplers give group values")
    raw = d["configs"]
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise fail(where, "space.configs must be a list of config strings")
    if not raw:
        raise fail(where, "space.configs is empty: the space is empty")
    if not base_mc.is_uniform:
        raise fail(where, "space.base must be uniform (no '; decoders = ...') when space.configs is given")
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
            raise fail(where, f"space.configs[{i}]: {exc}") from None
        if mc in configs:
            raise fail(where, f"space.configs[{i}] repeats space.configs[{configs.index(mc)}] ({text!r})")
        configs.append(mc)
    space = _explicit_space(n_layers, configs)
    doc["configs"] = list(raw)
    return space, doc


def _product_space(where: str, d: dict, groups: dict, n_layers: int, sampler: SamplerSpec, base_mc: ModelConfig,
                   doc: dict) -> tuple[Space, dict]:
    """The product of group values: fixed values go into the base; lists of 2+ values become params."""
    couple = _parse_couple(where, d, doc)
    natural = _parse_natural(where, d, doc)
    coupled_ops = {op: g for g, ops in couple.items() for op in ops}
    for k in groups:
        if k in coupled_ops:
            raise fail(where, f"space.{k} is coupled to space.{coupled_ops[k]} (space.couple); remove one of them")

    fixed = {k: v[0] for k, v in groups.items() if len(v) == 1}
    free = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        raise fail(where, f"[space] is empty: give values for at least one group or a configs list; legal keys: {', '.join(SPACE_KEYS)}")
    try:
        base_mc = ModelConfig(tuple(c.replace(**fixed) for c in base_mc.layers))
    except ConfigError as exc:
        raise fail(where, f"[space]: {exc}") from None

    for g in couple:  # every value a coupled group can take needs a natural fidelity
        vals = set(free.get(g, [])) | {dict(c.items())[g] for c in base_mc.layers}
        for v in sorted(vals):
            if v not in natural:
                raise fail(where, f"space.couple.{g}: precision {v!r} has no natural fidelity; add it to [space.natural] "
                                   f"(legal keys: {', '.join(p.value for p in Precision)})")

    first, last, layer_groups = _parse_layers(where, d, free, doc)
    params = _product_params(n_layers, free, first, last, layer_groups)
    for k in FIELD_NAMES:
        if k in groups:
            doc[k] = groups[k]
    space = Space(n_layers, base_mc, params, couple, natural)
    if sampler.kind == "grid" and space.size > MAX_GRID:
        raise fail(where, f"[space] has {space.size} configs, too many for kind = 'grid' (at most {MAX_GRID}); "
                           "use sampler.kind = nsga2, tpe or gp with n_trials, or fewer values")
    return space, doc


def _parse_couple(where: str, d: dict, doc: dict) -> dict[str, tuple[str, ...]]:
    """space.couple: weight group -> the op groups whose fidelity follows its precision."""
    couple: dict[str, tuple[str, ...]] = {}
    if "couple" not in d:
        return couple
    c = d["couple"]
    if c == "weights":
        couple = dict(WEIGHT_COUPLING)
    elif isinstance(c, dict):
        for g, ops in c.items():
            if g not in TENSOR_FIELDS or g == "activation":
                legal = [x for x in TENSOR_FIELDS if x != "activation"]
                raise fail(where, f"space.couple: unknown weight group {g!r}; legal keys: {', '.join(legal)}")
            ops = str_list(where, f"space.couple.{g}", ops)
            for op in ops:
                if op not in OP_FIELDS:
                    raise fail(where, f"space.couple.{g}: unknown op group {op!r}; legal values: {', '.join(OP_FIELDS)}")
                if any(op in v for v in couple.values()):
                    raise fail(where, f"space.couple: op group {op!r} is coupled twice")
            if not ops:
                raise fail(where, f"space.couple.{g} lists no op group; legal values: {', '.join(OP_FIELDS)}")
            couple[g] = tuple(ops)
    else:
        raise fail(where, "space.couple must be \"weights\" or a table {weight_group = op_group or [op_groups]}")
    doc["couple"] = {g: list(v) for g, v in couple.items()}
    return couple


def _parse_natural(where: str, d: dict, doc: dict) -> dict[str, str]:
    """space.natural: the natural fidelity of each precision (engine.vocab.config.NATURAL, overridden)."""
    natural = dict(NATURAL)
    if "natural" in d:
        nat = check_keys(where, "space.natural", d["natural"], tuple(p.value for p in Precision))
        for k, v in nat.items():
            if not isinstance(v, str):
                raise fail(where, f"space.natural.{k} must be a fidelity name; legal values: {', '.join(legal_values('li_ff2'))}")
            try:
                natural[k] = fidelity_of(v).value
            except ConfigError:
                raise fail(where, f"space.natural.{k}: unknown value {v!r}; legal values: {', '.join(legal_values('li_ff2'))}") from None
        doc["natural"] = dict(natural)
    return natural


def _parse_layers(where: str, d: dict, free: dict, doc: dict) -> tuple[int, int, list[str]]:
    """space.layers: (first, last, groups): the first / last layers that get their own params."""
    layer_groups: list[str] = []
    first = last = 0
    if "layers" in d:
        ly = check_keys(where, "space.layers", d["layers"], LAYERS_KEYS)
        first = as_int(where, "space.layers.first", ly.get("first", 0), lo=0)
        last = as_int(where, "space.layers.last", ly.get("last", 0), lo=0)
        if first + last == 0:
            raise fail(where, "space.layers needs first and/or last >= 1 (how many layers get their own parameters)")
        layer_groups = str_list(where, "space.layers.groups", ly.get("groups", list(free)))
        for g in layer_groups:
            if g not in free:
                legal = ", ".join(free) or "(none: no group has a list of values)"
                raise fail(where, f"space.layers.groups: {g!r} is not a group with a list of values; legal values: {legal}")
        if not layer_groups:
            raise fail(where, "space.layers.groups is empty; name groups that have a list of values")
        doc["layers"] = {"first": first, "last": last, "groups": list(layer_groups)}
    return first, last, layer_groups


def _product_params(n_layers: int, free: dict, first: int, last: int, layer_groups: list[str]) -> list[Param]:
    """One param per free group (over the layers without their own), then one per own layer and group."""
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
    return params


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
