"""engine.accuracy.stats and engine.accuracy.token_record on fixed data: exact McNemar and Holm against
statsmodels / scipy, the moving-block bootstrap against scipy and its closed form, calibration
under token-by-token label permutation (Kolmogorov-Smirnov), llama.cpp's KLD statistics, and the
per-token record's round trip."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from engine.accuracy import stats
from engine.accuracy.token_record import RecordError, TokenRecord


def record(top1, kld=None, windows=1, seed=0, key="k") -> TokenRecord:
    rng = np.random.default_rng(seed)
    n = len(top1)
    kld = rng.gamma(0.5, 0.02, n) if kld is None else kld
    return TokenRecord(top1=top1, top5=np.ones(n, bool), kld=kld, p_top=rng.uniform(0, 1, n),
                       dp=rng.normal(0, 0.05, n), windows=windows, eval_key=key)


def correlated_pair(n=4088, seed=1):
    """Two configs on the same positions, with runs of agreement / disagreement (AR(1) latent)."""
    rng = np.random.default_rng(seed)
    z = np.zeros(n)
    for i in range(1, n):
        z[i] = 0.6 * z[i - 1] + rng.normal()
    a = z + rng.normal(0, 0.5, n) > -1.0
    b = z + rng.normal(0, 0.5, n) > -1.0
    ka = np.abs(rng.normal(0, 0.05, n)) * (1 + 0.5 * np.abs(z))
    kb = np.abs(rng.normal(0, 0.05, n)) * (1 + 0.5 * np.abs(z))
    return record(a, ka, windows=n // 511, seed=2), record(b, kb, windows=n // 511, seed=3)


# --- McNemar and Holm ----------------------------------------------------------------------------
@pytest.mark.parametrize("b,c", [(0, 0), (5, 0), (7, 3), (3, 7), (12, 30), (100, 120), (1, 1), (40, 13)])
def test_mcnemar_exact_matches_statsmodels_and_scipy(b, c):
    from statsmodels.stats.contingency_tables import mcnemar

    p = stats.mcnemar_exact(b, c)
    assert p == pytest.approx(mcnemar([[50, b], [c, 60]], exact=True).pvalue, rel=1e-12)
    if b + c:
        assert p == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
    assert stats.mcnemar_exact(c, b) == p  # symmetric


def test_holm_matches_statsmodels_and_hand_values():
    from statsmodels.stats.multitest import multipletests

    p = [0.01, 0.04, 0.03, 0.2]
    reject, adj = stats.holm(p)
    # by hand: sorted 0.01, 0.03, 0.04, 0.2 -> x4, x3, x2, x1 with running max
    assert adj.tolist() == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert reject.tolist() == [True, False, False, False]
    assert adj.tolist() == pytest.approx(multipletests(p, method="holm")[1].tolist())
    assert stats.holm([])[0].size == 0


def test_compare_matches_the_statsmodels_table_test():
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = correlated_pair()
    cmp = stats.compare(a, b)
    table = [[int((a.top1 & b.top1).sum()), int((a.top1 & ~b.top1).sum())],
             [int((~a.top1 & b.top1).sum()), int((~a.top1 & ~b.top1).sum())]]
    assert cmp.discordant == (table[0][1], table[1][0])
    assert cmp.p_value == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-12)
    assert cmp.delta_top1[0] == pytest.approx(100 * (a.top1.mean() - b.top1.mean()))
    assert cmp.delta_kld[0] == pytest.approx(a.kld.astype(float).mean() - b.kld.astype(float).mean())
    for est, lo, hi in (cmp.delta_top1, cmp.delta_kld):
        assert lo <= est <= hi
    assert stats.compare(a, b).to_dict() == cmp.to_dict()  # fixed seed: reproducible


def test_a_config_compared_with_itself():
    a, _ = correlated_pair()
    cmp = stats.compare(a, a)
    assert cmp.p_value == 1.0 and cmp.discordant == (0, 0)
    assert cmp.delta_top1 == (0.0, 0.0, 0.0) and cmp.delta_kld == (0.0, 0.0, 0.0)
    assert cmp.verdict == cmp.kld_verdict == stats.SAME


def test_verdicts_and_refusals():
    n = 511
    good = record(np.ones(n, bool), np.full(n, 0.01))
    bad_top1 = np.ones(n, bool)
    bad_top1[::10] = False  # 52 positions lost
    bad = record(bad_top1, np.full(n, 0.05))
    cmp = stats.compare(good, bad)
    assert cmp.verdict == stats.A_BETTER and cmp.kld_verdict == stats.A_BETTER and cmp.p_value < 1e-10
    back = stats.compare(bad, good)
    assert back.verdict == stats.B_BETTER and back.discordant == (0, 52)
    with pytest.raises(ValueError, match="different positions"):
        stats.compare(good, record(np.ones(n - 1, bool)))
    with pytest.raises(ValueError, match="different evaluations"):
        stats.compare(good, record(np.ones(n, bool), key="other"))


# --- the moving-block bootstrap ------------------------------------------------------------------
def test_block_bootstrap_with_block_1_matches_scipy():
    rng = np.random.default_rng(5)
    x = rng.gamma(0.7, 0.03, 400)
    ours = stats.block_bootstrap_means(x, [400], block=1, n_resamples=20000, seed=1)
    ref = sps.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", rng=np.random.default_rng(2))
    lo, hi = stats.percentile_interval(ours)
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.03 * width)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.03 * width)
    assert ours.std() == pytest.approx(ref.standard_error, rel=0.03)


def test_block_bootstrap_variance_matches_its_closed_form():
    # n = k * b: a resample is k blocks drawn uniformly from the n - b + 1 moving blocks, so the
    # variance of its mean is var(block means) / k exactly
    rng = np.random.default_rng(7)
    z = np.zeros(512)
    for i in range(1, 512):
        z[i] = 0.7 * z[i - 1] + rng.normal()
    b = 16
    ours = stats.block_bootstrap_means(z, [512], block=b, n_resamples=40000, seed=3)
    block_means = np.lib.stride_tricks.sliding_window_view(z, b).mean(axis=1)
    assert ours.var() == pytest.approx(block_means.var() / (512 // b), rel=0.03)
    assert ours.mean() == pytest.approx(block_means.mean(), abs=3 * math.sqrt(block_means.var() / 32 / 40000))
    # a longer block sees the positive autocorrelation an i.i.d. bootstrap misses
    iid = stats.block_bootstrap_means(z, [512], block=1, n_resamples=40000, seed=3)
    assert ours.std() > 1.8 * iid.std()


def test_blocks_stay_inside_their_window():
    # window 0 all zeros, window 1 all ones: every resample keeps the half/half split
    x = np.r_[np.zeros(100), np.ones(100)]
    means = stats.block_bootstrap_means(x, [100, 100], block=16, n_resamples=500)
    assert np.allclose(means, 0.5)
    with pytest.raises(ValueError):
        stats.block_bootstrap_means(x, [100, 50])


# --- calibration under the null ------------------------------------------------------------------
def _permuted(a: TokenRecord, b: TokenRecord, rng) -> tuple[TokenRecord, TokenRecord]:
    swap = rng.random(len(a)) < 0.5
    pick = lambda x, y: np.where(swap, y, x)  # noqa: E731
    return (TokenRecord(pick(a.top1, b.top1), a.top5, pick(a.kld, b.kld), a.p_top, a.dp, a.windows, a.eval_key),
            TokenRecord(pick(b.top1, a.top1), b.top5, pick(b.kld, a.kld), b.p_top, b.dp, b.windows, b.eval_key))


def test_permuted_labels_give_uniform_mcnemar_p_values():
    """Swapping A and B at random position by position makes them exchangeable: the exact test's
    p-values, randomised over the atom of the observed count (exact tests are discrete), are then
    Uniform(0, 1); and the plain p-values never reject more often than the level."""
    a, b = correlated_pair(n=1022, seed=11)
    rng = np.random.default_rng(12)
    plain, rand = [], []
    for _ in range(600):
        pa, pb = _permuted(a, b, rng)
        n_ab, n_ba = int((pa.top1 & ~pb.top1).sum()), int((pb.top1 & ~pa.top1).sum())
        p = stats.compare(pa, pb, n_resamples=1).p_value
        n = n_ab + n_ba
        x = min(n_ab, n_ba)
        atom = sps.binom.pmf(x, n, 0.5) * (1 if 2 * x == n else 2)  # P(a count as extreme as this one, exactly)
        plain.append(p)
        rand.append(p - rng.random() * atom)
    assert sps.kstest(rand, "uniform").pvalue > 0.01
    assert np.mean(np.array(plain) < 0.05) <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 600)
    # the KS check has teeth: a one-sided p-value (half the two-sided one) is far from uniform
    assert sps.kstest(np.array(rand) / 2, "uniform").pvalue < 1e-6


def test_permuted_labels_keep_the_bootstrap_intervals_honest():
    """Under the same permutation null the 95% delta-KLD / delta-Top-1 intervals contain 0 in
    about 95% of the permutations."""
    a, b = correlated_pair(n=2044, seed=21)
    rng = np.random.default_rng(22)
    miss_kld = miss_top1 = 0
    n = 300
    for i in range(n):
        pa, pb = _permuted(a, b, rng)
        cmp = stats.compare(pa, pb, n_resamples=1000, seed=i)
        miss_kld += not cmp.delta_kld[1] <= 0 <= cmp.delta_kld[2]
        miss_top1 += not cmp.delta_top1[1] <= 0 <= cmp.delta_top1[2]
    tol = 3 * math.sqrt(0.05 * 0.95 / n)
    assert miss_kld / n == pytest.approx(0.05, abs=tol)
    assert miss_top1 / n == pytest.approx(0.05, abs=tol)


# --- llama.cpp statistics ------------------------------------------------------------------------
def test_kld_stats_follow_llama_perplexity():
    rng = np.random.default_rng(3)
    n = 1000
    kld = rng.gamma(0.4, 0.05, n).astype(np.float32)
    dp = rng.normal(0.001, 0.04, n).astype(np.float16)
    top1 = rng.random(n) < 0.9
    rec = TokenRecord(top1, top1, kld, np.zeros(n), dp)
    s = stats.kld_stats(rec)
    k = np.sort(rec.kld.astype(np.float64))
    full = stats.kld_stats(kld=kld, dp=dp, top1=top1)  # the evaluator's full-precision path
    assert full["kld_mean"] == pytest.approx(kld.astype(np.float64).mean()) == pytest.approx(s["kld_mean"], rel=1e-3)

    def percentile(f):  # llama.cpp's lambda: linear between order statistics
        p = f * (n - 1)
        i = int(p)
        return (1 - (p - i)) * k[i] + (p - i) * k[min(i + 1, n - 1)]

    assert s["kld_mean"] == pytest.approx(k.mean())
    assert s["kld_se"] == pytest.approx(math.sqrt(((k * k).mean() - k.mean() ** 2) / (n - 1)))
    assert s["kld_p50"] == pytest.approx(0.5 * (k[499] + k[500]))  # llama.cpp's median
    for name, f in (("kld_p90", 0.90), ("kld_p99", 0.99), ("kld_p999", 0.999)):
        assert s[name] == pytest.approx(percentile(f), rel=1e-9)
    assert s["kld_max"] == pytest.approx(k[-1])
    d = dp.astype(np.float64)
    assert s["rms_dp"] == pytest.approx(100 * math.sqrt((d * d).mean()))
    p = top1.mean()
    assert s["same_top_p"] == pytest.approx(100 * p) and s["same_top_p_se"] == pytest.approx(100 * math.sqrt(p * (1 - p) / (n - 1)))


# --- the per-token record ------------------------------------------------------------------------
def test_token_record_round_trips_compactly():
    rng = np.random.default_rng(4)
    n = 511 * 2
    rec = TokenRecord(rng.random(n) < 0.9, rng.random(n) < 0.98, rng.gamma(0.5, 0.02, n), rng.random(n),
                      rng.normal(0, 0.05, n), windows=2, eval_key="smollm2-135m/abc/def/P512/D511")
    text = rec.to_base64()
    back = TokenRecord.from_base64(text)
    assert back.equals(rec) and back.windows == 2 and back.eval_key == rec.eval_key
    assert back.kld.dtype == np.float16 and back.p_top.dtype == np.float16 and back.top1.dtype == bool
    assert len(text) < 2 * 5000  # a few KB per 511-position window
    assert back.window(1).equals(TokenRecord.concat([rec.window(1)]))
    assert TokenRecord.concat([rec.window(0), rec.window(1)]).equals(rec)
    assert rec.top1_by_window() == pytest.approx([100 * rec.top1[:511].mean(), 100 * rec.top1[511:].mean()])
    with pytest.raises(RecordError):
        TokenRecord.from_base64("not base64 at all!")
    with pytest.raises(RecordError):
        TokenRecord.from_base64(text[:200])
    with pytest.raises(ValueError):
        TokenRecord(np.ones(10, bool), np.ones(10, bool), np.zeros(10), np.zeros(10), np.zeros(10), windows=3)
