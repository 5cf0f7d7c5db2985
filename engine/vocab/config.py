"""Precision / fidelity configuration: the tt-metal vocabulary, config strings, presets, decoder JSON.

The enums carry tt-metal's exact values (docs/NUMERICS.md), so `str(Config)` is the
seed's section header character for character and `Config.parse` reads it back. Two emulator-only
values extend the vocabulary: precision `fp32` and fidelity `exact` (plain fp32 math), used for the
reference path, and `hifi3` (3 phases) which the hardware has but no named setting uses.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable, Mapping

from engine.vocab import fidelity, formats, ops


class ConfigError(ValueError):
    """A config string, name or file that cannot be understood; the message names the fix."""


class TensorGroup(Enum):
    FF1_FF3 = "ff1_3"
    FF2 = "ff2"
    WQKV = "wqkv"
    WO = "wo"
    KV_CACHE = "kv_cache"
    ACTIVATION = "activation"


class Precision(Enum):
    """A tensor group's format; the facts (bytes, fraction bits, tt-metal or not) are the
    `engine.numerics.formats.FORMATS` record that `.format` returns."""

    BFP4 = "bfp4"
    BFP8 = "bfp8"
    BF16 = "bf16"
    FP32 = "fp32"  # emulator only: no rounding (reference path)

    @property
    def format(self) -> formats.Format:
        return formats.FORMATS[self.value]


class OpGroup(Enum):
    LI_FF1_FF3 = "li_ff1_3"
    LI_FF2 = "li_ff2"
    LI_QKV_DECODE = "li_qkv_decode"
    LI_O_DECODE = "li_o_decode"
    SDPA_DECODE = "sdpa_decode"
    LI_QKV_PREFILL = "li_qkv_prefill"
    LI_O_PREFILL = "li_o_prefill"
    SDPA_PREFILL = "sdpa_prefill"


class FidelitySetting(Enum):
    LOFI = "lofi"
    HIFI2 = "hifi2"
    HIFI2_NA = "hifi2na"
    HIFI2_FP16 = "hifi2fp16"
    HIFI3 = "hifi3"  # sweep extension: 3 phases, fp32 dest, packer L1 acc
    HIFI4 = "hifi4"
    HIFI4_FP32 = "hifi4fp32"
    EXACT = "exact"  # emulator only: plain fp32 matmul and exp (reference path)

    @property
    def kernel(self) -> fidelity.Fidelity:
        """The compute-kernel record (phases, approx, fp32 dest, packer L1 acc): engine.numerics.fidelity.SETTINGS."""
        return fidelity.SETTINGS[self.value].kernel


#: Natural fidelity of each weight precision (the seed's pairing: bfp4+LoFi, bfp8+HiFi2, bf16+HiFi4).
NATURAL = {"bfp4": "lofi", "bfp8": "hifi2", "bf16": "hifi4"}
#: The op groups (linears) that read each weight group: what "natural fidelity" couples.
#: Derived from the op table (engine.vocab.ops), in the enums' order.
WEIGHT_READERS = {
    g.value: tuple(op.value for op in OpGroup if ops.OPS[op.value].weight == g.value)
    for g in TensorGroup if g.value in ops.WEIGHT_OPS and g is not TensorGroup.KV_CACHE
}

#: Values that exist in tt-metal and may appear in an exported decoder JSON (from the records).
TT_PRECISIONS = tuple(p for p in Precision if p.format.tt_metal)
TT_FIDELITIES = tuple(f for f in FidelitySetting if fidelity.SETTINGS[f.value].tt_metal)

MIXED = "mixed"

#: The LM head: a model-level setting outside the config vocabulary (tt/lm_head.py): bfp8 weights,
#: HiFi2 with a 16-bit dest and packer L1 acc (`hifi2fp16`), bfp8 logits. A study may override it.
LM_HEAD = ("bfp8", "hifi2fp16")


def lm_head_of(fmt: str, setting: str) -> tuple[str, str]:
    """An LM head (weight format, fidelity setting) checked against the format and setting tables."""
    if fmt not in formats.FORMATS:
        raise ConfigError(f"unknown LM head format {fmt!r}; legal formats: {', '.join(formats.FORMATS)}")
    return fmt, fidelity_of(setting).value


def _legal(enum_cls: type[Enum], extra: Iterable[str] = ()) -> str:
    return ", ".join([m.value for m in enum_cls] + list(extra))


def _lookup(enum_cls: type[Enum], token: str, what: str):
    """Find an enum member by value or member name, case-insensitively."""
    t = token.strip()
    for m in enum_cls:
        if t.lower() == m.value or t.upper() == m.name:
            return m
    raise ConfigError(f"unknown {what} {t!r}; legal values: {_legal(enum_cls)}")


def precision_of(token: str | Precision | None, group: TensorGroup) -> Precision | None:
    """Parse one precision value for `group`; `mixed` (None) is legal only for activation."""
    if token is None or isinstance(token, Precision):
        p = token
    elif token.strip().lower() == MIXED:
        p = None
    else:
        p = _lookup(Precision, token, f"precision for {group.value}")
    if p is None and group is not TensorGroup.ACTIVATION:
        raise ConfigError(
            f"'mixed' is legal only for activation, not {group.value}; legal values: {_legal(Precision)}"
        )
    return p


def fidelity_of(token: str | FidelitySetting) -> FidelitySetting:
    return token if isinstance(token, FidelitySetting) else _lookup(FidelitySetting, token, "fidelity setting")


@dataclass(frozen=True)
class Config:
    """One decoder layer's numerics: a precision per tensor group, a fidelity per op group.

    Field names are the enum values, so `getattr(cfg, group.value)` works for either kind of group.
    The defaults are the seed-era tt-metal defaults (docs/NUMERICS.md).
    """

    ff1_3: Precision = Precision.BFP8
    ff2: Precision = Precision.BFP8
    wqkv: Precision = Precision.BFP8
    wo: Precision = Precision.BFP8
    kv_cache: Precision = Precision.BFP8
    activation: Precision | None = None  # None = mixed
    li_ff1_3: FidelitySetting = FidelitySetting.HIFI2
    li_ff2: FidelitySetting = FidelitySetting.HIFI2
    li_qkv_decode: FidelitySetting = FidelitySetting.HIFI2
    li_o_decode: FidelitySetting = FidelitySetting.HIFI2
    sdpa_decode: FidelitySetting = FidelitySetting.HIFI2_NA
    li_qkv_prefill: FidelitySetting = FidelitySetting.HIFI2
    li_o_prefill: FidelitySetting = FidelitySetting.HIFI2_FP16
    sdpa_prefill: FidelitySetting = FidelitySetting.HIFI4

    def __post_init__(self) -> None:
        for g in TensorGroup:  # validate and coerce strings so Config(ff1_3="bfp4") works
            object.__setattr__(self, g.value, precision_of(getattr(self, g.value), g))
        for op in OpGroup:
            object.__setattr__(self, op.value, fidelity_of(getattr(self, op.value)))

    # --- access -------------------------------------------------------------------------
    def precision(self, group: TensorGroup) -> Precision | None:
        return getattr(self, group.value)

    def fidelity(self, op: OpGroup) -> FidelitySetting:
        return getattr(self, op.value)

    def replace(self, **changes) -> "Config":
        """A copy with some groups changed; keys are group values (`ff1_3=...`, `li_ff2=...`)."""
        unknown = set(changes) - set(FIELD_NAMES)
        if unknown:
            raise ConfigError(f"unknown config key {sorted(unknown)[0]!r}; legal keys: {', '.join(FIELD_NAMES)}")
        return dataclasses.replace(self, **changes)

    def items(self) -> list[tuple[str, str]]:
        """(key, value-string) for every group in enum order, `mixed` for a None activation."""
        out = [(g.value, p.value if (p := self.precision(g)) else MIXED) for g in TensorGroup]
        return out + [(op.value, self.fidelity(op).value) for op in OpGroup]

    # --- strings ------------------------------------------------------------------------
    def __str__(self) -> str:
        """The seed's section header: `precision_cfg = {...}, fidelity_cfg = {...}`."""
        items = self.items()
        n = len(TensorGroup)
        prec = ", ".join(f"{k}: {v}" for k, v in items[:n])
        fid = ", ".join(f"{k}: {v}" for k, v in items[n:])
        return f"precision_cfg = {{{prec}}}, fidelity_cfg = {{{fid}}}"

    def diff(self, base: "Config | None" = None) -> str:
        """Only the keys that differ from `base` (default: seed defaults), in config-string form."""
        base = base or DEFAULT
        parts = {"precision_cfg": [], "fidelity_cfg": []}
        n = len(TensorGroup)
        for i, ((k, v), (_, bv)) in enumerate(zip(self.items(), base.items())):
            if v != bv:
                parts["precision_cfg" if i < n else "fidelity_cfg"].append(f"{k}: {v}")
        return ", ".join(f"{name} = {{{', '.join(kv)}}}" for name, kv in parts.items() if kv) or "defaults"

    @classmethod
    def parse(cls, text: str, base: "Config | None" = None) -> "Config":
        """Parse a full or partial config string; missing keys come from `base` (default: seed defaults).

        Accepts the header form `precision_cfg = {k: v, ...}, fidelity_cfg = {k: v, ...}` (either part
        optional) or a flat list `k: v, k=v`. Keys and values are checked; errors name the bad token.
        """
        base = base or DEFAULT
        text = text.strip()
        if not text or text.lower() == "defaults":
            return base
        blocks = re.findall(r"(\w+)\s*=\s*\{([^{}]*)\}", text)
        if blocks:
            leftover = re.sub(r"(\w+)\s*=\s*\{([^{}]*)\}", "", text).strip(" ,")
            if leftover:
                raise ConfigError(f"cannot parse {leftover!r} in config string; expected precision_cfg = {{...}}, fidelity_cfg = {{...}}")
            pairs = []
            for name, body in blocks:
                if name not in ("precision_cfg", "fidelity_cfg"):
                    raise ConfigError(f"unknown section {name!r} in config string; legal: precision_cfg, fidelity_cfg")
                allowed = TensorGroup if name == "precision_cfg" else OpGroup
                for key, val in _pairs(body):
                    if key.lower() not in {m.value for m in allowed} and key.upper() not in allowed.__members__:
                        raise ConfigError(f"unknown {name} key {key!r}; legal keys: {_legal(allowed)}")
                    pairs.append((key, val))
        else:
            if "{" in text or "}" in text:
                raise ConfigError(f"unbalanced braces in config string {text!r}")
            pairs = _pairs(text)
        changes: dict[str, object] = {}
        for key, val in pairs:
            field = _field_for(key)
            if field in changes:
                raise ConfigError(f"config key {field!r} given twice in {text!r}")
            group = _GROUP_BY_FIELD[field]
            changes[field] = precision_of(val, group) if isinstance(group, TensorGroup) else fidelity_of(val)
        return dataclasses.replace(base, **changes)

    # --- tt-metal decoder JSON ------------------------------------------------------------
    def to_tt(self) -> dict:
        """This config as one tt-metal decoder entry (enum member NAMES); `mixed` activation is omitted."""
        prec, fid = {}, {}
        for g in TensorGroup:
            p = self.precision(g)
            if p is None:
                continue
            if p not in TT_PRECISIONS:
                raise ConfigError(f"{g.value}: {p.value} has no tt-metal equivalent; use one of bfp4, bfp8, bf16")
            prec[g.name] = p.name
        for op in OpGroup:
            f = self.fidelity(op)
            if f not in TT_FIDELITIES:
                raise ConfigError(
                    f"{op.value}: {f.value} has no tt-metal setting; use one of {', '.join(x.value for x in TT_FIDELITIES)}"
                )
            fid[op.name] = f.name
        return {"precision_cfg": prec, "fidelity_cfg": fid}

    @classmethod
    def from_tt(cls, entry: Mapping, base: "Config | None" = None) -> "Config":
        """Read one tt-metal decoder entry as tt_transformers' parse_decoder_json does: member NAMES
        (`PrecisionSetting[value]`, so `BFP4`, never `bfp4`); a given `precision_cfg` / `fidelity_cfg`
        dict starts from the DEFAULTS (so `{}` means the defaults), a missing one keeps `base`."""
        base = base or DEFAULT
        if not isinstance(entry, Mapping):
            raise ConfigError(f"a decoder entry must be an object {{\"precision_cfg\": {{...}}, \"fidelity_cfg\": {{...}}}}, "
                              f"not {json.dumps(entry)}")
        unknown = sorted(set(entry) - {"precision_cfg", "fidelity_cfg"})
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in a decoder entry; legal: precision_cfg, fidelity_cfg")
        changes: dict[str, object] = {}
        for part, groups, legal in (("precision_cfg", TensorGroup, TT_PRECISIONS), ("fidelity_cfg", OpGroup, TT_FIDELITIES)):
            if part not in entry:
                continue
            if not isinstance(entry[part], Mapping):
                raise ConfigError(f"{part} must be an object such as {{\"{next(iter(groups)).name}\": \"{legal[0].name}\"}}, "
                                  f"not {json.dumps(entry[part])}")
            changes.update({g.value: getattr(DEFAULT, g.value) for g in groups})
            names = {m.name: m for m in legal}
            for name, val in entry[part].items():
                if name not in groups.__members__:
                    raise ConfigError(f"unknown {part} key {name!r} in decoder JSON; legal: {', '.join(groups.__members__)}")
                if not isinstance(val, str) or val not in names:
                    hint = " (omit ACTIVATION for mixed)" if name == "ACTIVATION" else ""
                    raise ConfigError(f"unknown {part} value {json.dumps(val)} for {name} in decoder JSON; legal "
                                      f"(tt-metal member names): {', '.join(names)}{hint}")
                changes[groups[name].value] = names[val]
        return dataclasses.replace(base, **changes)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Config))
