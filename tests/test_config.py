"""Config vocabulary, config strings (the seed's section headers), presets and tt-metal decoder JSON."""
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.vocab.config import (
    DEFAULT,
    REFERENCE,
    Config,
    ConfigError,
    FidelitySetting,
    ModelConfig,
    OpGroup,
    Precision,
    TensorGroup,
    accuracy,
    performance,
    resolve,
)

SEED = Path(__file__).resolve().parents[1] / "reference" / "PERF-seed.md"
SEED_HEADERS = [line[3:].rstrip("\n") for line in SEED.read_text().splitlines(True) if line.startswith("## precision_cfg")]


def test_enum_values_are_tt_metal_vocabulary():
    assert [g.value for g in TensorGroup] == ["ff1_3", "ff2", "wqkv", "wo", "kv_cache", "activation"]
    assert [o.value for o in OpGroup] == [
        "li_ff1_3", "li_ff2", "li_qkv_decode", "li_o_decode", "sdpa_decode",
        "li_qkv_prefill", "li_o_prefill", "sdpa_prefill",
    ]
    assert {f.name: f.value for f in FidelitySetting if f.value not in ("hifi3", "exact")} == {
        "LOFI": "lofi", "HIFI2": "hifi2", "HIFI2_NA": "hifi2na", "HIFI2_FP16": "hifi2fp16",
        "HIFI4": "hifi4", "HIFI4_FP32": "hifi4fp32",
    }


def test_default_header_is_the_seed_default():
    assert str(DEFAULT) == (
        "precision_cfg = {ff1_3: bfp8, ff2: bfp8, wqkv: bfp8, wo: bfp8, kv_cache: bfp8, activation: mixed}, "
        "fidelity_cfg = {li_ff1_3: hifi2, li_ff2: hifi2, li_qkv_decode: hifi2, li_o_decode: hifi2, "
        "sdpa_decode: hifi2na, li_qkv_prefill: hifi2, li_o_prefill: hifi2fp16, sdpa_prefill: hifi4}"
    )


def test_all_twelve_seed_headers_round_trip():
    assert len(SEED_HEADERS) == 12
    for header in SEED_HEADERS:
        assert str(Config.parse(header)) == header


def test_partial_string_is_a_diff_over_defaults():
    cfg = Config.parse("precision_cfg = {ff1_3: bfp4}, fidelity_cfg = {li_ff1_3: lofi}")
    assert cfg == DEFAULT.replace(ff1_3="bfp4", li_ff1_3="lofi")
    assert cfg.diff() == "precision_cfg = {ff1_3: bfp4}, fidelity_cfg = {li_ff1_3: lofi}"
    assert Config.parse("wo: bfp4, li_o_decode=lofi") == DEFAULT.replace(wo="bfp4", li_o_decode="lofi")
    assert Config.parse("activation: bf16").activation is Precision.BF16
    assert Config.parse("activation: mixed").activation is None


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("ff1_3: bfp5", "bfp5"),
        ("precision_cfg = {ff9: bfp4}", "ff9"),
        ("fidelity_cfg = {li_ff1_3: hifi5}", "hifi5"),
        ("wo: mixed", "mixed"),
        ("garbage", "garbage"),
        ("precision_cfg = {ff1_3: bfp4", "brace"),
        ("ff1_3: bfp4, ff1_3: bfp8", "twice"),
        ("fidelity_cfg = {ff1_3: bfp4}", "ff1_3"),
    ],
)
def test_bad_strings_name_the_bad_token(bad, needle):
    with pytest.raises(ConfigError) as err:
        Config.parse(bad)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_unknown_value_lists_legal_values():
    with pytest.raises(ConfigError, match="bfp4, bfp8, bf16"):
        Config.parse("ff2: int8")


def test_presets_per_model():
    perf = performance("Llama3.2-1B")
    assert perf.diff() == "precision_cfg = {ff1_3: bfp4}, fidelity_cfg = {li_ff1_3: lofi}"
    qwen = performance("Qwen2.5-7B")
    assert qwen.wqkv is Precision.BF16 and qwen.kv_cache is Precision.BF16 and qwen.ff1_3 is Precision.BFP8
    assert all(qwen.fidelity(o) is FidelitySetting.HIFI4 for o in OpGroup if "ff" not in o.value)
    acc = accuracy("Llama3.1-8B")
    assert acc.li_ff1_3 is FidelitySetting.HIFI2_FP16 and acc.li_ff2 is FidelitySetting.HIFI2_FP16
    assert acc.ff1_3 is Precision.BFP8
    assert accuracy("Llama3.1-70B") == perf
    assert accuracy("Qwen2.5-72B") == perf
    other = accuracy("smollm2-135m")
    assert other.wo is Precision.BF16 and other.sdpa_decode is FidelitySetting.HIFI4
    assert resolve("performance", "Llama3.2-1B") == perf
    assert resolve("reference") == REFERENCE


