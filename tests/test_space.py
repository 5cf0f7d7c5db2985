"""Study files (sweep.space): the shipped studies, space sizes, per-layer spaces, coupling, and
every kind of bad file failing before anything is written."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.vocab.config import DEFAULT, NATURAL, Config, ModelConfig, accuracy
from sweep.cli import main as cli_main
from sweep.space import StudyFileError, load_spec, parse_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "studies"
sys.path.insert(0, str(Path(__file__).parent / "data"))
from synthetic_study import lt_pareto_configs  # noqa: E402  (the seed's 12 configs, in order)

TINY = """
[study]
model = "tiny-llama"
devices = ["N150", "N300"]
[eval]
prefill = 16
decode = 15
"""


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --- the shipped studies --------------------------------------------------------------------------
def test_lt_pareto_is_the_seed_sweep():
    spec = load_spec(STUDIES / "lt-pareto.toml", n_layers=30)
    assert spec.name == "lt-pareto" and spec.model == "smollm2-135m"
    assert spec.devices == ["N150"] and spec.primary == "N150"  # SmolLM2's 9 heads do not split over 2 chips
    assert spec.eval == {"prefill": 512, "decode": 511, "windows": 1}
    assert spec.perf == {"batch": 1, "prefill": 128, "decode": 200, "dp": 1}
    assert spec.is_grid and spec.space.size == 13  # the seed's 12 + the accuracy preset (by name)
    got = [str(mc) for _, mc in spec.space.grid()]
    assert got[:12] == [str(ModelConfig.uniform(c, 30)) for c in lt_pareto_configs()]
    assert got[12] == str(accuracy("smollm2-135m"))
    assert spec.storage == f"journal:{STUDIES / '.runs' / 'lt-pareto.log'}"


def test_mlp_attention_grid_size_and_natural_fidelity():
    spec = load_spec(STUDIES / "mlp-attention-grid.toml", n_layers=30)
    assert spec.space.size == 3**4 * 3 * 3 == 729
    configs = [mc.base for _, mc in spec.space.grid()]
    assert len(set(configs)) == 729
    for c in configs:
        assert c.li_ff1_3.value == NATURAL[c.ff1_3.value] and c.li_ff2.value == NATURAL[c.ff2.value]
        assert c.li_qkv_decode.value == c.li_qkv_prefill.value == NATURAL[c.wqkv.value]
        assert c.li_o_decode.value == c.li_o_prefill.value == NATURAL[c.wo.value]
        assert (c.sdpa_decode, c.sdpa_prefill) == (DEFAULT.sdpa_decode, DEFAULT.sdpa_prefill)
    assert {c.kv_cache.value for c in configs} == {"bfp4", "bfp8", "bf16"}
    assert {c.activation for c in configs} == {None, DEFAULT.replace(activation="bf16").activation,
                                                DEFAULT.replace(activation="bfp8").activation}


def test_nsga2_full_has_every_group_and_hifi3():
    spec = load_spec(STUDIES / "nsga2-full.toml", n_layers=30)
    assert spec.sampler.kind == "nsga2" and spec.sampler.n_trials >= 100
    assert spec.space.size == 3**6 * 7**8
    assert {p.name for p in spec.space.params} == set(Config().__dataclass_fields__)
    assert all("hifi3" in p.choices for p in spec.space.params if p.name.startswith(("li_", "sdpa")))
    assert [c.key for c in spec.constraints] == ["top1>=85"]


def test_shipped_studies_validate_the_model_name():
    pytest.importorskip("engine.models.loaders")
    try:
        spec = load_spec(STUDIES / "lt-pareto.toml")
    except StudyFileError as exc:  # the optional SmolLM2 wheel is missing
        pytest.skip(str(exc))
    assert spec.n_layers == 30


def test_spec_round_trips_through_its_dict():
    for f in ("lt-pareto", "mlp-attention-grid", "nsga2-full"):
        spec = load_spec(STUDIES / f"{f}.toml", n_layers=30)
        d = spec.to_dict()
        json.dumps(d)
        again = spec_from_dict(json.loads(json.dumps(d)))
        assert again.to_dict() == d
        assert again.space.size == spec.space.size


def test_defaults(tmp_path):
    spec = load_spec(write(tmp_path, TINY + '[space]\nff1_3 = ["bfp4", "bfp8"]\n'))
    assert spec.name == "s" and spec.n_layers == 2
    assert spec.objectives == ["top1", "top5", "speed:N150", "ttft:N150"]
    assert spec.directions == ["maximize", "maximize", "maximize", "minimize"]
    assert spec.sampler.kind == "grid" and spec.space.size == 2
    assert spec.storage == f"journal:{tmp_path / '.runs' / 's.log'}"
    assert spec.perf == {"batch": 1, "prefill": 128, "decode": 200, "dp": 1}


def test_storage_forms(tmp_path):
    base = TINY + '[space]\nff1_3 = ["bfp4", "bfp8"]\n'
    spec = load_spec(write(tmp_path, base.replace('devices', 'storage = "journal:runs/x.log"\ndevices')))
    assert spec.storage == f"journal:{tmp_path / 'runs' / 'x.log'}"
    spec = load_spec(write(tmp_path, base.replace('devices', 'storage = "sqlite:///x.db"\ndevices')))
    assert spec.storage == "sqlite:///x.db"
    spec = load_spec(write(tmp_path, base), storage="postgresql://u@h/db")
    assert spec.storage == "postgresql://u@h/db"


# --- space sizes, fixed values, coupling, per-layer spaces ---------------------------------------------
def test_fixed_values_and_size(tmp_path):
    spec = load_spec(write(tmp_path, TINY + """