_GROUP_BY_FIELD: dict[str, TensorGroup | OpGroup] = {g.value: g for g in TensorGroup} | {o.value: o for o in OpGroup}
DEFAULT = Config()


def _pairs(body: str) -> list[tuple[str, str]]:
    out = []
    for chunk in body.split(","):
        if not chunk.strip():
            continue
        m = re.fullmatch(r"\s*([\w.]+)\s*[:=]\s*([\w.]+)\s*", chunk)
        if not m:
            raise ConfigError(f"cannot parse {chunk.strip()!r}; expected 'key: value' such as 'ff1_3: bfp4'")
        out.append((m.group(1), m.group(2)))
    return out


def _field_for(key: str) -> str:
    k = key.strip()
    if k.lower() in _GROUP_BY_FIELD:
        return k.lower()
    for g in list(TensorGroup) + list(OpGroup):
        if k.upper() == g.name:
            return g.value
    raise ConfigError(f"unknown config key {k!r}; legal keys: {', '.join(FIELD_NAMES)}")


# --- presets -------------------------------------------------------------------------------
def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BF16_ATTENTION = dict(
    wqkv=Precision.BF16, wo=Precision.BF16, kv_cache=Precision.BF16,
    li_qkv_decode=FidelitySetting.HIFI4, li_qkv_prefill=FidelitySetting.HIFI4,
    sdpa_decode=FidelitySetting.HIFI4, sdpa_prefill=FidelitySetting.HIFI4,
    li_o_decode=FidelitySetting.HIFI4, li_o_prefill=FidelitySetting.HIFI4,
)
_BFP4_MLP = dict(ff1_3=Precision.BFP4, li_ff1_3=FidelitySetting.LOFI)


