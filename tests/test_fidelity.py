"""engine.fidelity: phase slices, dest accumulation, the setting table and the SFPU functions."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from engine import fidelity
from engine.fidelity import EXACT, HIFI3, NAMED, SETTINGS, Fidelity, exp, matmul, recip, resolve
from engine.formats import quantize


def fp32_dest(phases: int) -> Fidelity:
    return Fidelity(phases, False, True, False)


def bf16_dest(phases: int, l1: bool = False) -> Fidelity:
    return Fidelity(phases, False, False, l1)


def trunc(a: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """Keep sign, exponent and the top `mantissa_bits` mantissa bits; flush denormals."""
    a = np.asarray(a, dtype=np.float32)
    keep = np.uint32((0xFFFFFFFF << (23 - mantissa_bits)) & 0xFFFFFFFF)
    out = (a.view(np.uint32) & keep).view(np.float32)
    return np.where(np.abs(a) < 2.0**-126, np.float32(0), out)


def slices_ref(x: np.ndarray, w: np.ndarray, phases: int):
    """(SrcB, SrcA) operand pairs per the phase table, written independently of the module."""
    xh, x7, wh, w7 = trunc(x, 6), trunc(x, 7), trunc(w, 4), trunc(w, 7)
    return {
        1: [(xh, wh)],
        2: [(xh, w7)],
        3: [(xh, w7), (x7 - xh, wh)],
        4: [(x7, w7)],
    }[phases]


def bf16(v: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.asarray(v, dtype=np.float32)).to(torch.bfloat16).float().numpy()


def tile_loop_ref(x, w, phases, k_block=None, l1=False, out_round=bf16):
    """The literal per-tile loop: dest <- bf16(dest + P_t) for each 32-wide K tile; with packer
    L1 accumulation, each K block's dest result is added into an L1 buffer rounded by out_round."""
    K = x.shape[-1]
    kb = K if k_block is None else k_block
    pairs = slices_ref(x, w, phases)
    dest = np.zeros((x.shape[0], w.shape[1]), dtype=np.float32)
    acc = None
    for k0 in range(0, K, 32):
        part = sum(xs[:, k0 : k0 + 32].astype(np.float64) @ ws[k0 : k0 + 32].astype(np.float64) for xs, ws in pairs)
        dest = bf16(dest + part.astype(np.float32))
        end = min(K, k0 + 32)
        if l1 and end % kb == 0 and end < K:
            acc = out_round(dest if acc is None else acc + dest)
            dest = np.zeros_like(dest)
    return dest if acc is None else out_round(acc + dest)