[space]
ff1_3 = ["bfp4", "bfp8", "bf16"]
ff2 = "bf16"
li_ff2 = ["hifi4"]
activation = ["mixed", "bf16"]
li_o_prefill = ["lofi", "hifi2", "hifi4"]
"""))
    assert spec.space.size == 3 * 2 * 3
    assert [p.name for p in spec.space.params] == ["ff1_3", "activation", "li_o_prefill"]
    for _, mc in spec.space.grid():
        assert mc.base.ff2.value == "bf16" and mc.base.li_ff2.value == "hifi4"
    assert len(list(spec.space.grid())) == 18


def test_coupling_sets_the_natural_fidelity(tmp_path):
    spec = load_spec(write(tmp_path, TINY + """
[space]
ff1_3 = ["bfp4", "bfp8", "bf16"]
wqkv = ["bfp4", "bf16"]
couple = { ff1_3 = "li_ff1_3", wqkv = ["li_qkv_decode", "li_qkv_prefill"] }
[space.natural]
bf16 = "hifi3"
"""))
    assert spec.space.size == 6
    for params, mc in spec.space.grid():
        c = mc.base
        assert c.li_ff1_3.value == {"bfp4": "lofi", "bfp8": "hifi2", "bf16": "hifi3"}[params["ff1_3"]]
        assert c.li_qkv_decode.value == c.li_qkv_prefill.value == {"bfp4": "lofi", "bf16": "hifi3"}[params["wqkv"]]
        assert c.li_ff2 == DEFAULT.li_ff2


def test_per_layer_space_first_and_last(tmp_path):
    spec = load_spec(write(tmp_path, TINY + """
[space]
ff1_3 = ["bfp4", "bfp8", "bf16"]
ff2 = ["bfp4", "bfp8"]
couple = { ff1_3 = "li_ff1_3" }
[space.layers]
first = 1
last = 2
groups = ["ff1_3"]
"""), n_layers=6)
    names = [p.name for p in spec.space.params]
    assert names == ["ff1_3", "ff2", "L0.ff1_3", "L4.ff1_3", "L5.ff1_3"]
    assert spec.space.size == 3**4 * 2
    params = {"ff1_3": "bfp8", "ff2": "bfp4", "L0.ff1_3": "bfp4", "L4.ff1_3": "bf16", "L5.ff1_3": "bfp8"}
    mc = spec.space.config(params)
    assert [c.ff1_3.value for c in mc.layers] == ["bfp4", "bfp8", "bfp8", "bfp8", "bf16", "bfp8"]
    assert [c.li_ff1_3.value for c in mc.layers] == ["lofi", "hifi2", "hifi2", "hifi2", "hifi4", "hifi2"]
    assert all(c.ff2.value == "bfp4" for c in mc.layers)
    assert ModelConfig.parse(str(mc), 6) == mc
    assert spec.space.params_of(mc) == params


def test_per_layer_space_covering_every_layer(tmp_path):
    spec = load_spec(write(tmp_path, TINY + '[space]\nff2 = ["bfp4", "bfp8"]\n[space.layers]\nfirst = 1\nlast = 1\n'))
    assert [p.name for p in spec.space.params] == ["L0.ff2", "L1.ff2"]  # tiny-llama has 2 layers
    assert spec.space.size == 4


def test_explicit_per_layer_configs(tmp_path):
    a = ModelConfig((Config(ff1_3="bfp4"), Config()))
    b = ModelConfig((Config(), Config(ff1_3="bf16")))
    spec = load_spec(write(tmp_path, TINY + f"""
