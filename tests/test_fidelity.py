"""engine.numerics.fidelity: phase slices, dest accumulation, the setting table and the SFPU functions."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.numerics import fidelity
from engine.numerics.fidelity import EXACT, SETTINGS, Fidelity, exp, matmul, recip, resolve

HIFI3 = SETTINGS["hifi3"].kernel
from engine.numerics.formats import quantize


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


def phase_ref(x: np.ndarray, w: np.ndarray, p: int):
    """Phase p's (SrcB, SrcA) slices, from the ISA's SrcA/SrcBFidelityBits, written independently."""
    xh, x7, wh, w7 = trunc(x, 6), trunc(x, 7), trunc(w, 4), trunc(w, 7)
    return (xh if p < 2 else x7 - xh), (wh if p % 2 == 0 else w7 - wh)


def mvmul_ref(x, w, phases, k_block=None, l1=False, part_round=bf16, init=None):
    """The literal hardware walk with a 16-bit dest, in float64 partials: per K block, dest starts at
    0 (or the reloaded partial); per 32-wide tile, per phase (outer), per 16-wide slice (one MVMUL):
    dest <- bf16(dest + sum of the slice's 16 products). Blocks: packer L1 acc adds blocks 0..n-2
    into L1 (part_round) and the last block reloads it; without it each block reloads the spilled
    partial (part_round)."""
    K = x.shape[-1]
    kb = K if k_block is None else k_block
    starts = list(range(0, K, kb))
    l1 = l1 and len(starts) > 1
    acc = init
    for i, k0 in enumerate(starts):
        last = i == len(starts) - 1
        dest = np.zeros((x.shape[0], w.shape[1]), np.float32) if (l1 and not last) or acc is None else acc.copy()
        for t in range(k0, min(K, k0 + kb), 32):
            for p in range(phases):
                xs, ws = phase_ref(x, w, p)
                for s0 in (t, t + 16):
                    part = xs[:, s0:s0 + 16].astype(np.float64) @ ws[s0:s0 + 16].astype(np.float64)
                    dest = bf16(dest + part.astype(np.float32))
        if l1 and not last:
            acc = part_round(dest if acc is None else acc + dest)
        else:
            acc = dest if last else part_round(dest)
    return acc


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
    """tt_transformers' ModelArgs compute-kernel configs per name (docs/NUMERICS.md)."""
    tt = {n: s.kernel for n, s in SETTINGS.items() if s.tt_metal}
    assert tt == {
        "lofi": Fidelity(1, False, False, True),
        "hifi2": Fidelity(2, True, True, True),
        "hifi2na": Fidelity(2, False, False, False),
        "hifi2fp16": Fidelity(2, False, False, True),
        "hifi4": Fidelity(4, False, True, True),
        "hifi4fp32": Fidelity(4, True, True, True),
    }
    assert HIFI3 == Fidelity(3, False, True, True) and not SETTINGS["hifi3"].tt_metal
    assert resolve("exact") is EXACT and EXACT.phases == 0 and EXACT.fp32_dest
    assert resolve(SETTINGS["lofi"].kernel) is SETTINGS["lofi"].kernel


def test_resolve_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"'hifi5'.*lofi, hifi2, hifi2na, hifi2fp16, hifi3, hifi4, hifi4fp32, exact"):
        resolve("hifi5")
    with pytest.raises(ValueError, match="phases"):
        Fidelity(5, False, True, True)
    with pytest.raises(ValueError, match="fp32_dest"):
        Fidelity(2, False, 1, True)