def test_decoder_json_uses_member_names_and_round_trips():
    perf = performance("x")
    mc = ModelConfig((DEFAULT, DEFAULT, perf))
    data = mc.to_decoder_json(full=False)
    assert data == {"decoders": {"2": perf.to_tt()}}
    assert data["decoders"]["2"]["precision_cfg"]["FF1_FF3"] == "BFP4"
    assert data["decoders"]["2"]["fidelity_cfg"]["SDPA_DECODE"] == "HIFI2_NA"
    assert "ACTIVATION" not in data["decoders"]["2"]["precision_cfg"]  # mixed = tt-metal's None
    text = json.dumps(mc.to_decoder_json())
    assert ModelConfig.from_decoder_json(text, 3) == mc
    tt_example = {"decoders": {"31": {"precision_cfg": {"FF1_FF3": "BFP8"}, "fidelity_cfg": {"LI_FF1_FF3": "LOFI"}}}}
    mc32 = ModelConfig.from_decoder_json(tt_example, 32, base=perf)
    assert mc32[31] == perf.replace(ff1_3="bfp8") and mc32[0] == perf


def test_decoder_json_errors():
    with pytest.raises(ConfigError, match="decoders"):
        ModelConfig.from_decoder_json({"layers": {}}, 4)
    with pytest.raises(ConfigError, match="out of range"):
        ModelConfig.from_decoder_json({"decoders": {"9": {}}}, 4)
    with pytest.raises(ConfigError, match="FF7"):
        ModelConfig.from_decoder_json({"decoders": {"0": {"precision_cfg": {"FF7": "BFP8"}}}}, 4)
    with pytest.raises(ConfigError, match="no tt-metal"):
        REFERENCE.to_tt()


def test_model_config_string_round_trip():
    perf = performance("x")
    mc = ModelConfig((perf, DEFAULT, perf, perf.replace(wo="bfp4")))
    s = str(mc)
    assert s.startswith(str(perf) + "; decoders = {")
    assert ModelConfig.parse(s, 4) == mc
    assert str(ModelConfig.uniform(perf, 4)) == str(perf)
    assert re.search(r"decoders = \{1: ", s)


configs = st.builds(
    Config,
    **{g.value: st.sampled_from([Precision.BFP4, Precision.BFP8, Precision.BF16]) for g in TensorGroup if g.value != "activation"},
    activation=st.sampled_from([None, Precision.BF16, Precision.BFP8]),
    **{o.value: st.sampled_from(list(FidelitySetting)) for o in OpGroup},
)


@settings(max_examples=200, deadline=None)
@given(configs, configs)
def test_property_string_and_diff_round_trip(cfg, base):
    assert Config.parse(str(cfg)) == cfg
    assert Config.parse(cfg.diff(base), base) == cfg
    assert hash(Config.parse(str(cfg))) == hash(cfg)


# --- presets as tt_transformers' ModelOptimizations / parse_decoder_json define them ---------------
def test_70b_class_is_matched_by_exact_base_name():
    from engine.vocab.config import is_70b_class

    for name in ("Llama3.1-70B", "Llama-3.1-70B-Instruct", "Llama3.2-90B", "Llama-3.2-90B-Vision-Instruct",
                 "Qwen2.5-72B", "DeepSeek-R1-Distill-Llama-70B"):
        assert is_70b_class(name), name
    for name in ("Llama-3.3-70B", "Llama3.1-8B", "my-70b-finetune", "Qwen2.5-7B"):
        assert not is_70b_class(name), name  # a substring match would take the first and third


def test_phi3_mini_prefill_qkv_hifi2fp16_in_both_presets():
    from engine.vocab.config import accuracy, performance

    for preset in (accuracy, performance):
        assert preset("Phi-3-mini-128k-instruct").li_qkv_prefill.value == "hifi2fp16"
        assert preset("Llama3.1-8B").li_qkv_prefill.value == "hifi2"


def test_decoder_json_parts_start_from_the_defaults():
    from engine.vocab.config import DEFAULT, Config, ModelConfig, performance

    perf = performance("Llama3.1-8B")
    entry = {"precision_cfg": {}, "fidelity_cfg": {"LI_FF2": "LOFI"}}
    c = Config.from_tt(entry, perf)
    assert c.ff1_3 == DEFAULT.ff1_3 and c.li_ff1_3 == DEFAULT.li_ff1_3  # given dicts restart from the defaults
    assert c.li_ff2.value == "lofi"
    assert Config.from_tt({}, perf) == perf  # absent dicts keep the preset
    mc = ModelConfig.from_decoder_json({"decoders": {"1": entry}}, 3, perf)
    assert mc.layers[0] == perf == mc.layers[2] and mc.layers[1] == c


def test_shipped_per_layer_preset():
    from engine.vocab.config import DEFAULT, ModelConfig, decoder_preset

    assert decoder_preset("performance", "Llama-3.1-8B-Instruct") is not None
    assert decoder_preset("performance", "Llama3.1-8B") is None  # the seed rows: uniform bfp4 (27.8 vs 24.8 t/s/u)
    assert decoder_preset("performance", "Llama3.2-1B") is None
    mc = ModelConfig.parse("performance", 32, "Llama3.1-8B-Instruct")
    assert mc.layers[0] == DEFAULT  # listed with empty dicts: the defaults, not bfp4 + lofi
    assert mc.layers[31] == DEFAULT.replace(li_ff1_3="hifi2fp16")
    assert ModelConfig.parse("performance", 16, "Llama3.2-1B").is_uniform