[space]
configs = ["{a}", "{b}", "precision_cfg = {{ff2: bfp4}}", "performance"]
"""))
    assert spec.space.size == 4
    got = [mc for _, mc in spec.space.grid()]
    assert got[:2] == [a, b]
    assert got[2] == ModelConfig.uniform(Config(ff2="bfp4"), 2)
    assert {p.name for p in spec.space.params} == {"L0.ff1_3", "L1.ff1_3", "ff2", "li_ff1_3"}


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_params_config_round_trip(data):
    spec = load_spec(STUDIES / "nsga2-full.toml", n_layers=30)
    params = {p.name: data.draw(st.sampled_from(p.choices)) for p in spec.space.params}
    mc = spec.space.config(params)
    assert spec.space.params_of(mc) == params
    assert ModelConfig.parse(str(mc), 30) == mc


# --- bad files: each names the file, the key and the legal values, and writes nothing -----------------
BAD = {
    "malformed": ('[study\nmodel = "tiny-llama"\n', ["not valid TOML"]),
    "unknown top key": (TINY + '[spaces]\nff1_3 = ["bfp4"]\n', ["'spaces'", "study, eval, perf, sampler, constraints, space"]),
    "unknown study key": (TINY.replace("[study]", "[study]\nmodle = 1") + '[space]\nff1_3 = ["bfp4", "bfp8"]\n',
                          ["'study.modle'", "name, model, devices"]),
    "unknown space key": (TINY + '[space]\nff13 = ["bfp4", "bfp8"]\n', ["'space.ff13'", "ff1_3", "li_ff1_3"]),
    "unknown value": (TINY + '[space]\nff1_3 = ["bfp4", "bfp3"]\n', ["space.ff1_3", "'bfp3'", "bfp4, bfp8, bf16"]),
    "unknown fidelity": (TINY + '[space]\nli_ff2 = ["hifi5"]\n', ["space.li_ff2", "'hifi5'", "lofi, hifi2, hifi2na"]),
    "mixed for a weight": (TINY + '[space]\nff2 = ["mixed"]\n', ["space.ff2", "'mixed'"]),
    "empty list": (TINY + '[space]\nff1_3 = []\n', ["space.ff1_3", "empty", "bfp4, bfp8, bf16"]),
    "empty space": (TINY + '[space]\n', ["[space] is empty", "ff1_3"]),
    "no space": (TINY, ["missing [space]"]),
    "empty configs": (TINY + '[space]\nconfigs = []\n', ["space.configs is empty"]),
    "bad config string": (TINY + '[space]\nconfigs = ["precision_cfg = {ff1_3: bfp5}"]\n', ["space.configs[0]", "bfp5", "legal values"]),
    "unknown sampler": (TINY + '[sampler]\nkind = "cmaes"\n[space]\nff1_3 = ["bfp4", "bfp8"]\n', ["sampler.kind", "'cmaes'", "grid, nsga2, tpe, gp"]),
    "sampler key of another kind": (TINY + '[sampler]\nkind = "tpe"\nn_trials = 5\npopulation = 4\n[space]\nff1_3 = ["bfp4", "bfp8"]\n',
                                    ["'sampler.population'", "nsga2", "kind, n_trials, seed, n_startup"]),
    "no budget": (TINY + '[sampler]\nkind = "nsga2"\n[space]\nff1_3 = ["bfp4", "bfp8"]\n', ["sampler.n_trials is required"]),
    "budget for grid": (TINY + '[sampler]\nkind = "grid"\nn_trials = 3\n[space]\nff1_3 = ["bfp4", "bfp8"]\n', ["'sampler.n_trials'", "legal keys: kind"]),
    "unknown device": (TINY.replace('"N300"', '"N400"') + '[space]\nff1_3 = ["bfp4", "bfp8"]\n', ["study.devices", "'N400'", "N150, N300, T3K, TG"]),
    "unknown objective": (TINY.replace("[eval]", 'objectives = ["top1", "latency"]\n[eval]') + '[space]\nff1_3 = ["bfp4", "bfp8"]\n',
                          ["study.objectives", "'latency'", "speed:N150"]),
    "objective device not in study": (TINY.replace("[eval]", 'objectives = ["speed:TG"]\n[eval]') + '[space]\nff1_3 = ["bfp4", "bfp8"]\n',
                                      ["speed:TG", "speed:N150, ttft:N150, speed:N300"]),
    "bad constraint": (TINY + '[[constraints]]\nmetric = "top1"\n[space]\nff1_3 = ["bfp4", "bfp8"]\n', ["constraints[0]", "min and/or max"]),
    "coupled op also free": (TINY + '[space]\nff1_3 = ["bfp4", "bf16"]\nli_ff1_3 = ["lofi", "hifi4"]\ncouple = { ff1_3 = "li_ff1_3" }\n',
                             ["space.li_ff1_3", "coupled"]),
    "unknown model": (TINY.replace("tiny-llama", "tiny-llamma") + '[space]\nff1_3 = ["bfp4", "bfp8"]\n', ["study.model", "'tiny-llamma'", "tiny-llama"]),
    "bad eval": (TINY.replace("prefill = 16", "prefill = -3") + '[space]\nff1_3 = ["bfp4", "bfp8"]\n', ["eval.prefill", ">= 1"]),
    "grid too large": (TINY + "[space]\n" + "".join(f'{k} = ["lofi", "hifi2", "hifi4"]\n' for k in
                       ("li_ff1_3", "li_ff2", "li_qkv_decode", "li_o_decode", "sdpa_decode", "li_qkv_prefill", "li_o_prefill",
                        "sdpa_prefill")) + 'ff1_3 = ["bfp4", "bfp8", "bf16"]\nff2 = ["bfp4", "bfp8", "bf16"]\nwo = ["bfp4", "bfp8", "bf16"]\n',
                       ["too many for kind = 'grid'", "nsga2"]),
    "bad layers group": (TINY + '[space]\nff1_3 = ["bfp4", "bfp8"]\n[space.layers]\nfirst = 1\ngroups = ["ff2"]\n', ["space.layers.groups", "'ff2'", "ff1_3"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_fails_before_anything_is_written(tmp_path, capsys, case):
    text, needles = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(StudyFileError) as exc:
        load_spec(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: "), msg
    for n in needles:
        assert n in msg, (n, msg)
    # through the command line: exit status 2, the same message, and no file besides the study file
    assert cli_main(["run", str(path), "--no-progress"]) == 2
    assert str(path) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["s.toml"]


def test_missing_file_is_an_error(tmp_path, capsys):
    assert cli_main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_parse_spec_accepts_a_dict():
    spec = parse_spec({"study": {"model": "tiny-llama"}, "space": {"ff2": ["bfp4", "bf16"]}}, n_layers=2)
    assert spec.space.size == 2 and spec.devices == ["N150"]
    assert math.prod(len(p.choices) for p in spec.space.params) == 2


def test_a_device_the_model_cannot_be_split_over_is_refused(tmp_path):
    text = (STUDIES / "lt-pareto.toml").read_text().replace('devices = ["N150"]', 'devices = ["N150", "N300"]')
    p = tmp_path / "lt.toml"
    p.write_text(text)
    with pytest.raises(StudyFileError, match=r"N300: tt_transformers cannot split smollm2-135m over 2 chips"):
        load_spec(p)
    assert not (tmp_path / ".runs").exists()