#: tt_transformers' ModelOptimizations.accuracy list, matched by exact base name (not substring):
#: Llama-3.3-70B, say, is not in it.
_70B_CLASS = ("Llama-3.1-70B", "Llama-3.2-90B", "DeepSeek-R1-Distill-Llama-70B", "Qwen2.5-72B")


def base_model_name(model_name: str) -> str:
    """`get_base_model_name`, normalised: the name up to its size (`...-70B`), without suffixes such
    as -Instruct or -Vision, lower-case alphanumerics only (Llama3.1-70B == Llama-3.1-70B-Instruct)."""
    n = _norm(model_name)
    m = re.match(r"(.*?\d+b)", n)
    return m.group(1) if m else n


def is_70b_class(model_name: str) -> bool:
    return base_model_name(model_name) in {_norm(n) for n in _70B_CLASS}


def _phi3_mini(model_name: str) -> dict:
    """Phi-3-mini runs its prefill qkv at hifi2fp16 in both presets (model_config.py)."""
    return {"li_qkv_prefill": FidelitySetting.HIFI2_FP16} if _norm(model_name).startswith("phi3mini") else {}


def performance(model_name: str) -> Config:
    """tt-metal's `performance` preset: bfp4 FF1/FF3 + LoFi, except Qwen2.5-7B (bf16 attention, hifi4)."""
    if base_model_name(model_name) == "qwen257b":
        return DEFAULT.replace(**_BF16_ATTENTION)
    return DEFAULT.replace(**_BFP4_MLP, **_phi3_mini(model_name))


