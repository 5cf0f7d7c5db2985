"""TEST FIXTURE: a synthetic lt-pareto study with realistic-looking but invented numbers.

Nothing here was measured. The configs are the 12 of docs/NUMERICS.md in the seed's
order; Top-1/Top-5 follow the seed's pattern (bfp4 costs accuracy), intervals are 95% Wilson
over 511 scored steps, speed/TTFT are made up with the seed's shape (bfp4 weights read faster,
more fidelity phases cost prefill time). Used by the pareto, report, plots and notebook tests.
"""
from __future__ import annotations

import math

import optuna
from optuna.distributions import CategoricalDistribution

from engine.vocab.config import DEFAULT, Config, ModelConfig
from sweep.records import TrialRecord

MODEL = "smollm2-135m"
DEVICES = ["N300", "N150"]
OBJECTIVES = ["top1", "top5", "speed:N300", "speed:N150"]
N_LAYERS = 30
TOKENS = 511


def lt_pareto_configs() -> list[Config]:
    """The 12 configs of the seed's pareto sweep, in the seed's section order."""
    levels = {"bfp4": "lofi", "bfp8": "hifi2", "bf16": "hifi4"}
    out = []
    for a, fa in levels.items():
        for b, fb in levels.items():
            out.append(DEFAULT.replace(ff1_3=a, li_ff1_3=fa, ff2=b, li_ff2=fb))
    for act in ("bf16", "bfp8", None):
        out.append(DEFAULT.replace(wo="bfp4", li_o_decode="lofi", li_o_prefill="lofi", activation=act))
    return out


PARAM_NAMES = ("ff1_3", "ff2", "wo", "activation")
DISTRIBUTIONS = {
    "ff1_3": CategoricalDistribution(["bfp4", "bfp8", "bf16"]),
    "ff2": CategoricalDistribution(["bfp4", "bfp8", "bf16"]),
    "wo": CategoricalDistribution(["bfp4", "bfp8", "bf16"]),
    "activation": CategoricalDistribution(["mixed", "bf16", "bfp8"]),
}


def _wilson(k: int, n: int) -> tuple[float, float]:
    z = 1.959963984540054
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (100 * (c - h), 100 * (c + h))


def synthetic_record(cfg: Config, i: int, model: str = MODEL, devices=DEVICES) -> TrialRecord:
    bits = {"bfp4": 4.5, "bfp8": 8.5, "bf16": 16.0, None: 8.5}
    phases = {"lofi": 1, "hifi2": 2, "hifi2na": 2, "hifi2fp16": 2, "hifi4": 4}
    p = dict(cfg.items())
    # accuracy: bfp4 MLP weights cost a few points, a little deterministic jitter per config
    loss = 3.0 * (p["ff1_3"] == "bfp4") + 2.5 * (p["ff2"] == "bfp4") + 1.0 * (p["wo"] == "bfp4")
    loss += 0.8 * (p["activation"] == "bfp8") + ((i * 7) % 5) * 0.4
    k1 = int(round(TOKENS * (92.0 - loss) / 100))
    k5 = int(round(TOKENS * (99.0 - loss / 4) / 100))
    weight_bits = (2 * bits[p["ff1_3"]] + bits[p["ff2"]]) * 3 + bits[p["wo"]] + 2 * bits[p["wqkv"]]
    act_cost = {"bf16": 1.0, "bfp8": -0.6, "mixed": 0.0}[p["activation"]]
    fid = phases[p["li_ff1_3"]] * 2 + phases[p["li_ff2"]] + phases[p["li_o_prefill"]]
    speed, ttft = {}, {}
    for d in devices:
        base = 160.0 if d == "N150" else 190.0
        speed[d] = round(base * 60.0 / (weight_bits * 0.55 + 27) - act_cost, 3)
        ttft[d] = round((9.0 if d == "N300" else 13.0) + fid * 1.1 + ((i * 3) % 4) * 0.7, 3)
    mc = ModelConfig.uniform(cfg, N_LAYERS)
    return TrialRecord(
        config=str(mc), model=model, top1=100 * k1 / TOKENS, top5=100 * k5 / TOKENS,
        top1_ci=_wilson(k1, TOKENS), top5_ci=_wilson(k5, TOKENS), kld=0.01 * loss + 0.002,
        ppl=11.0 + 0.1 * loss, ref_ppl=11.0, tokens=TOKENS, speed=speed, ttft=ttft, wall_s=4.2,
        host="fixture", decoder_json=mc.to_decoder_json(),
    )


def params_of(cfg: Config) -> dict:
    p = dict(cfg.items())
    return {k: p[k] for k in PARAM_NAMES}


def build_study(storage=None, name: str = "lt-pareto", model: str = MODEL, configs=None,
                objectives=OBJECTIVES, devices=DEVICES, extra_records=(), constraints=None,
                space: dict | None = None) -> optuna.Study:
    """A COMPLETE study like the runner's: one trial per config, user attrs = TrialRecord.
    `constraints`: optional function record -> {name: value} (> 0 = violated, Optuna's rule)."""
    from sweep.objectives import direction

    study = optuna.create_study(storage=storage, study_name=name, directions=[direction(o) for o in objectives])
    study.set_user_attr("model", model)
    study.set_user_attr("devices", list(devices))
    study.set_user_attr("objectives", list(objectives))
    study.set_user_attr("spec", {"name": name, "model": model, "devices": list(devices),
                                 "eval": {"prefill": 512, "decode": 511},
                                 "perf": {"batch": 1, "prefill": 128, "decode": 200},
                                 **({"space": space} if space is not None else {})})
    study.set_user_attr("perf_calibration", "synthetic test fixture (no calibration)")
    configs = lt_pareto_configs() if configs is None else configs
    records = [synthetic_record(c, i, model, devices) for i, c in enumerate(configs)] + list(extra_records)
    for rec in records:
        cfg = ModelConfig.parse(rec.config, N_LAYERS).base
        study.add_trial(optuna.trial.create_trial(
            params=params_of(cfg), distributions=DISTRIBUTIONS,
            values=[rec.objective(o) for o in objectives], user_attrs=rec.to_user_attrs(),
            constraints=constraints(rec) if constraints else None,
        ))
    return study


def journal_storage(path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))
