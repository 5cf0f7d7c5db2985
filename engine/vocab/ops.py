"""THE table of op numerics (torch-free): for each op of a decoder layer, the weight it reads
(SrcA), its activation operand (SrcB) and output dtypes, its accumulation and how its output is
packed, as tt_transformers runs it (docs/NUMERICS.md cites the code of each row).

The emulated model (engine.models.model) takes every op's output dtype from here, the
equivalence rules (sweep.equivalence) take each op's operands from here, and the performance
model (engine.perf.model) takes the weight each linear reads and its activation bytes from here;
tests/test_op_table.py checks the three against the table and the table against itself (each
op's SrcB is what its producer writes).

Dtype rules (`activation` is a layer's forced activation dtype; None = `mixed`):
* a `forced` operand or output takes the forced activation when there is one, else the dtype in
  the table (the `mixed` column);
* full-precision mode (activation fp32) rounds nothing the config does not govern: every
  activation operand and output is fp32 (`FULL`);
* `held`: the dtype the layer's input is held in (the previous layer's output dtype: bf16 under
  `mixed`); the RMSNorm writes it back in that dtype (models/common/rmsnorm.py keeps the input's).
"""
from __future__ import annotations

from dataclasses import dataclass

FULL = "fp32"
HELD = "held"


@dataclass(frozen=True)
class Op:
    name: str
    fidelity: str | None  # the op group whose fidelity setting the op's matmuls run at (None: not a matmul)
    weight: str | None  # the tensor group read as SrcA (kv_cache: K^T and V of the attention matmuls)
    src_b: str | None  # the activation operand's dtype under `mixed` (HELD: the layer input's dtype)
    src_b_forced: bool  # a forced activation sets the operand
    out: str  # output dtype under `mixed`
    out_forced: bool  # a forced activation sets the output
    producer: str | None  # the op whose output is this op's SrcB
    dram_sharded_decode: bool = False  # decode runs it DRAM-sharded: K-block partials in Float16_b (else the setting's)
    second_src_b: str | None = None  # a second matmul's SrcB (SDPA's P @ V reads the bf16 softmax P)
    modes: tuple[str, ...] = ("prefill", "decode")
    source: str = ""


OPS: dict[str, Op] = {o.name: o for o in (
    Op("norm", None, None, HELD, True, HELD, True, None,
       source="tt/decoder.py: the layer input typecast to the activation dtype; rmsnorm keeps it"),
    Op("li_qkv_prefill", "li_qkv_prefill", "wqkv", HELD, True, "bf16", True, "norm", modes=("prefill",),
       source="tt/attention.py forward_prefill: xqkv_fused dtype=activation or bf16"),
    Op("li_qkv_decode", "li_qkv_decode", "wqkv", HELD, True, "bf16", True, "norm", True, modes=("decode",),
       source="tt/attention.py forward_decode: DRAM-sharded matmul, Float16_b partials"),
    Op("q_prefill", None, None, "bf16", False, "bfp8", True, "li_qkv_prefill", modes=("prefill",),
       source="tt/attention.py forward_prefill: q_heads typecast to activation or bfp8 after RoPE"),
    Op("q_decode", None, None, "bf16", False, "bf16", False, "li_qkv_decode", modes=("decode",),
       source="tt/attention.py forward_decode: Q heads after RoPE, never typecast"),
    Op("sdpa_prefill", "sdpa_prefill", "kv_cache", "bfp8", True, "bfp8", True, "q_prefill", second_src_b="bf16",
       modes=("prefill",), source="sdpa_program_factory: output in Q's dtype"),
    Op("sdpa_decode", "sdpa_decode", "kv_cache", "bf16", False, "bf16", False, "q_decode", second_src_b="bf16",
       modes=("decode",), source="sdpa_decode: output in Q's dtype"),
    Op("li_o_prefill", "li_o_prefill", "wo", "bfp8", True, "bfp8", True, "sdpa_prefill", modes=("prefill",),
       source="tt/attention.py forward_prefill: wo dtype=activation or bfp8"),
    Op("li_o_decode", "li_o_decode", "wo", "bf16", False, "bf16", False, "sdpa_decode", True, modes=("decode",),
       source="tt/attention.py forward_decode: wo dtype=None (the SDPA output's)"),
    Op("li_ff1_3", "li_ff1_3", "ff1_3", HELD, True, "bf16", True, "norm", True,
       source="tt/mlp.py: w1 / w3 dtype=activation or bf16 (decode: DRAM-sharded, Float16_b partials)"),
    Op("silu_mul", None, None, "bf16", True, "bfp8", True, "li_ff1_3",
       source="tt/mlp.py: ttnn.mul(w1_out, w3_out, input_tensor_a_activations=[SILU], dtype=activation or bfp8)"),
    Op("li_ff2", "li_ff2", "ff2", "bfp8", True, "bf16", True, "silu_mul", True,
       source="tt/mlp.py: w2 dtype=activation or bf16"),
    Op("residual", None, None, "bf16", True, "bf16", True, "li_ff2",
       source="tt/decoder.py: the second residual add, dtype=activation or bf16 (the layer's output)"),
)}

#: The ops that read each weight group (what "natural fidelity" couples and the perf model prices).
WEIGHT_OPS: dict[str, tuple[str, ...]] = {}
for _o in OPS.values():
    if _o.weight:
        WEIGHT_OPS.setdefault(_o.weight, ())
        WEIGHT_OPS[_o.weight] += (_o.name,)
del _o


def resolve(dtype: str, forced: bool, activation: str | None, held: str = "bf16") -> str:
    """A table dtype under a layer's activation (None = mixed; "fp32" = full-precision mode)."""
    if activation == FULL:
        return FULL
    if forced and activation is not None:
        return activation
    return held if dtype == HELD else dtype


def out_dtype(op: str, activation: str | None, held: str = "bf16") -> str:
    """The dtype `op` writes its output in."""
    o = OPS[op]
    return resolve(o.out, o.out_forced, activation, held)


def src_b_dtype(op: str, activation: str | None, held: str = "bf16") -> str:
    """The dtype of `op`'s activation operand (SrcB)."""
    o = OPS[op]
    return resolve(o.src_b, o.src_b_forced, activation, held)


def partials(op: str, prefill: bool, activation: str | None) -> str | None:
    """The K-block partials' dtype `op` forces (None: the fidelity setting's own rule): Float16_b
    for a DRAM-sharded decode matmul (its program config's fixed interm format); none in
    full-precision mode."""
    if prefill or activation == FULL or not OPS[op].dram_sharded_decode:
        return None
    return "bf16"