def accuracy(model_name: str) -> Config:
    """tt-metal's `accuracy` preset: defaults + hifi2fp16 MLP for Llama 3.x / Mistral-7B / Phi-3-mini,
    bfp4 MLP for 70B-class models, bf16 attention with hifi4 for every other model."""
    n = _norm(model_name)
    if is_70b_class(model_name):
        return DEFAULT.replace(**_BFP4_MLP)
    if n.startswith(("llama3", "mistral7b", "phi3mini")):
        return DEFAULT.replace(li_ff1_3=FidelitySetting.HIFI2_FP16, li_ff2=FidelitySetting.HIFI2_FP16, **_phi3_mini(model_name))
    return DEFAULT.replace(**_BF16_ATTENTION)


PRESETS = {"performance": performance, "accuracy": accuracy}


def decoder_preset(preset: str, model_name: str) -> dict | None:
    """The per-layer decoder JSON tt_transformers ships for this model and preset, or None
    (engine/data/decoder_presets.json, keyed by the model_params directory name, matched exactly)."""
    from importlib.resources import files

    table = json.loads(files("engine").joinpath("data/decoder_presets.json").read_text())
    for name, presets in table.items():
        if not name.startswith("_") and _norm(name) == _norm(model_name) and preset in presets:
            return presets[preset]
    return None