def test_resolve_accepts_config_enum():
    from engine.vocab.config import FidelitySetting

    for member in FidelitySetting:
        assert isinstance(resolve(member), Fidelity)
    assert resolve(FidelitySetting.HIFI2_FP16) == SETTINGS["hifi2fp16"].kernel


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
    assert one(2.0**100, -1e-39, SETTINGS["hifi2"].kernel) == 0.0
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
def test_bf16_dest_equals_literal_mvmul_walk(phases):
    x = small_ints((12, 1024), 1, 0, 9, 0.5)  # non-negative: the running sum grows past bf16
    w = small_ints((1024, 20), 2, -3, 9, 0.25)
    got = matmul(x, w, bf16_dest(phases)).numpy()
    assert np.array_equal(got, mvmul_ref(x.numpy(), w.numpy(), phases))
    exact = matmul(x, w, fp32_dest(phases)).numpy()
    assert not np.array_equal(got, exact)  # bf16 dest differs from fp32 dest on long K


def test_bf16_dest_rounds_per_mvmul_slice_not_per_tile():
    """Hand-built, one 32-wide tile, x = 1: w = 1 at k=0, 2^-8 at k=1 and at k=16 (powers of two, so
    only phase 0 is non-zero). Per 16-wide MVMUL: bf16(1 + 2^-8) = 1 (a tie, to even), twice -> 1.
    One rounding per tile would give bf16(1 + 2^-7) = 1.0078125."""
    x = torch.ones(1, 32)
    w = torch.zeros(32, 1)
    w[0, 0], w[1, 0], w[16, 0] = 1.0, 2.0**-8, 2.0**-8
    for phases in (1, 2, 4):
        assert float(matmul(x, w, bf16_dest(phases))[0, 0]) == 1.0
    assert float(torch.tensor(1.0 + 2.0**-7).bfloat16()) == 1.0078125  # what per-tile rounding would give
    assert float(matmul(x, w, fp32_dest(2))[0, 0]) == 1.0078125


def test_bf16_dest_phase_loop_is_outer_within_a_tile():
    """Hand-built, HiFi2, x = 1: w[0] = 1 + 3*2^-7 (phase 0 sees 1, phase 1 adds 3*2^-7), w[16] =
    5*2^-8 (phase 0 sees 2^-6 + 2^-8, phase 1 the remaining 2^-8). Phases outer (tt-llk's
    matmul MOP: the fidelity loop around the tile's MVMULs): 1, +(2^-6 + 2^-8), +3*2^-7, +2^-8
    -> 1.0390625; slices outer would give 1.046875."""
    x = torch.ones(1, 32)
    w = torch.zeros(32, 1)
    w[0, 0], w[16, 0] = 1.0234375, 0.01953125
    assert float(matmul(x, w, bf16_dest(2))[0, 0]) == 1.0390625
    assert mvmul_ref(x.numpy(), w.numpy(), 2)[0, 0] == 1.0390625


def test_bf16_dest_on_random_data_and_ragged_k():
    x, w = rand_bf16((9, 1000), 3), rand_bf16((1000, 33), 4)
    for phases in (1, 2, 3, 4):
        got = matmul(x, w, bf16_dest(phases)).numpy()
        ref = mvmul_ref(x.numpy(), w.numpy(), phases)
        # the 16-product partials may round differently in fp32 (float64 here), then bf16 may flip an ulp
        assert np.allclose(got, ref, rtol=2**-7, atol=1e-2)
        assert (got == bf16(got)).all()  # every result is a bf16 value
    named = matmul(x, w, "hifi2fp16").numpy()
    assert np.abs(named - (x.double() @ w.double()).numpy()).max() > np.abs(
        matmul(x, w, "hifi2").numpy() - (x.double() @ w.double()).numpy()
    ).max()


