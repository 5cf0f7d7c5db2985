"""Every bad input of the command line: one line on stderr naming the problem and the fix, a
non-zero exit status, and nothing written (the working folder is unchanged afterwards)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from sweep.cli import main
from sweep.study.optuna_compat import storage_of

ROOT = Path(__file__).resolve().parents[1]

STUDY = """
[study]
model = "{model}"
devices = ["N150"]
objectives = ["top1", "speed:N150"]
[eval]
prefill = {prefill}
decode = 15
{sampler}
[space]
ff1_3 = ["bfp8", "bf16"]
ff2 = ["bfp8", "bf16"]
"""


def tree(root: Path) -> dict[str, int]:
    """Every file and folder under root with its size: the 'nothing written' check."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in sorted(root.rglob("*"))}


def fails(capsys, argv: list[str], root: Path, *needles: str) -> str:
    """Run `sweep ARGV` in `root`; assert exit 2, one stderr line holding every needle, nothing written."""
    before = tree(root)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, f"exit {rc}; stdout {out!r} stderr {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert tree(root) == before, "something was written"
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder with a directory, a random binary '.gguf', a foreign JSON '.log'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "somedir").mkdir()
    (tmp_path / "random.gguf").write_bytes(os.urandom(4096) + b"\xff\xfe")
    (tmp_path / "other.log").write_text('{"hello": 1}\n')
    (tmp_path / "study.db").write_bytes(b"SQLite format 3\0" + bytes(4080))
    return tmp_path


@pytest.mark.parametrize("argv, needles", [
    (["check", "somedir"], ["somedir is a directory", "reports/PERF.md"]),
    (["check", "random.gguf"], ["not a markdown report", "not UTF-8", "reports/PERF.md"]),
    (["check", "missing.md"], ["no markdown report at missing.md"]),
    (["report", "somedir"], ["somedir is a directory", "studies/NAME.toml"]),
    (["report", "random.gguf"], ["not an Optuna journal file", "studies/NAME.toml"]),
    (["report", "other.log"], ["not an Optuna journal file"]),
    (["report", "study.db"], ["is an SQLite database", "sqlite:///study.db"]),
    (["pareto", "somedir"], ["somedir is a directory", "storage URL"]),
    (["status", "somedir"], ["somedir is a directory", "studies/lt-pareto.toml"]),
    (["run", "somedir"], ["somedir is a directory", "studies/lt-pareto.toml"]),
])
def test_directories_binary_and_foreign_files(capsys, work, argv, needles):
    fails(capsys, argv, work, f"sweep {argv[0]}: error:", *needles)


