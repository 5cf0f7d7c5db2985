"""Sensitivity probes: choice families, and the grid of single-change configs a profile measures.

A *family* is the set of config keys one per-layer decision sets together: a weight group with
the linears that read it (at the format's natural fidelity), the KV cache format, the activation
dtype, or one op group's fidelity. Families are disjoint in keys, so one choice per (layer,
family) names one config, and the allocator (sweep.allocate) can price and sum them.

A *probe* changes one family of one decoder layer of a base config to one of its other choices.
`ProbeSpace` is the grid of the base config plus every probe, with the Space interface
(sweep.space) so a sensitivity study runs, resumes and spreads over workers like any study; its
one categorical parameter `probe` names the probe (`base`, `L7.ff1_3=bfp4`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from engine.vocab.config import (
    MIXED,
    NATURAL,
    WEIGHT_READERS,
    Config,
    ConfigError,
    FidelitySetting,
    ModelConfig,
    OpGroup,
    TensorGroup,
    fidelity_of,
    precision_of,
)
from sweep.param import Param

WEIGHT_FORMATS = ("bfp4", "bfp8", "bf16")  # the tt-metal weight formats, fastest first


@dataclass(frozen=True)
class Family:
    """One per-layer decision: `keys` are the config keys it sets, `choices` its default options."""

    name: str
    keys: tuple[str, ...]
    choices: tuple[str, ...]
    kind: str  # "weight" (format + natural fidelity of its readers), "tensor" (format), "op" (fidelity)

    def canonical(self, choice: str) -> str:
        """A choice as the config vocabulary spells it; ConfigError for an illegal one."""
        if self.kind == "op":
            return fidelity_of(choice).value
        p = precision_of(choice, TensorGroup(self.keys[0]))
        return p.value if p is not None else MIXED

    def choice_of(self, layer: Config) -> str:
        """The choice a layer config makes in this family (its value of the family's first key)."""
        return dict(layer.items())[self.keys[0]]

    def changes(self, choice: str, layer: Config, natural: Mapping[str, str] = NATURAL) -> dict[str, str]:
        """Key -> value changes that make `layer` take `choice` (empty when it already does: a
        weight group's own format keeps the layer's fidelities, whatever they are)."""
        choice = self.canonical(choice)
        if choice == self.choice_of(layer):
            return {}
        if self.kind == "weight":
            if choice not in natural:
                raise ConfigError(f"{self.name}: format {choice!r} has no natural fidelity; give one of {', '.join(natural)}")
            return {self.keys[0]: choice} | {op: natural[choice] for op in self.keys[1:]}
        return {self.keys[0]: choice}


def _families() -> dict[str, Family]:
    out = {g: Family(g, (g, *ops), WEIGHT_FORMATS, "weight") for g, ops in WEIGHT_READERS.items()}
    out["kv_cache"] = Family("kv_cache", ("kv_cache",), WEIGHT_FORMATS, "tensor")
    out["activation"] = Family("activation", ("activation",), (MIXED, "bf16", "bfp8"), "tensor")
    ops_fast_first = tuple(f.value for f in (FidelitySetting.LOFI, FidelitySetting.HIFI2_NA, FidelitySetting.HIFI2,
                                             FidelitySetting.HIFI4))
    for op in OpGroup:
        out[op.value] = Family(op.value, (op.value,), ops_fast_first, "op")
    return out


#: Every family by name: the four weight groups, kv_cache, activation and each op group.
FAMILIES: dict[str, Family] = _families()
#: What a sensitivity profile measures unless the study says otherwise: every weight group at its
#: natural fidelity, the KV cache, the activation dtype and both SDPA op groups.
DEFAULT_FAMILIES = (*WEIGHT_READERS, "kv_cache", "activation", OpGroup.SDPA_DECODE.value, OpGroup.SDPA_PREFILL.value)

def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown family {name!r}; legal: {', '.join(FAMILIES)}") from None


@dataclass(frozen=True)
class Probe:
    """One single change of the base: `layer`'s `family` set to `choice` (layer None: the base)."""

    layer: int | None
    family: str
    choice: str

    @property
    def label(self) -> str:
        return "base" if self.layer is None else f"L{self.layer}.{self.family}={self.choice}"

    @classmethod
    def parse(cls, label: str) -> "Probe":
        if label == "base":
            return cls(None, "", "")
        head, _, choice = label.partition("=")
        layer, _, fam = head.partition(".")
        return cls(int(layer[1:]), fam, choice)


class ProbeSpace:
    """The base config and every single-change probe of `families` on `layers` (the Space interface)."""

    def __init__(self, n_layers: int, base: ModelConfig, families: Mapping[str, Sequence[str]],
                 layers: Sequence[int] | None = None, natural: Mapping[str, str] | None = None) -> None:
        self.n_layers = n_layers
        self.base = base
        self.natural = dict(NATURAL if natural is None else natural)
        self.families = {name: tuple(family(name).canonical(c) for c in chs) for name, chs in families.items()}
        self.layers = tuple(range(n_layers)) if layers is None else tuple(layers)
        self.couple: dict = {}
        self.configs = None
        seen: dict[str, str] = {}
        for name in self.families:
            for k in family(name).keys:
                if k in seen:
                    raise ConfigError(f"families {seen[k]} and {name} both set {k}; keep one of them")
                seen[k] = name
        probes = [Probe(None, "", "")]
        for i in self.layers:
            for name, choices in self.families.items():
                fam = family(name)
                own = fam.choice_of(base.layers[i])
                for c in choices:
                    if c != own:
                        fam.changes(c, base.layers[i], self.natural)  # a choice without a natural fidelity fails here
                        probes.append(Probe(i, name, c))
        self.probes = tuple(probes)
        self._by_label = {p.label: p for p in self.probes}
        self.params = (Param("probe", "probe", tuple(self._by_label), self.layers),)

    @property
    def size(self) -> int:
        return len(self.probes)

    def layer_config(self, layer: int, family_name: str, choice: str) -> Config:
        """Layer `layer` of the base with `family_name` set to `choice`."""
        cfg = self.base.layers[layer]
        return cfg.replace(**family(family_name).changes(choice, cfg, self.natural))

    def probe_config(self, probe: Probe) -> ModelConfig:
        if probe.layer is None:
            return self.base
        layers = list(self.base.layers)
        layers[probe.layer] = self.layer_config(probe.layer, probe.family, probe.choice)
        return ModelConfig(tuple(layers))

    def config(self, params: Mapping[str, Any]) -> ModelConfig:
        label = str(params.get("probe", ""))
        if set(params) != {"probe"} or label not in self._by_label:
            raise ConfigError(f"a sensitivity trial takes one parameter 'probe' (one of the {self.size} probe labels), "
                              f"not {dict(params)}")
        return self.probe_config(self._by_label[label])

    def params_of(self, mc: ModelConfig) -> dict[str, str]:
        for p in self.probes:
            if self.probe_config(p) == mc:
                return {"probe": p.label}
        raise ConfigError(f"config is not a probe of this space: {mc}")

    def grid(self) -> Iterator[tuple[dict[str, str], ModelConfig]]:
        for p in self.probes:
            yield {"probe": p.label}, self.probe_config(p)

    def random_config(self, rng, p_change: float = 0.3) -> ModelConfig:
        """A random per-layer config of the probes' choices: each (layer, family) takes another
        choice with probability `p_change` (`rng`: a random.Random; the additivity check's configs)."""
        layers = list(self.base.layers)
        for i in self.layers:
            for name, choices in self.families.items():
                fam = family(name)
                others = [c for c in choices if c != fam.choice_of(self.base.layers[i])]
                if others and rng.random() < p_change:
                    layers[i] = layers[i].replace(**fam.changes(rng.choice(others), layers[i], self.natural))
        return ModelConfig(tuple(layers))

    def suggest(self, trial) -> dict[str, str]:
        return {"probe": trial.suggest_categorical("probe", list(self.params[0].choices))}


def parse_probes(d: Mapping, model: str, n_layers: int) -> tuple[ProbeSpace, dict]:
    """A ProbeSpace from the normalised probes table {base, families: {name: [choices]}, layers,
    natural}; ConfigError naming the bad key or value."""
    base_text = d.get("base", "defaults")
    if not isinstance(base_text, str):
        raise ConfigError("base must be a preset name or a config string")
    base = ModelConfig.parse(base_text, n_layers, model)
    fams = d.get("families", list(DEFAULT_FAMILIES))
    if isinstance(fams, (list, tuple)):
        fams = {f: family(f).choices for f in fams if isinstance(f, str)} if all(isinstance(f, str) for f in fams) else None
    if not isinstance(fams, Mapping) or not fams:
        raise ConfigError(f"families must be a non-empty list of family names; legal: {', '.join(FAMILIES)}")
    for name, chs in fams.items():
        family(name)
        if not isinstance(chs, (list, tuple)) or len(chs) < 2 or not all(isinstance(c, str) for c in chs):
            raise ConfigError(f"choices of family {name} must be a list of at least two values")
    layers = d.get("layers")
    if layers is not None:
        if not isinstance(layers, list) or not layers or not all(isinstance(i, int) and 0 <= i < n_layers for i in layers):
            raise ConfigError(f"layers must be a list of decoder indices 0..{n_layers - 1}")
        layers = sorted(set(layers))
    natural = d.get("natural")
    space = ProbeSpace(n_layers, base, fams, layers, natural)
    doc = {"base": base_text, "families": {k: list(v) for k, v in space.families.items()}}
    if layers is not None:
        doc["layers"] = list(layers)
    if natural is not None:
        doc["natural"] = dict(natural)
    return space, doc