def test_compiled_kernel_equals_torch_walk(monkeypatch):
    """kernels/dest16.c and the torch fallback compute the same bits (random bf16 data, batched
    weights, init partials, ragged K)."""
    from engine.numerics import native

    x, w = rand_bf16((2, 3, 37, 150), 12), rand_bf16((3, 150, 70), 13)
    runs = {}
    for native_on in (True, False):
        if not native_on:
            monkeypatch.setenv("TTSWEEP_NO_NATIVE", "1")
        native._lib.cache_clear()
        runs[native_on] = [matmul(x, w, s, kb) for s in ("lofi", "hifi2na", "hifi2fp16", bf16_dest(3), bf16_dest(4))
                           for kb in (None, 32, 64)]
    native._lib.cache_clear()
    assert native.dest16() is None  # TTSWEEP_NO_NATIVE still set: the fallback really ran
    monkeypatch.delenv("TTSWEEP_NO_NATIVE")
    native._lib.cache_clear()
    if native.dest16() is None:
        pytest.skip("no C compiler: the compiled kernel cannot be checked")
    assert all(torch.equal(a, b) for a, b in zip(runs[True], runs[False]))


def test_k_blocks_with_and_without_packer_l1_accumulation():
    x = small_ints((8, 512), 7, 0, 9, 0.5)
    w = small_ints((512, 24), 8, -3, 9, 0.25)
    xn, wn = x.numpy(), w.numpy()
    # bf16 dest, L1 accumulation on: blocks 0..2 from 0, added in Float16_b; the last reloads
    got = matmul(x, w, "hifi2fp16", k_block=128).numpy()
    assert np.array_equal(got, mvmul_ref(xn, wn, 2, k_block=128, l1=True))
    assert not np.array_equal(got, matmul(x, w, "hifi2fp16").numpy())
    # L1 accumulation off, bf16 partials (bf16 output): reloading a bf16 dest is exact, so the
    # blocking changes nothing
    assert torch.equal(matmul(x, w, "hifi2na", k_block=128), matmul(x, w, "hifi2na"))
    # fp32 dest with L1 on: blocks add in Float32 = one fp32 sum
    assert torch.allclose(matmul(x, w, "hifi2", k_block=128), matmul(x, w, "hifi2"), rtol=0, atol=0)
    # the DRAM-sharded override: Float16_b partials even with an fp32 dest
    got16 = matmul(x, w, "hifi2", k_block=128, interm="bf16").numpy()
    blocks = [matmul(x[:, k:k + 128], w[k:k + 128], fp32_dest(2)).numpy() for k in range(0, 512, 128)]
    acc = bf16(blocks[0])
    for b in blocks[1:-1]:
        acc = bf16(acc + b)
    assert np.array_equal(got16, acc + blocks[-1])  # the last block accumulates on the reloaded partial in fp32
    with pytest.raises(ValueError, match="multiple of 32"):
        matmul(x, w, "hifi2", k_block=100)


def test_spill_without_l1_accumulation_uses_the_output_format():
    """hifi2na (16-bit dest, no packer L1 acc): each block's partial spills in the output format and is
    reloaded; a bfp8 output makes bfp8 partials (the program factory's interm0 = output format)."""
    x, w = rand_bf16((8, 256), 14), rand_bf16((256, 32), 15)
    q8 = lambda a: quantize(torch.from_numpy(np.asarray(a, np.float32)), "bfp8", "device").numpy()  # noqa: E731
    got = matmul(x, w, "hifi2na", k_block=64, out_fmt="bfp8").numpy()
    ref = mvmul_ref(x.numpy(), w.numpy(), 2, k_block=64, l1=False, part_round=q8)
    assert np.allclose(got, ref, rtol=2**-7, atol=1e-2) and np.mean(got == ref) > 0.98
    assert not np.array_equal(got, matmul(x, w, "hifi2na", k_block=64).numpy())  # bf16 partials differ
    assert fidelity.partials_format(SETTINGS["hifi2na"].kernel, 4, "bfp8") == "bfp8"
    assert fidelity.partials_format(Fidelity(2, False, True, False), 4, "bfp8") == "fp32"
    assert fidelity.partials_format(SETTINGS["lofi"].kernel, 4, "bfp8") == "bf16"
    assert fidelity.partials_format(SETTINGS["hifi4"].kernel, 4, "bfp8") == "fp32"
    assert fidelity.partials_format(SETTINGS["hifi4"].kernel, 4, "bfp8", interm="bf16") == "bf16"


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