#: Every group in fp32 with exact math: the engine then matches the fp32 reference model.
REFERENCE = Config(
    **{g.value: Precision.FP32 for g in TensorGroup}, **{op.value: FidelitySetting.EXACT for op in OpGroup}
)


#: Every name `resolve` accepts instead of a config string.
PRESET_NAMES = (*PRESETS, "reference", "defaults")

#: What tt_transformers' parse_decoder_json gives a layer its file does not list (and a listed layer
#: whose entry lacks precision_cfg / fidelity_cfg): its default_optimization,
#: `ModelOptimizations.performance`, called with the placeholder model name "model".
DECODER_JSON_BASE = performance("model")


def decoder_json_file(text: str) -> Path | None:
    """The decoder JSON file a `--config` value names, or None for a preset or config string: text
    ending in `.json` (any case; it need not exist, so a missing file is reported as one), or naming
    an existing file or folder (reported as no file). Preset names are never paths, whatever files
    the working folder holds."""
    t = text.strip()
    if not t or t.lower() in PRESET_NAMES:
        return None
    path = Path(t).expanduser()
    if t.lower().endswith(".json"):
        return path
    try:
        return path if path.exists() else None
    except OSError:  # e.g. a long config string is no valid file name
        return None


def resolve(text: str, model_name: str = "") -> Config:
    """A preset name (`performance`, `accuracy`, `reference`, `defaults`) or a config string.

    An empty string or a lone word that is no preset is refused (naming the presets and the
    closest one), never read as the defaults."""
    key = text.strip().lower()
    if key in PRESETS:
        return PRESETS[key](model_name)
    if key == "reference":
        return REFERENCE
    if key == "defaults":
        return DEFAULT
    if not key:
        raise ConfigError(f"empty config; give a preset ({', '.join(PRESET_NAMES)}) or a config string such as 'ff1_3: bfp4'")
    if re.fullmatch(r"[\w.-]+", key):
        import difflib

        close = difflib.get_close_matches(key, PRESET_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {text.strip()!r}{hint}; presets: {', '.join(PRESET_NAMES)}, "
                          "or a config string such as 'ff1_3: bfp4'")
    return Config.parse(text)


