"""tt-metal releases as numerics profiles (engine.vocab.profiles): the seed profile is today's
numerics bit for bit, the current one applies its rules, study files and the CLI take them."""
from __future__ import annotations

import pytest
import torch

import engine.models.model as em
from engine.models import loaders
from engine.vocab import profiles
from engine.vocab.config import DEFAULT
from sweep.cli import main
from sweep.space import StudyFileError, parse_spec


@pytest.fixture(scope="module")
def tiny():
    return loaders.load("tiny-llama")


def _decode(ld, cfg, rmsnorm: bool = True, **kw):
    from dataclasses import replace

    m = em.Model(ld.spec, ld.weights, **kw)
    if not rmsnorm:
        m.profile = replace(m.profile, rmsnorm_hifi2=False)
    _, cache = m.prefill(torch.arange(3, 40), cfg)
    return m.decode_batched(torch.arange(40, 60), cache, cfg)


def test_the_seed_profile_is_the_default_numerics(tiny):
    assert profiles.profile(None).name == "seed" and em.DEFAULT_SILU == profiles.PROFILES["seed"].silu
    assert torch.equal(_decode(tiny, DEFAULT), _decode(tiny, DEFAULT, profile="seed"))
    with pytest.raises(ValueError, match="legal: seed, current"):
        profiles.profile("2027")


def test_the_current_profile_rounds_s_minus_max_only_with_a_16_bit_dest(tiny):
    """Isolate the SDPA rule: same SiLU, packing and RMSNorm in both profiles."""
    same = {"silu": "exact", "assumptions": {"bfp_pack": "precise"}, "rmsnorm": False}
    dest16 = DEFAULT.replace(sdpa_decode="hifi2na", sdpa_prefill="hifi2na")
    fp32 = DEFAULT.replace(sdpa_decode="hifi4", sdpa_prefill="hifi4")
    assert not torch.equal(_decode(tiny, dest16, profile="current", **same), _decode(tiny, dest16, **same))
    assert torch.equal(_decode(tiny, fp32, profile="current", **same), _decode(tiny, fp32, **same))


def test_the_current_profile_sets_silu_and_packing(tiny):
    m = em.Model(tiny.spec, tiny.weights, profile="current")
    assert m.silu is em.fidelity.silu_fn("exact") and m.pack[0] == "packer"
    assert em.Model(tiny.spec, tiny.weights, profile="current", silu="sfpu-piecewise").silu is em.fidelity.silu_piecewise


STUDY = {"study": {"name": "p", "model": "tiny-llama"}, "space": {"configs": ["defaults"]}}


def test_study_files_name_a_profile():
    spec = parse_spec({**STUDY, "numerics": {"tt_metal": "current"}})
    assert spec.numerics_kwargs()["profile"] == "current"
    with pytest.raises(StudyFileError, match="numerics.tt_metal 'newest'; legal values: seed, current"):
        parse_spec({**STUDY, "numerics": {"tt_metal": "newest"}})


def test_sweep_eval_tt_metal(capsys, tmp_path):
    assert main(["eval", "--model", "tiny-llama", "--tt-metal", "2027", "--cache-dir", str(tmp_path)]) == 2
    assert "legal: seed, current" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-llama", "--tt-metal", "current", "--prefill", "32", "--decode", "31",
                 "--cache-dir", str(tmp_path)]) == 0
    assert "tt-metal profile current" in capsys.readouterr().out


def test_eltwise_mul_multiplies_the_phase_slices():
    """HiFi2 elementwise: SrcB (in1) keeps the hidden one + 6 bits, SrcA (in0) 7 bits; LoFi 6 x 4."""
    from engine.numerics import fidelity

    a = torch.tensor([1.0 + 2**-7, 1.0 + 2**-5 + 2**-7])
    b = torch.tensor([1.0 + 2**-7, 1.0 + 2**-7])
    assert fidelity.eltwise_mul(a, b, "hifi2").tolist() == [1.0 + 2**-7, (1.0 + 2**-5 + 2**-7) * 1.0]
    assert fidelity.eltwise_mul(a, b, "hifi4").tolist() == (a * b).tolist()
    assert fidelity.eltwise_mul(a, b, "lofi").tolist() == [1.0, 1.0]  # SrcA keeps 4 bits: 2^-5 and 2^-7 gone


def test_the_current_profiles_rmsnorm_runs_at_hifi2(tiny):
    """The rule alone moves the output; off, the current profile's norm is the exact fp32 one."""
    from dataclasses import replace

    m = em.Model(tiny.spec, tiny.weights, profile="current")
    on = m.prefill(torch.arange(3, 40), DEFAULT, logits_for="all")[0]
    m.profile = replace(m.profile, rmsnorm_hifi2=False)
    off = m.prefill(torch.arange(3, 40), DEFAULT, logits_for="all")[0]
    assert not torch.equal(on, off)
    x = torch.randn(4, 64).to(torch.bfloat16).float()
    w = torch.ones(64)
    exact = em._rms_norm(x, w, 1e-5, "fp32")
    tt = em._rms_norm(x, w, 1e-5, "bf16", hifi2=True)
    assert torch.allclose(tt, exact, rtol=2**-6) and not torch.equal(tt, em._rms_norm(x, w, 1e-5, "bf16"))
