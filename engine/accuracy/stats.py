"""Statistics over per-token records (`engine.accuracy.token_record.TokenRecord`).

llama.cpp-style KLD statistics (`llama-perplexity --kl-divergence`, tools/perplexity/perplexity.cpp)
--------------------------------------------------------------------------------------------------
`kld_stats(record)`: mean KLD with its standard error sqrt((E[x^2] - E[x]^2) / (n - 1)),
percentiles by linear interpolation between order statistics (as llama.cpp's `percentile` lambda
and numpy's default), median, maximum; RMS delta-p (delta-p = trial minus reference probability
of the true next token) in percent with the delta-method error llama.cpp prints; "same top p" =
the share of positions whose trial argmax is the reference argmax (= our Top-1), in percent, with
the binomial error sqrt(p (1 - p) / (n - 1)).

Paired comparison of two records of the same positions (`compare`)
------------------------------------------------------------------
* Exact McNemar test on the Top-1 discordant positions: b = A right and B wrong, c = B right and
  A wrong; under "A and B are equally accurate" b ~ Binomial(b + c, 1/2). Two-sided p-value from
  `scipy.stats.binomtest` (p = 1 when there is no discordant position).
* Moving-block paired bootstrap for delta-Top-1 and delta-KLD (A minus B): blocks of BLOCK
  consecutive positions are drawn with replacement inside each window (never across a window
  boundary: each window is its own sequence) until the window's length is filled; 95% percentile
  intervals from N_RESAMPLES resamples with a fixed seed (the same records give the same
  interval).
* Verdict at 95%: "A better" / "B better" on Top-1 when the McNemar p-value is below 0.05 (the
  direction is the side with more discordant wins), else "not distinguishable at 95%". The KLD
  verdict (`kld_verdict`) says the same of the delta-KLD interval: A better when it lies below 0.

Block length (BLOCK = 16 positions)
-----------------------------------
Neighbouring tokens can be correlated (a perturbation of the hidden state carries over a few
positions), and an i.i.d. bootstrap would then understate the spread. Measured on SmolLM2-135M
(defaults vs ff1_3+ff2 bf16/hifi4 over 4 windows; defaults vs accuracy, performance vs ff1_3+ff2
bfp4/lofi and defaults vs performance over window 0): the autocorrelation of the per-position
delta-KLD series at lags 1-4 is at most 0.10, that of delta-Top-1 at most 0.11 in magnitude, and
the Politis-White automatic block length (circular bootstrap, Patton-Politis-White 2009, as
`arch.bootstrap.optimal_block_length` computes it) is 0.1-3.7 positions in the median and 5.6 at
most over windows. BLOCK = 16 covers that with room (and is of the order of the n^(1/3) rule for
n = 511, 8), while the 95% interval widths move by only ~10-20% between blocks of 1, 4, 8, 16
and 32 on these data: erring long costs little and stays honest if some config has longer-range
effects. Blocks never cross a window boundary; a window shorter than 4 blocks uses len // 4.

Multiple comparisons
--------------------
`holm(pvalues)`: Holm-adjusted p-values (statsmodels `multipletests(method="holm")`); used by
`sweep.pareto` for the "within noise of the front" rule.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from engine.accuracy.token_record import TokenRecord

ALPHA = 0.05
BLOCK = 16  # moving-block length in positions (see the module docstring)
N_RESAMPLES = 2000
SEED = 0
A_BETTER, B_BETTER, SAME = "A better", "B better", "not distinguishable at 95%"
PERCENTILES = {"kld_p50": 50.0, "kld_p90": 90.0, "kld_p99": 99.0, "kld_p999": 99.9}


# --- llama.cpp-style statistics -------------------------------------------------------------
def mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error sqrt((E[x^2] - E[x]^2) / (n - 1)) (llama.cpp's mean_and_uncertainty)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if n == 0:
        return math.nan, math.nan
    m = float(x.mean())
    var = float((x * x).mean()) - m * m
    return m, (math.sqrt(var / (n - 1)) if n > 1 and var > 0 else 0.0)


def kld_stats(rec: TokenRecord | None = None, *, kld=None, dp=None, top1=None) -> dict[str, float]:
    """KLD mean/SE/percentiles/max (nats), RMS delta-p and same-top-p (percent) of a record, or of
    full-precision per-position arrays `kld`, `dp`, `top1` (what the evaluator passes)."""
    if rec is not None:
        kld, dp, top1 = rec.kld, rec.dp, rec.top1
    kld = np.asarray(kld, dtype=np.float64)
    dp = np.asarray(dp, dtype=np.float64)
    top1 = np.asarray(top1, dtype=bool)
    n = kld.size
    if n == 0:
        raise ValueError("no scored positions")
    out: dict[str, float] = {}
    out["kld_mean"], out["kld_se"] = mean_se(kld)
    for name, q in PERCENTILES.items():
        out[name] = float(np.percentile(kld, q))
    out["kld_max"] = float(kld.max())
    msd, msd_se = mean_se(dp * dp)
    rms = math.sqrt(msd)
    out["rms_dp"] = 100.0 * rms
    out["rms_dp_se"] = 100.0 * (msd_se / (2.0 * rms) if rms > 0 else 0.0)  # delta method, as llama.cpp
    out["mean_dp"], se = mean_se(dp)
    out["mean_dp"], out["mean_dp_se"] = 100.0 * out["mean_dp"], 100.0 * se
    p = float(top1.mean())
    out["same_top_p"] = 100.0 * p
    out["same_top_p_se"] = 100.0 * (math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0)
    return out


# --- tests ----------------------------------------------------------------------------------
def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c."""
    from scipy.stats import binomtest

    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    if b + c == 0:
        return 1.0
    return float(min(1.0, binomtest(b, b + c, 0.5).pvalue))


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """(reject, adjusted p-values) under Holm's step-down correction."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    if p.size == 0:
        return np.zeros(0, dtype=bool), np.zeros(0)
    reject, adj, _, _ = multipletests(p, alpha=alpha, method="holm")
    return reject, adj


def block_bootstrap_means(x: np.ndarray, lengths: Sequence[int], block: int = BLOCK,
                          n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Means of `n_resamples` moving-block bootstrap resamples of `x` ([N] or [k, N]: k series
    resampled with the same blocks, as a paired bootstrap needs).

    `x` is split into consecutive segments of `lengths` (the windows); each segment is rebuilt
    from ceil(len / b) blocks of b consecutive positions with uniformly drawn starts in 0..len-b,
    the last block cut to fit; b = min(block, len // 4) (at least 1), so a short window still has
    several blocks to draw (a block as long as the window would only ever redraw the window). Block sums come from prefix sums, so the cost
    is O(n_resamples * blocks), not O(n_resamples * N)."""
    x = np.asarray(x, dtype=np.float64)
    single = x.ndim == 1
    x = x.reshape(1, -1) if single else x
    if sum(lengths) != x.shape[1] or min(lengths, default=0) < 1:
        raise ValueError(f"segment lengths {list(lengths)} do not split {x.shape[1]} positions")
    if block < 1 or n_resamples < 1:
        raise ValueError("block and n_resamples must be >= 1")
    rng = np.random.default_rng(seed)
    totals = np.zeros((x.shape[0], n_resamples))
    start = 0
    for n in lengths:
        seg = x[:, start:start + n]
        start += n
        b = max(1, min(block, n // 4))
        k, last = divmod(n, b)
        csum = np.concatenate([np.zeros((seg.shape[0], 1)), np.cumsum(seg, axis=1)], axis=1)
        full = csum[:, b:] - csum[:, :-b]  # sum of the block starting at s, s = 0..n-b
        starts = rng.integers(0, n - b + 1, size=(n_resamples, k))
        totals += full[:, starts].sum(axis=2)
        if last:
            s = rng.integers(0, n - b + 1, size=n_resamples)
            totals += csum[:, s + last] - csum[:, s]
    means = totals / x.shape[1]
    return means[0] if single else means


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [a, 1.0 - a])
    return float(lo), float(hi)


@dataclass
class Comparison:
    """Paired comparison of trial A against trial B on the same scored positions."""

    tokens: int
    windows: int
    discordant: tuple[int, int]  # (A right B wrong, B right A wrong) on Top-1
    p_value: float  # exact McNemar, two-sided
    delta_top1: tuple[float, float, float]  # A - B, percentage points: estimate, 95% lo, hi
    delta_kld: tuple[float, float, float]  # A - B, nats: estimate, 95% lo, hi
    verdict: str  # on Top-1 (McNemar): A better / B better / not distinguishable at 95%
    kld_verdict: str  # on KLD (bootstrap interval)
    block: int
    n_resamples: int
    top1: tuple[float, float]  # Top-1 (%) of A and B
    kld: tuple[float, float]  # mean KLD of A and B

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("discordant", "delta_top1", "delta_kld", "top1", "kld"):
            d[k] = list(d[k])
        return d


def _check_pair(a: TokenRecord, b: TokenRecord) -> None:
    if len(a) != len(b) or a.windows != b.windows:
        raise ValueError(f"the records score different positions ({len(a)} in {a.windows} window(s) vs "
                         f"{len(b)} in {b.windows}); compare trials evaluated with the same prefill, decode and windows")
    if a.eval_key and b.eval_key and a.eval_key != b.eval_key:
        raise ValueError(f"the records come from different evaluations ({a.eval_key} vs {b.eval_key}): "
                         "compare trials of one model on one text with the same prefill and decode")


def compare(a: TokenRecord, b: TokenRecord, *, block: int = BLOCK, n_resamples: int = N_RESAMPLES,
            seed: int = SEED, alpha: float = ALPHA) -> Comparison:
    """Exact McNemar on Top-1 plus a moving-block paired bootstrap of delta-Top-1 and delta-KLD."""
    _check_pair(a, b)
    n_ab = int((a.top1 & ~b.top1).sum())
    n_ba = int((b.top1 & ~a.top1).sum())
    p = mcnemar_exact(n_ab, n_ba)
    d1 = 100.0 * (a.top1.astype(np.float64) - b.top1.astype(np.float64))
    dk = a.kld.astype(np.float64) - b.kld.astype(np.float64)
    boot = block_bootstrap_means(np.stack([d1, dk]), a.window_lengths(), block, n_resamples, seed)
    ci1, cik = percentile_interval(boot[0], 1 - alpha), percentile_interval(boot[1], 1 - alpha)
    verdict = SAME if p >= alpha else (A_BETTER if n_ab > n_ba else B_BETTER)
    kld_verdict = A_BETTER if cik[1] < 0 else B_BETTER if cik[0] > 0 else SAME
    return Comparison(
        tokens=len(a), windows=a.windows, discordant=(n_ab, n_ba), p_value=p,
        delta_top1=(float(d1.mean()), *ci1), delta_kld=(float(dk.mean()), *cik),
        verdict=verdict, kld_verdict=kld_verdict, block=block, n_resamples=n_resamples,
        top1=(100.0 * float(a.top1.mean()), 100.0 * float(b.top1.mean())),
        kld=(float(a.kld.astype(np.float64).mean()), float(b.kld.astype(np.float64).mean())),
    )


def significantly_better(a: TokenRecord, b: TokenRecord) -> float:
    """Two-sided McNemar p-value of "A's Top-1 beats B's", or 1.0 when A does not win more
    discordant positions than B (then A cannot be better)."""
    _check_pair(a, b)
    n_ab = int((a.top1 & ~b.top1).sum())
    n_ba = int((b.top1 & ~a.top1).sum())
    return mcnemar_exact(n_ab, n_ba) if n_ab > n_ba else 1.0


__all__ = ["ALPHA", "A_BETTER", "BLOCK", "B_BETTER", "Comparison", "N_RESAMPLES", "SAME", "block_bootstrap_means",
           "compare", "holm", "kld_stats", "mcnemar_exact", "mean_se", "percentile_interval", "significantly_better"]
