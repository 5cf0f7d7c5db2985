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


def _decode(ld, cfg, **kw):
    m = em.Model(ld.spec, ld.weights, **kw)
    _, cache = m.prefill(torch.arange(3, 40), cfg)
    return m.decode_batched(torch.arange(40, 60), cache, cfg)


def test_the_seed_profile_is_the_default_numerics(tiny):
    assert profiles.profile(None).name == "seed" and em.DEFAULT_SILU == profiles.PROFILES["seed"].silu
    assert torch.equal(_decode(tiny, DEFAULT), _decode(tiny, DEFAULT, profile="seed"))
    with pytest.raises(ValueError, match="legal: seed, current"):
        profiles.profile("2027")


def test_the_current_profile_rounds_s_minus_max_only_with_a_16_bit_dest(tiny):
    """Isolate the SDPA rule: same SiLU and packing in both profiles."""
    same = {"silu": "exact", "assumptions": {"bfp_pack": "precise"}}
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
