"""Study files (``studies/*.toml``) -> a validated `StudySpec` with its search `Space`.

Everything in a study file is checked before anything runs: a malformed file, an unknown key or
value, or an empty space raises `StudyFileError` naming the file, the key and the legal
keys/values, and nothing is written to any storage.

Study file format
=================

A study file is TOML. Only ``[study]`` (with ``model``) and ``[space]`` are required::

    [study]
    name = "lt-pareto"                  # default: the file name without .toml
    model = "smollm2-135m"              # an engine.models.loaders registry name
    devices = ["N150", "N300"]          # speed/TTFT reported for each; the first is primary
    objectives = ["top1", "speed:N150"] # default: top1, top5, speed:<primary>, ttft:<primary>
    storage = "journal:.runs/lt-pareto.log"   # optional, see below
    description = "free text"           # optional

    [eval]                              # accuracy evaluation (teacher forced)
    prefill = 512                       # default 512
    decode = 511                        # default 511; longer = finer Top-1 resolution
    windows = 1                         # default 1 (tt-metal's method); N scores N disjoint
                                        # 1024-token windows of the text (N x 511 positions),
                                        # each against its own cached fp32 reference

    [perf]                              # performance-model settings for speed / TTFT
    batch = 1                           # defaults: the seed's performance runs
    prefill = 128
    decode = 200
    dp = 1

    [sampler]
    kind = "grid"                       # grid | nsga2 | tpe | gp   (default grid)
    # n_trials = 300                    # required for nsga2/tpe/gp, not allowed for grid
    # seed = 0                          # default 0
    # population = 50                   # nsga2 only
    # n_startup = 10                    # tpe / gp only: the first n_startup trials are random
                                        # samples, the model (TPE / GP) proposes the rest;
                                        # must be < n_trials

    [[constraints]]                     # optional, any number
    metric = "top1"                     # top1, top5, kld, ppl, speed:<DEV>, ttft:<DEV>
    min = 85                            # and/or max = ...

    [space]
    base = "defaults"                   # preset (defaults, performance, accuracy) or config
                                        # string: the value of every group not listed
    ff1_3 = ["bfp4", "bfp8", "bf16"]    # a list = the values a group may take
    ff2 = ["bfp4", "bfp8", "bf16"]
    activation = ["mixed", "bf16", "bfp8"]
    li_o_prefill = "hifi2"              # one value = fixed
    couple = { ff1_3 = "li_ff1_3", wqkv = ["li_qkv_decode", "li_qkv_prefill"] }
                                        # "natural fidelity": each listed op group follows its
                                        # weight group; couple = "weights" couples all four
                                        # weight groups to their linears
    # [space.natural]                   # the natural fidelity of each precision (default below)
    # bfp4 = "lofi"
    # bfp8 = "hifi2"
    # bf16 = "hifi4"

    [space.layers]                      # optional per-decoder-layer space
    first = 2                           # layers 0, 1 ...
    last = 2                            # ... and the last 2 get their own parameters,
    groups = ["ff1_3", "ff2"]           # (default: every group given a list) named L0.ff1_3,
                                        # L29.ff2, ...; the other layers share `ff1_3`, `ff2`

Instead of group values a grid may list its configs explicitly (diffs over ``base``; a full
canonical string with ``; decoders = {...}`` sets layers individually)::

    [space]
    configs = [
      "precision_cfg = {ff1_3: bfp4}, fidelity_cfg = {li_ff1_3: lofi}",
      "precision_cfg = {ff1_3: bf16}, fidelity_cfg = {li_ff1_3: hifi4}",
    ]

Group keys are the config vocabulary (docs/NUMERICS.md): tensor groups ``ff1_3, ff2,
wqkv, wo, kv_cache, activation`` take ``bfp4, bfp8, bf16`` (``fp32`` emulator only; ``mixed``
for activation only); op groups ``li_ff1_3, li_ff2, li_qkv_decode, li_o_decode, sdpa_decode,
li_qkv_prefill, li_o_prefill, sdpa_prefill`` take ``lofi, hifi2, hifi2na, hifi2fp16, hifi3,
hifi4, hifi4fp32`` (``exact`` emulator only).

Objectives are named ``top1``, ``top5`` (maximised), ``speed:<DEVICE>`` (maximised),
``ttft:<DEVICE>`` (minimised), ``kld``, ``ppl`` (minimised); the device must be one of the
study's. A constraint is feasible when ``min <= value <= max``.

Storage: any Optuna storage URL (``sqlite:///x.db``, ``postgresql://...``, ``mysql://...``) or
``journal:PATH`` (a JournalFileBackend log; a relative PATH is relative to the study file's
folder). The default is ``journal:.runs/<name>.log`` next to the study file, i.e.
``studies/.runs/<name>.log``, which several processes on one machine can share. SQLite cannot
hand out trials to several workers safely, so it is refused with ``--workers`` > 1; use a
journal file (one machine) or PostgreSQL/MySQL (many machines).

Space parameters (Optuna params) are categorical, named by group (``ff1_3``) or by layer and
group (``L0.ff1_3``); coupled op groups are not parameters (they follow their weight group).
A grid over explicit configs has one parameter per group (or layer.group) that varies among them.
"""
from __future__ import annotations

from sweep.space.model import Constraint, SamplerSpec, Space, StudyFileError, StudySpec
from sweep.space.parse import canonical_storage_url, load_spec, parse_spec, sensitivity_study, spec_from_dict

__all__ = ["Constraint", "SamplerSpec", "Space", "StudyFileError", "StudySpec", "canonical_storage_url", "load_spec",
           "parse_spec", "sensitivity_study", "spec_from_dict"]