# --- per-decoder-layer configs ---------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """One Config per decoder layer (tt-metal's DecodersPrecision)."""

    layers: tuple[Config, ...]

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("a model config needs at least one decoder layer")

    @classmethod
    def uniform(cls, cfg: Config, n_layers: int) -> "ModelConfig":
        return cls(tuple([cfg] * n_layers))

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def base(self) -> Config:
        """The most common layer config (ties: the earliest)."""
        return Counter(self.layers).most_common(1)[0][0]

    @property
    def is_uniform(self) -> bool:
        return len(set(self.layers)) == 1

    def __getitem__(self, i: int) -> Config:
        return self.layers[i]

    def overrides(self) -> dict[int, Config]:
        base = self.base
        return {i: c for i, c in enumerate(self.layers) if c != base}

    def __str__(self) -> str:
        """Canonical string: the base header, plus `; decoders = {i: diff; ...}` where layers differ."""
        base = self.base
        over = self.overrides()
        if not over:
            return str(base)
        body = "; ".join(f"{i}: {c.diff(base)}" for i, c in over.items())
        return f"{base}; decoders = {{{body}}}"

    def to_decoder_json(self, full: bool = True) -> dict:
        """tt-metal's decoder JSON. `full` lists every layer (portable regardless of the preset the
        hardware run starts from); otherwise only layers that differ from the base."""
        idx = range(self.n_layers) if full else self.overrides()
        return {"decoders": {str(i): self.layers[i].to_tt() for i in idx}}

    @classmethod
    def from_decoder_json(cls, data: Mapping | str, n_layers: int, base: Config | None = None) -> "ModelConfig":
        """Parse tt-metal's decoder JSON (a dict or JSON text); layers not listed keep `base`."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"decoder JSON is not valid JSON ({exc}); expected {{\"decoders\": {{\"0\": {{...}}}}}}") from None
        if not isinstance(data, Mapping) or "decoders" not in data:
            raise ConfigError("decoder JSON lacks the 'decoders' key; expected {\"decoders\": {\"0\": {...}}}")
        if not isinstance(data["decoders"], Mapping):
            raise ConfigError("decoder JSON's 'decoders' must be an object keyed by layer index: {\"decoders\": {\"0\": {...}}}")
        base = base or DEFAULT
        layers = [base] * n_layers
        seen: set[int] = set()
        for key, entry in data["decoders"].items():
            try:
                i = int(key)
            except ValueError:
                raise ConfigError(f"decoder index {key!r} is not an integer; keys are layer indices \"0\"..\"{n_layers - 1}\"") from None
            if not 0 <= i < n_layers:
                raise ConfigError(f"decoder index {i} out of range for a model with {n_layers} layers (0..{n_layers - 1})")
            if i in seen:
                raise ConfigError(f"decoder index {i} given twice (as {key!r}); list each layer once")
            seen.add(i)
            try:
                layers[i] = Config.from_tt(entry, base)
            except ConfigError as exc:
                raise ConfigError(f"decoder {i}: {exc}") from None
        return cls(tuple(layers))

    @classmethod
    def from_file(cls, path: str | Path, n_layers: int) -> "ModelConfig":
        """A tt-metal decoder JSON file read as `--decoder_config_file` reads it (parse_decoder_json with
        its default `ModelOptimizations.performance`): a layer not listed gets DECODER_JSON_BASE. The file
        must list the model's last layer: tt-metal sizes the model's configs by the highest index, and
        a layer past it has no fidelity there (get_math_fidelity fails). Errors name the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"no decoder JSON file at {path}; give an existing file (e.g. reports/<study>/front/"
                              "<trial>.json), a preset or a config string") from None
        except IsADirectoryError:
            raise ConfigError(f"{path} is a directory, not a decoder JSON file; give a file such as "
                              "reports/<study>/front/<trial>.json") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid JSON (not UTF-8 text); give a tt-metal decoder JSON file "
                              "{\"decoders\": {\"0\": {...}}}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read decoder JSON file {path}: {exc.strerror}; check the path and its permissions") from None
        try:
            mc = cls.from_decoder_json(text, n_layers, DECODER_JSON_BASE)
            data = json.loads(text)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        listed = [int(k) for k in data["decoders"]]
        if not listed or max(listed) != n_layers - 1:
            top = f"lists decoders up to {max(listed)}" if listed else "lists no decoders"
            raise ConfigError(f"{path}: {top} but the model has {n_layers} layers; tt-metal's parse_decoder_json "
                              f"leaves layers past the highest index without a config: list decoder {n_layers - 1} too")
        return mc

    @classmethod
    def parse(cls, text: str, n_layers: int, model_name: str = "") -> "ModelConfig":
        """Inverse of __str__; also accepts presets, plain (uniform) config strings and the path of a
        tt-metal decoder JSON file (see `decoder_json_file` and `from_file`)."""
        path = decoder_json_file(text)
        if path is not None:
            return cls.from_file(path, n_layers)
        head, sep, tail = text.partition("; decoders = {")
        base = resolve(head, model_name)
        shipped = decoder_preset(head.strip().lower(), model_name) if not sep else None
        if shipped is not None and max(int(k) for k in shipped["decoders"]) < n_layers:
            return cls.from_decoder_json(shipped, n_layers, base)
        layers = [base] * n_layers
        if sep:
            if not tail.endswith("}"):
                raise ConfigError("per-layer part must end with '}': '; decoders = {i: diff; ...}'")
            for item in tail[:-1].split("; "):
                idx, _, diff = item.partition(": ")
                if not idx.strip().isdigit() or not 0 <= int(idx) < n_layers:
                    raise ConfigError(f"bad decoder index {idx!r} (model has {n_layers} layers)")
                layers[int(idx)] = Config.parse(diff, base)
        return cls(tuple(layers))