def rand_bf16(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(torch.bfloat16).float()


def small_ints(shape, seed, lo=-8, hi=9, scale=1.0):
    """Exact little operands: every tile partial is exact in fp32, so only the dest rounding
    can differ between implementations."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).float() * scale


# --------------------------------------------------------------------------------------------
# The setting table
# --------------------------------------------------------------------------------------------


def test_settings_table():
    assert SETTINGS == {
        "lofi": Fidelity(1, False, False, True),
        "hifi2": Fidelity(2, True, True, True),
        "hifi2na": Fidelity(2, False, False, False),
        "hifi2fp16": Fidelity(2, False, False, True),
        "hifi4": Fidelity(4, False, True, True),
        "hifi4fp32": Fidelity(4, True, True, True),
    }
    assert NAMED["hifi3"] == HIFI3 == Fidelity(3, False, True, True)
    assert resolve("exact") is EXACT and EXACT.phases == 0 and EXACT.fp32_dest
    assert resolve(SETTINGS["lofi"]) is SETTINGS["lofi"]


def test_resolve_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"'hifi5'.*lofi, hifi2, hifi2na, hifi2fp16, hifi4, hifi4fp32"):
        resolve("hifi5")
    with pytest.raises(ValueError, match="phases"):
        Fidelity(5, False, True, True)
    with pytest.raises(ValueError, match="fp32_dest"):
        Fidelity(2, False, 1, True)


def test_resolve_accepts_config_enum():
    from engine.config import FidelitySetting

    for member in FidelitySetting:
        assert isinstance(resolve(member), Fidelity)
    assert resolve(FidelitySetting.HIFI2_FP16) == SETTINGS["hifi2fp16"]


# --------------------------------------------------------------------------------------------
# Phase slices on single elements (hand-computed)
# --------------------------------------------------------------------------------------------


def one(x: float, w: float, setting) -> float:
    return matmul(torch.tensor([[x]]), torch.tensor([[w]]), setting).item()


def test_phase_slices_are_truncated():
    a = 1.9921875  # 1.1111111b: all seven mantissa bits set; rounding any slice would give 2
    assert one(a, a, fp32_dest(1)) == 1.984375 * 1.9375  # hi(x) 6 bits x hi(w) 4 bits
    assert one(a, a, fp32_dest(2)) == 1.984375 * a  # hi(x) x all of w
    assert one(a, a, fp32_dest(3)) == 1.984375 * a + (1 / 128) * 1.9375  # + lo(x) x hi(w)
    assert one(a, a, fp32_dest(4)) == a * a
    assert one(-a, a, fp32_dest(1)) == -1.984375 * 1.9375  # sign-magnitude truncation


def test_each_phase_uses_its_slices():
    x = 1 + 1 / 128  # only the 7th mantissa bit: hi(x) = 1, lo(x) = 1/128
    w = 1 + 1 / 16 + 1 / 128  # bit 4 (in hi(w)) and bit 7 (in the next 3 bits)
    assert one(x, w, fp32_dest(1)) == 1.0625
    assert one(x, w, fp32_dest(2)) == w
    assert one(x, w, fp32_dest(3)) == w + 1.0625 / 128
    assert one(x, w, fp32_dest(4)) == x * w


def test_operand_roles():
    """x is SrcB (6-bit first slice), w is SrcA (4-bit first slice)."""
    v = 1 + 1 / 32 + 1 / 64  # mantissa bits 5 and 6
    assert one(v, 1.0, fp32_dest(1)) == v  # kept by hi(x)
    assert one(1.0, v, fp32_dest(1)) == 1.0  # dropped by hi(w)


def test_source_registers_truncate_to_bf16_and_flush_denormals():
    assert one(1.0, 1 + 2.0**-10, fp32_dest(4)) == 1.0
    assert one(1 + 2.0**-9, 1.0, fp32_dest(4)) == 1.0
    assert one(1e-39, 2.0**100, fp32_dest(4)) == 0.0
    assert one(2.0**100, -1e-39, SETTINGS["hifi2"]) == 0.0
    assert one(1e-39, 2.0**100, EXACT) == pytest.approx(1e-39 * 2.0**100, rel=1e-6)


def test_exact_is_plain_fp32_matmul():
    x, w = torch.randn(3, 17, 70), torch.randn(70, 9)
    assert torch.equal(matmul(x, w, "exact"), x @ w)
    assert torch.equal(matmul(x, w, EXACT), x @ w)


# --------------------------------------------------------------------------------------------
# Properties of the phases
# --------------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(4, 24), st.integers(64, 256), st.integers(4, 24))
def test_error_is_monotonic_in_phases(seed, m, k, n):
    x, w = rand_bf16((m, k), seed), rand_bf16((k, n), seed + 1, scale=0.05)
    ref = x.double() @ w.double()
    err = {p: (matmul(x, w, fp32_dest(p)).double() - ref).norm().item() for p in (1, 2, 3, 4)}
    assert err[1] >= err[2] >= err[3] >= err[4]
    named = {s: (matmul(x, w, s).double() - ref).norm().item() for s in ("lofi", "hifi2", "hifi4")}
    assert named["lofi"] >= named["hifi2"] >= named["hifi4"]


@pytest.mark.parametrize("seed", [0, 1])
def test_bfp4_weights_lose_nothing_to_lofi(seed):
    x = rand_bf16((16, 96), seed)
    w = quantize(rand_bf16((96, 40), seed + 5), "bfp4")
    for fp32, l1 in ((True, True), (False, True), (False, False)):
        lofi, hifi2 = Fidelity(1, False, fp32, l1), Fidelity(2, False, fp32, l1)
        assert torch.equal(matmul(x, w, lofi), matmul(x, w, hifi2))
        assert torch.equal(matmul(x, w, Fidelity(3, False, fp32, l1)), matmul(x, w, Fidelity(4, False, fp32, l1)))
    assert torch.equal(matmul(x, w, "lofi"), matmul(x, w, "hifi2fp16"))
    w8 = quantize(rand_bf16((96, 40), seed + 5), "bfp8")  # bfp8 weights do lose bits to LoFi
    assert not torch.equal(matmul(x, w8, fp32_dest(1)), matmul(x, w8, fp32_dest(2)))


@pytest.mark.parametrize("seed", [0, 1])
def test_hifi2_equals_hifi4_without_a_seventh_activation_bit(seed):
    """HiFi2 drops only lo(x), the 7th mantissa bit of the activation, so it equals HiFi4 exactly
    when x has no bit beyond the 6th (e.g. a bfp8 activation: <= 6 fraction bits), whatever the
    bf16 weights; a bf16 activation with 7th bits set differs."""
    w8 = quantize(rand_bf16((128, 48), seed + 3), "bfp8")
    wbf = rand_bf16((128, 48), seed + 4)
    x = rand_bf16((20, 128), seed)
    x6 = torch.from_numpy(trunc(x.numpy(), 6))
    xq = quantize(x, "bfp8", "device")
    for w in (w8, wbf):
        for act in (x6, xq):
            assert torch.equal(matmul(act, w, "hifi2"), matmul(act, w, "hifi4"))
            assert torch.equal(matmul(act, w, fp32_dest(3)), matmul(act, w, fp32_dest(4)))
    assert (x != x6).any()
    assert not torch.equal(matmul(x, w8, "hifi2"), matmul(x, w8, "hifi4"))


# --------------------------------------------------------------------------------------------
# Dest accumulation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phases", [1, 2, 3, 4])
def test_bf16_dest_equals_literal_tile_loop(phases):
    x = small_ints((12, 1024), 1, 0, 9, 0.5)  # non-negative: the running sum grows past bf16
    w = small_ints((1024, 20), 2, -3, 9, 0.25)
    got = matmul(x, w, bf16_dest(phases)).numpy()
    assert np.array_equal(got, tile_loop_ref(x.numpy(), w.numpy(), phases))
    exact = matmul(x, w, fp32_dest(phases)).numpy()
    assert not np.array_equal(got, exact)  # bf16 dest differs from fp32 dest on long K


def test_bf16_dest_on_random_data_and_ragged_k():
    x, w = rand_bf16((9, 1000), 3), rand_bf16((1000, 33), 4)
    for phases in (1, 2, 3, 4):
        got = matmul(x, w, bf16_dest(phases)).numpy()
        ref = tile_loop_ref(x.numpy(), w.numpy(), phases)
        # partial sums may round differently in fp32, then the bf16 rounding may flip one ulp
        assert np.allclose(got, ref, rtol=2**-7, atol=1e-2)
        assert (got == bf16(got)).all()  # every result is a bf16 value
    named = matmul(x, w, "hifi2fp16").numpy()
    assert np.abs(named - (x.double() @ w.double()).numpy()).max() > np.abs(
        matmul(x, w, "hifi2").numpy() - (x.double() @ w.double()).numpy()
    ).max()


def test_bf16_dest_chunking_does_not_change_results(monkeypatch):
    x, w = small_ints((2, 40, 256), 5, 0, 9, 0.5), small_ints((256, 70), 6, -2, 9, 0.25)
    wb = small_ints((3, 1, 256, 70), 7, -2, 9, 0.25)  # batched weights: [3, 2] batch
    whole, whole_b = matmul(x, w, "hifi2na"), matmul(x, wb, Fidelity(3, False, False, True))
    monkeypatch.setattr(fidelity, "_PARTIAL_BUDGET", 8 * 64)  # forces many batch / N chunks
    assert torch.equal(matmul(x, w, "hifi2na"), whole)
    assert torch.equal(matmul(x, wb, Fidelity(3, False, False, True)), whole_b)
    assert whole_b.shape == (3, 2, 40, 70)


def test_packer_l1_accumulation_over_k_blocks():
    x = small_ints((8, 512), 7, 0, 9, 0.5)
    w = small_ints((512, 24), 8, -3, 9, 0.25)
    xn, wn = x.numpy(), w.numpy()
    # bf16 dest, L1 accumulation on: each 128-wide block from 0, then bf16 L1 adds
    got = matmul(x, w, "hifi2fp16", k_block=128).numpy()
    assert np.array_equal(got, tile_loop_ref(xn, wn, 2, k_block=128, l1=True))
    assert not np.array_equal(got, matmul(x, w, "hifi2fp16").numpy())
    # L1 accumulation off: partials stay in dest, so the K blocking changes nothing
    assert torch.equal(matmul(x, w, "hifi2na", k_block=128), matmul(x, w, "hifi2na"))
    # fp32 dest with L1 on: block results summed in the output format
    got32 = matmul(x, w, "hifi2", k_block=128).numpy()
    blocks = [matmul(x[:, k : k + 128], w[k : k + 128], fp32_dest(2)).numpy() for k in range(0, 512, 128)]
    acc = bf16(blocks[0])
    for b in blocks[1:]:
        acc = bf16(acc + b)
    assert np.array_equal(got32, acc)
    # a bfp8 output buffer rounds the L1 partials to bfp8 (device rounding)
    got8 = matmul(x, w, "hifi2", k_block=128, out_fmt="bfp8")
    assert torch.equal(quantize(got8, "bfp8", "device"), got8)
    with pytest.raises(ValueError, match="multiple of 32"):
        matmul(x, w, "hifi2", k_block=100)


def test_batched_shapes():
    x, w = rand_bf16((2, 3, 5, 64), 9), rand_bf16((64, 7), 10)
    for s in ("lofi", "hifi2", "hifi2na", HIFI3, "hifi4"):
        y = matmul(x, w, s)
        assert y.shape == (2, 3, 5, 7)
        assert torch.equal(y[1, 2], matmul(x[1, 2], w, s))
    wb = rand_bf16((3, 64, 7), 11)
    for s in ("hifi2", "hifi2na"):
        y = matmul(x, wb, s)
        assert y.shape == (2, 3, 5, 7)
        assert torch.equal(y[1, 2], matmul(x[1, 2], wb[2], s))
    assert matmul(torch.ones(64), w, "hifi4").shape == (7,)


# --------------------------------------------------------------------------------------------
# SFPU exp / reciprocal
# --------------------------------------------------------------------------------------------


def test_exp_exact_and_approx():
    v = torch.linspace(-42, 88, 200001)
    assert torch.equal(exp(v, False), torch.exp(v))
    assert torch.equal(exp(v, "hifi4"), torch.exp(v))  # approx off
    approx = exp(v, "hifi2")  # approx on
    rel = (approx.double() - torch.exp(v.double())) / torch.exp(v.double())
    assert 0.05 < rel.abs().max() <= 0.0616  # the documented 6.15 %
    assert rel.min() > -1e-4
    assert exp(torch.tensor([0.0]), True).item() == 1.0
    edge = exp(torch.tensor([89.0, 100.0, -42.5, -1000.0, math.nan]), True)
    assert edge[:2].isinf().all() and (edge[2:4] == 0).all() and edge[4].isnan()


def test_recip_exact_and_approx():
    v = torch.exp(torch.linspace(-30, 30, 100001))
    v = torch.cat([v, -v])
    assert torch.equal(recip(v, False), torch.reciprocal(v))
    rel = (recip(v, True).double() * v.double()) - 1
    assert 0.03 < rel.abs().max() <= 0.0385
    assert torch.equal(recip(-v, True), -recip(v, True))
    assert recip(torch.tensor([0.0]), True).item() == math.inf
