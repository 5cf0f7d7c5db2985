"""The measured record of one sweep trial, as stored in Optuna trial user attributes.

This is the contract between the runner (`sweep.study`, which writes it) and everything that
reads studies (`sweep.pareto`, `sweep.report`, `sweep.plots`, the notebook). The canonical config
string is the join key for reports.

The per-token record (`engine.accuracy.token_record.TokenRecord`) travels with the trial as the user
attribute `token_record`: base64 text of its compressed .npz (a few KB per window), so studies on
any storage, on any host, can run paired tests (`sweep compare STUDY 3 7`, the within-noise rule
of `sweep.pareto`). `TrialRecord.tokens_record()` / `token_record_of(attrs)` decode it.
`accuracy_attrs` is the one place that turns an evaluation (or a numerically equal trial's
attributes) into the accuracy part of a TrialRecord.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from sweep.objectives import OBJECTIVES, legal_names

#: Accuracy fields of a TrialRecord: what an evaluation fills and a numerically equal trial reuses
#: (the first ones are `engine.accuracy.evaluator.EvalResult` attributes of the same name).
EVAL_FIELDS = ("top1", "top5", "top1_ci", "top5_ci", "kld", "ppl", "ref_ppl", "tokens", "windows", "top1_windows")
ACCURACY_FIELDS = EVAL_FIELDS + ("kld_stats", "token_record")


@dataclass
class TrialRecord:
    config: str  # canonical ModelConfig string (str(ModelConfig)): the join key
    model: str  # registry name, e.g. "smollm2-135m"
    top1: float  # percent
    top5: float  # percent
    top1_ci: tuple[float, float]  # 95% Wilson interval, percent
    top5_ci: tuple[float, float]
    kld: float  # mean KL(reference || trial) over scored positions, nats
    ppl: float  # perplexity of the text under the trial
    ref_ppl: float  # perplexity under the fp32 reference
    tokens: int  # scored decode steps
    speed: dict[str, float] = field(default_factory=dict)  # device -> predicted t/s/u
    ttft: dict[str, float] = field(default_factory=dict)  # device -> predicted TTFT ms
    wall_s: float = 0.0  # accuracy evaluation wall time (0 when reused)
    host: str = ""
    reused_from: str | None = None  # config string whose accuracy was reused (numerically equal)
    decoder_json: dict | None = None  # tt-metal decoder JSON of the config
    windows: int = 1  # disjoint evaluation windows (tokens = windows x decode)
    top1_windows: list[float] = field(default_factory=list)  # Top-1 (%) per window
    kld_stats: dict[str, float] = field(default_factory=dict)  # engine.accuracy.stats.kld_stats (llama.cpp style)
    token_record: str | None = None  # base64 per-token record (engine.accuracy.token_record); None in old studies
    # device -> {top1, top5, top1_ci, top5_ci, kld} where the device's numerics differ from the primary
    # device's (tensor-parallel rounding); other devices' accuracy is the top-level one
    accuracy: dict[str, dict] = field(default_factory=dict)
    # sweep allocate's record of an allocated config (device, budget, predicted damage); None otherwise
    allocation: dict | None = None

    def on(self, device: str | None) -> dict:
        """Top-1 / Top-5 (with intervals) and KLD as emulated for `device`."""
        if device in self.accuracy:
            return dict(self.accuracy[device])
        return {"top1": self.top1, "top5": self.top5, "top1_ci": self.top1_ci, "top5_ci": self.top5_ci, "kld": self.kld}

    def to_user_attrs(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["top1_ci"], d["top5_ci"] = list(self.top1_ci), list(self.top5_ci)
        return d

    @classmethod
    def from_user_attrs(cls, attrs: Mapping[str, Any]) -> "TrialRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in attrs.items() if k in names}
        d["top1_ci"], d["top5_ci"] = tuple(d["top1_ci"]), tuple(d["top5_ci"])
        return cls(**d)

    def tokens_record(self):
        """The decoded per-token record (`engine.accuracy.token_record.TokenRecord`), or None when the trial has none."""
        return token_record_of({"token_record": self.token_record})

    def objective(self, name: str) -> float:
        """Value of an objective named `top1`, `top5`, `kld`, `speed:N150` or `ttft:N300`."""
        kind, _, device = name.partition(":")
        o = OBJECTIVES.get(kind)
        if o is None:
            raise KeyError(f"unknown objective {name!r}; legal: {legal_names()}")
        if o.per_device:
            table = getattr(self, kind)
            if device not in table:
                raise KeyError(f"objective {name!r}: no {kind} for device {device!r}; have {sorted(table)}")
            return float(table[device])
        if o.device_accuracy and device:
            return float(self.on(device)[kind])
        return float(getattr(self, kind))


#: Trial user attribute of a trial queued with a config from outside the study's space (an
#: allocation, a uniform config it is compared with): the worker evaluates that config string.
QUEUED_CONFIG = "queued_config"
#: Trial user attribute of an allocated config (sweep.allocate): device, budget, predicted damage.
ALLOCATION = "allocation"


def token_record_of(attrs: Mapping[str, Any]):
    """Decode the `token_record` user attribute of a trial (None when absent; RecordError when corrupt)."""
    text = attrs.get("token_record")
    if not text:
        return None
    from engine.accuracy.token_record import TokenRecord

    return TokenRecord.from_base64(text)


def accuracy_attrs(source) -> dict[str, Any]:
    """The accuracy fields of a TrialRecord (ACCURACY_FIELDS) from an `engine.accuracy.evaluator.EvalResult`
    or from the user attributes of a trial whose accuracy is reused (older trials may lack the
    newer fields: they get the defaults)."""
    if isinstance(source, Mapping):
        d = {k: source[k] for k in ACCURACY_FIELDS if k in source}
    else:
        d = {k: getattr(source, k) for k in EVAL_FIELDS}
        d |= {"top1_windows": list(source.top1_windows), "kld_stats": dict(source.stats),
              "token_record": source.record.to_base64() if source.record is not None else None}
    d["top1_ci"], d["top5_ci"] = tuple(d["top1_ci"]), tuple(d["top5_ci"])
    return d
