"""`--config PATH`: a tt-metal decoder JSON file (as `ModelConfig.to_decoder_json` writes it) is read
by ModelConfig.parse, so eval, perf and compare re-measure a per-layer allocation from its file."""
import json
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.vocab.config import (
    DECODER_JSON_BASE,
    DEFAULT,
    TT_FIDELITIES,
    TT_PRECISIONS,
    Config,
    ModelConfig,
    OpGroup,
    Precision,
    TensorGroup,
    decoder_json_file,
    performance,
)
from sweep.cli import main

P, D = 16, 15  # tiny-llama: 2 decoder layers

tt_configs = st.builds(
    Config,
    **{g.value: st.sampled_from(TT_PRECISIONS) for g in TensorGroup if g is not TensorGroup.ACTIVATION},
    activation=st.sampled_from([None, *TT_PRECISIONS]),
    **{o.value: st.sampled_from(TT_FIDELITIES) for o in OpGroup},
)


def write(path: Path, mc: ModelConfig | dict) -> str:
    path.write_text(json.dumps(mc.to_decoder_json() if isinstance(mc, ModelConfig) else mc, indent=1))
    return str(path)


#: layer 0 the performance preset, layer 1 bf16 attention with hifi4: per-layer, unlike any preset
MIXED = ModelConfig((performance("x"), DEFAULT.replace(wqkv="bf16", wo="bf16", li_qkv_decode="hifi4", li_o_decode="hifi4")))


@settings(max_examples=60, deadline=None)
@given(st.lists(tt_configs, min_size=1, max_size=6), st.sampled_from(["a.json", "B.JSON", "front_trial_7"]))
def test_round_trip_through_a_file(layers, name):
    """to_decoder_json -> file -> ModelConfig.parse(path) is the original, for any tt-metal-legal layers;
    a file is recognised by a .json suffix (any case) or by existing."""
    mc = ModelConfig(tuple(layers))
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / name, mc)
        assert decoder_json_file(path) == Path(path)
        assert ModelConfig.parse(path, mc.n_layers) == mc
        assert ModelConfig.parse(f"  {path} ", mc.n_layers, "Llama3.1-8B") == mc  # the model name plays no part


def test_unlisted_layers_get_parse_decoder_jsons_default(tmp_path):
    """tt_transformers' parse_decoder_json starts every layer up to the highest index from
    ModelOptimizations.performance("model") (bfp4 FF1/FF3 + LoFi) and keeps it for a missing dict."""
    assert DECODER_JSON_BASE == DEFAULT.replace(ff1_3="bfp4", li_ff1_3="lofi")
    path = write(tmp_path / "d.json", {"decoders": {
        "1": {"precision_cfg": {"FF2": "BF16"}},           # fidelity_cfg absent: the base's
        "3": {"precision_cfg": {}, "fidelity_cfg": {}},    # both given and empty: the defaults
    }})
    mc = ModelConfig.parse(path, 4)
    assert mc[0] == mc[2] == DECODER_JSON_BASE
    assert mc[1] == DEFAULT.replace(ff2="bf16", li_ff1_3="lofi")  # a given precision_cfg restarts from the defaults
    assert mc[3] == DEFAULT


def test_preset_names_and_config_strings_are_never_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "performance").write_text("{}")
    for text in ("performance", "Accuracy", "defaults", "ff1_3: bfp4", "precision_cfg = {ff2: bfp4}", ""):
        assert decoder_json_file(text) is None, text
    assert ModelConfig.parse("performance", 2, "x") == ModelConfig.uniform(performance("x"), 2)
    write(tmp_path / "mine", MIXED)
    assert ModelConfig.parse("mine", 2) == MIXED  # an existing file without a suffix