def test_python_m_sweep_cli_catches_its_own_errors(work):
    """`python -m sweep.cli` (as the guide runs it) gives the same one line, no traceback."""
    out = subprocess.run([sys.executable, "-m", "sweep.cli", "check", "somedir"], cwd=work, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("sweep check: error: somedir is a directory, not a markdown report; give the "
                                  "seed-format report file, e.g. reports/PERF.md")


def _hf_dir_without(work: Path, tiny_llama_dir: Path, weights: bytes | None) -> Path:
    d = work / "mymodel"
    d.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", d / "config.json")
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    (work / "s.toml").write_text(STUDY.format(model=d, prefill=16, sampler=""))
    return d


def test_study_whose_model_has_no_safetensors_fails_before_storage(capsys, work, tiny_llama_dir):
    _hf_dir_without(work, tiny_llama_dir, None)
    for cmd in (["run", "s.toml"], ["run", "s.toml", "--plan"]):
        fails(capsys, cmd, work, "s.toml: study.model", "no *.safetensors weight files", "model.safetensors")
    assert not (work / ".runs").exists()


def test_study_whose_safetensors_is_corrupt_fails_before_storage(capsys, work, tiny_llama_dir):
    _hf_dir_without(work, tiny_llama_dir, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    fails(capsys, ["run", "s.toml"], work, "corrupt safetensors header", "re-download")
    assert not (work / ".runs").exists()


def test_study_longer_than_the_models_context(capsys, work):
    (work / "s.toml").write_text(STUDY.format(model="tiny-llama", prefill=2040, sampler=""))
    fails(capsys, ["run", "s.toml"], work, "eval.prefill + eval.decode = 2055 tokens", "context of 2048",
          "lower eval.prefill")


def test_perf_for_a_model_that_does_not_fit(capsys, work):
    line = fails(capsys, ["perf", "--model", "Llama3.1-70B", "--device", "N150"], work,
                 "Llama3.1-70B does not fit on N150", "KV cache per chip > 12 GB", "use --device T3K / TG", "or a smaller --batch")
    assert "--config performance" not in line  # already the performance preset
    fails(capsys, ["perf", "--model", "Llama3.1-70B", "--device", "N300", "--config", "accuracy"], work,
          "does not fit on N300", "--config performance")


def test_perf_prefill_beyond_the_context(capsys, work):
    fails(capsys, ["perf", "--model", "Llama3.1-8B", "--prefill", "131000", "--decode", "200"], work,
          "131000 + 200 = 131200 tokens exceeds Llama3.1-8B's context of 131072", "at most 130872 prefill")
    fails(capsys, ["perf", "--model", "smollm2-135m", "--prefill", "9000"], work, "context of 8192")


def test_eval_prefill_beyond_the_context(capsys, work):
    fails(capsys, ["eval", "--model", "tiny-llama", "--prefill", "2000", "--decode", "100"], work,
          "2000 + 100 = 2100 tokens exceeds tiny-llama's context of 2048")


@pytest.mark.parametrize("cmd", [["eval", "--model", "tiny-llama"], ["perf", "--model", "Llama3.1-8B"]])
def test_preset_typo_lists_the_presets(capsys, work, cmd):
    fails(capsys, [*cmd, "--config", "performanc"], work, "unknown preset 'performanc'",
          "did you mean 'performance'?", "performance, accuracy, reference, defaults", "ff1_3: bfp4")


@pytest.mark.parametrize("config", ["", "   "])
def test_empty_config_is_refused(capsys, work, config):
    fails(capsys, ["eval", "--model", "tiny-llama", "--config", config], work, "empty config",
          "performance, accuracy, reference, defaults")


def test_a_startup_count_that_leaves_no_gp_trial_is_refused(capsys, work):
    (work / "s.toml").write_text(STUDY.format(model="tiny-llama", prefill=16,
                                              sampler='[sampler]\nkind = "gp"\nn_trials = 8'))
    fails(capsys, ["run", "s.toml"], work, "sampler.n_startup = 10 (the default) >= n_trials = 8",
          "never GP", "n_startup = 2")


def test_the_gp_sampler_proposes_trials(work, monkeypatch, capsys):
    """scipy is installed and Optuna's GP sampler, after its random startup trials, proposes the rest."""
    from sweep.space import load_spec
    from sweep.study import Worker, make_sampler, prepare

    (work / "s.toml").write_text(STUDY.format(model="tiny-llama", prefill=16,
                                              sampler='[sampler]\nkind = "gp"\nn_trials = 4\nn_startup = 2'))
    assert main(["run", "s.toml", "--plan"]) == 0
    assert "sampler: gp, 4 trials: the first 2 random, then GP" in capsys.readouterr().out
    spec = load_spec(work / "s.toml")
    proposed = []
    real = optuna.samplers.GPSampler.sample_relative

    def spy(self, study, trial, search_space):
        out = real(self, study, trial, search_space)
        proposed.append(bool(out))
        return out

    monkeypatch.setattr(optuna.samplers.GPSampler, "sample_relative", spy)
    prep = prepare(spec)
    study = optuna.load_study(study_name=spec.name, storage=storage_of(prep.study),
                              sampler=make_sampler(spec))
    Worker(study, spec).run()
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert states.count("COMPLETE") == 4 and "FAIL" not in states
    assert proposed[:2] == [False, False] and any(proposed[2:]), proposed  # 2 random, then the GP model


def test_bench_quick_is_accepted():
    from sweep.cli import build_parser

    p = build_parser()
    a = p.parse_args(["bench", "--quick"])
    assert (a.suite, a.quick, a.args) == ("all", True, [])
    a = p.parse_args(["bench", "perf", "--quick"])
    assert a.suite == "perf" and "--quick" in [*a.args, *(["--quick"] if a.quick else [])]


def test_a_benchmark_that_misses_its_target_fails_the_command(tmp_path, monkeypatch, capsys):
    """`sweep bench` returns the status of a suite script that missed a target (runs the others)."""
    from sweep.commands import bench

    (tmp_path / "bench_numerics.py").write_text("import sys\nprint('ratio 9.0x MISSES the 2x target')\nsys.exit(1)\n")
    for s in ("engine", "perf", "sweep"):
        (tmp_path / f"bench_{s}.py").write_text(f"import sys\nprint('{s}', sys.argv[1:])\n")
    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path)
    assert main(["bench", "--quick"]) == 1
    out = capsys.readouterr()
    assert "MISSES" in out.out and "sweep ['--quick']" in out.out  # later suites still ran, with --quick
    assert "bench_numerics.py: exit status 1" in out.err


DECODER_FILES = {  # name -> contents (bytes: written as they are); tiny-llama has 2 decoder layers
    "bad.json": "{\"decoders\": {\"0\": {}",
    "nodecoders.json": '{"layers": {"0": {}, "1": {}}}',
    "range.json": '{"decoders": {"0": {}, "1": {}, "2": {}}}',
    "key.json": '{"decoders": {"0": {}, "1": {"precision_cfg": {"FF7": "BFP8"}}}}',
    "entry.json": '{"decoders": {"0": {}, "1": {"precison_cfg": {}}}}',
    "value.json": '{"decoders": {"0": {}, "1": {"fidelity_cfg": {"LI_FF2": "lofi"}}}}',
    "short.json": '{"decoders": {"0": {"precision_cfg": {"FF2": "BFP4"}}}}',
    "latin1.json": b'{"decoders": {"0": {"\xe9": 1}}}',
}


@pytest.mark.parametrize("config, needles", [
    ("missing.json", ["no decoder JSON file at missing.json", "reports/<study>/front/<trial>.json"]),
    ("somedir", ["somedir is a directory, not a decoder JSON file"]),
    ("bad.json", ["bad.json: decoder JSON is not valid JSON", '{"decoders": {"0": {...}}}']),
    ("latin1.json", ["latin1.json: not valid JSON (not UTF-8 text)"]),
    ("other.log", ["other.log: decoder JSON lacks the 'decoders' key"]),  # an existing file without .json
    ("nodecoders.json", ["lacks the 'decoders' key", '{"decoders": {"0": {...}}}']),
    ("range.json", ["decoder index 2 out of range for a model with 2 layers (0..1)"]),
    ("key.json", ["decoder 1: unknown precision_cfg key 'FF7'", "legal: FF1_FF3, FF2"]),
    ("entry.json", ["unknown key 'precison_cfg'", "legal: precision_cfg, fidelity_cfg"]),
    ("value.json", ['unknown fidelity_cfg value "lofi" for LI_FF2', "tt-metal member names): LOFI, HIFI2"]),
    ("short.json", ["lists decoders up to 0 but the model has 2 layers", "list decoder 1 too"]),
])
def test_bad_decoder_json_files(capsys, work, config, needles):
    """`--config FILE` of eval, perf and compare: one line naming the file and the fix, exit 2."""
    for name, body in DECODER_FILES.items():
        (work / name).write_bytes(body if isinstance(body, bytes) else body.encode())
    for cmd in (["eval", "--model", "tiny-llama", "--config", config],
                ["perf", "--model", "tiny-llama", "--config", config],
                ["compare", "--model", "tiny-llama", "--config", "defaults", "--config", config]):
        fails(capsys, cmd, work, f"sweep {cmd[0]}: error:", *needles)


# --- a local Hugging Face checkpoint that cannot be used (issue 21): one line, exit 2, nothing written
def _broken(kind: str, d: Path) -> None:
    import json

    import torch
    from safetensors.torch import load_file, save_file

    shards = sorted(d.glob("shard-*.safetensors"))
    target = "model.layers.1.self_attn.q_proj.weight"
    holder = next(f for f in shards if target in load_file(str(f)))
    if kind == "missing shard":
        holder.unlink()
    elif kind == "index names a missing file":
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        idx["weight_map"][target] = "model-99999.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    elif kind in ("wrong shape", "wrong dtype"):
        t = load_file(str(holder))
        t[target] = t[target][:, :32].contiguous() if kind == "wrong shape" else t[target].to(torch.int32)
        save_file(t, str(holder))
    elif kind == "truncated shard":
        holder.write_bytes(holder.read_bytes()[:-64])
    elif kind == "no tokenizer":
        (d / "byte_tokenizer.json").unlink()


@pytest.mark.parametrize("kind, needles", [
    ("missing shard", ["are missing", "download them"]),
    ("index names a missing file", ["model-99999.safetensors", "missing"]),
    ("wrong shape", [".q_proj.weight has shape (64, 32), expected (64, 64)", "config.json"]),
    ("wrong dtype", ["stored as I32", "bf16"]),
    ("truncated shard", ["truncated safetensors file", "re-download"]),
    ("no tokenizer", ["no tokenizer files", "next to its config.json"]),
])
def test_a_broken_checkpoint_directory_fails_in_one_line(capsys, work, monkeypatch, kind, needles):
    from engine.models.spec import ModelSpec
    from engine.models.synthetic import write_checkpoint

    d = write_checkpoint(work / "ckpt", ModelSpec("ckpt", arch="llama", n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16,
                                                  intermediate=128, vocab=256), shard_bytes=40_000)
    _broken(kind, d)
    (work / "s.toml").write_text(STUDY.format(model=d, prefill=16, sampler=""))
    monkeypatch.setenv("TTSWEEP_CACHE", str(work / "cache"))
    fails(capsys, ["eval", "--model", str(d), "--prefill", "16", "--decode", "15", "--cache-dir", str(work / "cache")],
          work, *needles)
    fails(capsys, ["run", "s.toml"], work, "s.toml: study.model", *needles)
    assert not (work / ".runs").exists() and not (work / "cache").exists()


# --- run / worker inputs refused before anything is written (issue 19) ----------------------------
@pytest.mark.parametrize("cmd", ["run", "worker"])
def test_a_torch_device_that_cannot_run_is_refused_up_front(capsys, work, cmd):
    """Once every trial failed with a raw torch error and the run exited 0."""
    (work / "s.toml").write_text(STUDY.format(model="tiny-llama", prefill=16, sampler=""))
    fails(capsys, [cmd, "s.toml", "--torch-device", "tpu"], work, f"sweep {cmd}: error: --torch-device 'tpu' is not a "
          "torch device", "use cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        fails(capsys, [cmd, "s.toml", "--torch-device", "cuda:0"], work, "--torch-device cuda:0: this torch sees no "
              "CUDA GPU", "--torch-device cpu")
    assert not (work / ".runs").exists()


def test_check_torch_device():
    from sweep.study.runner import check_torch_device

    check_torch_device(None)
    check_torch_device("cpu")
    for bad, needle in (("tpu", "is not a torch device"), ("meta", "runs on cpu, cuda or mps devices, not meta"),
                        ("cuda:99", "cuda:99")):
        with pytest.raises(ValueError, match=needle):
            check_torch_device(bad)


def test_postgres_scheme_is_postgresql():
    from sweep.space import canonical_storage_url

    assert canonical_storage_url("postgres://u:p@h:5432/db") == "postgresql://u:p@h:5432/db"
    assert canonical_storage_url("postgres+psycopg://h/db") == "postgresql+psycopg://h/db"
    assert canonical_storage_url("POSTGRES://h/db") == "postgresql://h/db"
    for same in ("postgresql://h/db", "journal:/x/postgres.log", "mysql+pymysql://h/db", "sqlite:///postgres://"):
        assert canonical_storage_url(same) == same


def test_storage_urls_fail_in_one_line(capsys, work):
    """`postgres://` (many tools' spelling) reaches the server as postgresql:// (here: none listens on
    port 1) instead of SQLAlchemy's NoSuchModuleError traceback; an unknown driver is one line too."""
    (work / "s.toml").write_text(STUDY.format(model="tiny-llama", prefill=16, sampler=""))
    fails(capsys, ["run", "s.toml", "--storage", "postgres://u:secret@127.0.0.1:1/db"], work,
          "storage postgresql://u:***@127.0.0.1:1/db: cannot connect to the database")
    fails(capsys, ["run", "s.toml", "--storage", "postgresql+nosuch://u@127.0.0.1:1/db"], work,
          "SQLAlchemy has no such database driver", "postgresql+psycopg://")


@pytest.mark.parametrize("argv, needles", [
    (["run", "s.toml", "--storage", "journal:missing/dir/x.log"], ["storage folder", "no directory", "missing"]),
    (["worker", "s.toml", "--storage", "journal:missing/dir/x.log"], ["storage folder", "no directory", "missing"]),
    (["run", "s.toml", "--report", "missing/dir/PERF.md"], ["--report missing/dir/PERF.md: no directory missing;",
                                                           "mkdir -p missing/dir"]),
    (["run", "s.toml", "--plots", "missing/plots"], ["--plots missing/plots: no directory missing;"]),
    (["report", "s.toml", "-o", "missing/PERF.md"], ["-o missing/PERF.md: no directory missing;"]),
    (["report", "s.toml", "--csv", "missing/p.csv"], ["--csv missing/p.csv: no directory missing;"]),
    (["pareto", "s.toml", "--out", "missing/dir/plots"], ["--out missing/dir/plots: no directory missing;"]),
    (["pareto", "s.toml", "--html", "missing/index.html"], ["--html missing/index.html: no directory missing;"]),
    (["perf", "calibrate", str(ROOT / "reference" / "PERF-seed.md"), "--out", "missing/p.json"],
     ["--out missing/p.json: no directory missing;"]),
])
def test_no_command_creates_a_folder_the_user_did_not_ask_for(capsys, work, argv, needles):
    """A mistyped folder once got created silently (journal:/nonexistent/dir/x.log, -o /nonexistent/dir/PERF.md)."""
    (work / "s.toml").write_text(STUDY.format(model="tiny-llama", prefill=16, sampler=""))
    fails(capsys, argv, work, *needles)
    assert not (work / "missing").exists()


def test_bench_numerics_times_every_fidelity_setting(capsys):
    """`sweep bench numerics --quick` once died on an AttributeError (fidelity.HIFI3 had become a SETTINGS row)."""
    import runpy

    mod = runpy.run_path(str(ROOT / "bench" / "bench_numerics.py"))
    mod["bench_matmul"](8, 64, 32, 1)
    out = capsys.readouterr().out
    from engine.numerics.fidelity import SETTINGS

    for name, s in SETTINGS.items():
        assert (f"  {name} " in out) == bool(s.kernel.phases), name  # every setting but the emulator's exact