def _eval(capsys, config: str) -> dict:
    assert main(["eval", "--model", "tiny-llama", "--prefill", str(P), "--decode", str(D), "--config", config,
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_of_a_file_equals_eval_of_its_config_string(tmp_path, capsys):
    from_file = _eval(capsys, write(tmp_path / "mixed.json", MIXED))
    from_text = _eval(capsys, str(MIXED))
    assert "; decoders = {1: " in str(MIXED)
    assert from_file["config"] == from_text["config"] == str(MIXED)
    for key in ("top1", "top5", "kld", "ppl"):
        assert from_file[key] == from_text[key], key
    assert _eval(capsys, "defaults")["kld"] != from_file["kld"]  # the file's layers were applied


def _speed(capsys, config: str, model: str = "tiny-llama") -> float:
    assert main(["perf", "--model", model, "--config", config, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["speed_tsu"]


def test_perf_of_a_file_equals_perf_of_its_config_string(tmp_path, capsys):
    path = write(tmp_path / "mixed.json", MIXED)
    assert _speed(capsys, path) == _speed(capsys, str(MIXED))
    assert _speed(capsys, path) != _speed(capsys, "defaults")
    big = ModelConfig(tuple(performance("x") if i % 3 else DEFAULT.replace(ff2="bf16") for i in range(32)))
    assert _speed(capsys, write(tmp_path / "8b.json", big), "Llama3.1-8B") == _speed(capsys, str(big), "Llama3.1-8B")


def test_perf_reads_an_edited_file_again(tmp_path):
    """The perf parse cache is keyed on the file's bytes: a same-size edit (BFP4 -> BF16 is not, BFP4 ->
    BFP8 is) within the mtime's resolution is still seen."""
    from engine.perf.model import predict

    low = ModelConfig.uniform(DEFAULT.replace(ff1_3="bfp4", ff2="bfp4"), 2)
    high = ModelConfig.uniform(DEFAULT.replace(ff1_3="bfp8", ff2="bfp8"), 2)
    path = tmp_path / "edit.json"
    write(path, low)
    first = predict("tiny-llama", "N150", str(path)).speed_tsu
    size = path.stat().st_size
    write(path, high)
    assert path.stat().st_size == size
    assert predict("tiny-llama", "N150", str(path)).speed_tsu == predict("tiny-llama", "N150", high).speed_tsu
    assert predict("tiny-llama", "N150", high).speed_tsu < first


def test_compare_two_files(tmp_path, capsys):
    a = write(tmp_path / "a.json", MIXED)
    b = write(tmp_path / "b.json", ModelConfig.uniform(DEFAULT, 2))
    assert main(["compare", "--model", "tiny-llama", "--prefill", str(P), "--decode", str(D), "--config", a,
                 "--config", b, "--device", "N150", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["a"]["config"] == str(MIXED) and out["b"]["config"] == str(DEFAULT)
    from engine.perf.model import predict

    for side, mc in (("a", MIXED), ("b", ModelConfig.uniform(DEFAULT, 2))):
        assert out[side]["speed"] == predict("tiny-llama", "N150", mc).speed_tsu
    assert out["a"]["kld"] != out["b"]["kld"]


def test_lowercase_and_emulator_only_values_are_refused(tmp_path):
    """tt-metal reads member names (PrecisionSetting[value]): 'bfp4' or an emulator-only setting would
    fail on the hardware, so they fail here."""
    import pytest

    from engine.vocab.config import ConfigError

    for entry, needle in (({"precision_cfg": {"FF1_FF3": "bfp4"}}, '"bfp4" for FF1_FF3'),
                          ({"precision_cfg": {"WO": "FP32"}}, '"FP32" for WO'),
                          ({"fidelity_cfg": {"LI_FF2": "HIFI3"}}, '"HIFI3" for LI_FF2'),
                          ({"precision_cfg": {"ACTIVATION": None}}, "omit ACTIVATION for mixed")):
        path = write(tmp_path / "v.json", {"decoders": {"0": {}, "1": entry}})
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
            ModelConfig.parse(path, 2)
    assert Precision.FP32 not in TT_PRECISIONS
