"""Running studies (sweep.study): exact-once grids with 2 worker processes, a killed worker and a
resume, Ctrl-C, crashing trials, sampler budgets, reuse of equal-numerics accuracy, status.

Everything runs tiny-llama with a short evaluation (prefill 16, decode 15) on journal storage in
temporary folders."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from worker_hooks import HOOK, hook_env  # tests/worker_hooks.py: the workers' fault injection

from sweep import study as study_mod
from sweep.cli import main as cli_main
from sweep.records import TrialRecord
from sweep.space import load_spec
from sweep.study import Worker, identity, load_study, prepare, records, run, status
from sweep.study.optuna_compat import frozen_trial

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def tiny_lt_pareto(tmp_path: Path, name: str = "lt.toml") -> Path:
    """The shipped lt-pareto study on tiny-llama with a short evaluation: the seed's 12 configs
    (the accuracy preset listed after them is dropped)."""
    text = (ROOT / "studies" / "lt-pareto.toml").read_text()
    assert '\n  "accuracy",\n' in text
    text = text.replace('\n  "accuracy",\n', "\n")
    text = text.replace('model = "smollm2-135m"', 'model = "tiny-llama"')
    text = text.replace('devices = ["N150"]', 'devices = ["N150", "N300"]')  # tiny-llama splits over 2 chips
    text = text.replace("prefill = 512", "prefill = 16").replace("decode = 511", "decode = 15")
    p = tmp_path / name
    p.write_text(text)
    return p


SMALL = """
[study]
model = "tiny-llama"
devices = ["N150", "N300"]
objectives = ["top1", "speed:N150"]
[eval]
prefill = 16
decode = 15
"""


def trials_of(spec):
    return load_study(spec).get_trials(deepcopy=False)


def complete_configs(spec) -> Counter:
    return Counter(t.user_attrs["config"] for t in trials_of(spec) if t.state == TrialState.COMPLETE)


def assert_each_config_complete_once(spec):
    want = {str(mc) for _, mc in spec.space.grid()}
    got = complete_configs(spec)
    assert set(got) == want
    assert all(n == 1 for n in got.values()), got
    counts = status(spec)["counts"]
    assert counts["COMPLETE"] == len(want) and counts["RUNNING"] == 0 and counts["WAITING"] == 0


def start_cli(args: list[str], env_extra: dict, ignore_sigint: bool = False) -> subprocess.Popen:
    """`sweep ARGS` in its own session; `ignore_sigint`: started with SIGINT ignored, as a shell
    starts a background job of a script."""
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen([sys.executable, "-m", "sweep.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=pre)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90.0) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the hook fired:\n{proc.stdout.read()}")
        time.sleep(0.1)
    raise AssertionError("hook never fired")


def start_hung_run(path: Path, tmp_path: Path, ignore_sigint: bool = False) -> tuple[subprocess.Popen, int]:
    """`sweep run PATH --workers 2` in its own session, with the first worker to reach an
    evaluation hanging there (SWEEP_TEST_HANG); returns the run and the hung worker's pid."""
    hang = tmp_path / "hang.pid"
    proc = start_cli(["run", str(path), "--workers", "2", "--no-progress"], hook_env(SWEEP_TEST_HANG=str(hang)), ignore_sigint)
    return proc, wait_for(hang, proc)


def wait_dead(pids, timeout: float = 10.0) -> None:
    """Wait until killed processes are gone or zombies (SIGKILL is delivered asynchronously)."""
    t0 = time.time()
    for pid in set(pids):
        while time.time() - t0 < timeout:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                break
            if stat[stat.rindex(")") + 2] in "ZX":
                break
            time.sleep(0.05)


# --- exact once -----------------------------------------------------------------------------------
def test_two_workers_run_a_12_config_grid_exactly_once(tmp_path, capsys):
    spec = load_spec(tiny_lt_pareto(tmp_path))
    summary = run(spec, workers=2, progress=False)
    assert summary.counts == {"COMPLETE": 12, "FAIL": 0, "REQUEUED": 0, "RUNNING": 0, "WAITING": 0}
    assert summary.workers == 2 and summary.skipped == 0
    assert_each_config_complete_once(spec)
    trials = trials_of(spec)
    assert len(trials) == 12
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both workers took trials

    # what a trial stores: the TrialRecord (the report's contract) and the objective values
    study = load_study(spec)
    recs = records(study)
    assert [n for n, _ in recs] == list(range(12))
    for t in trials:
        rec = TrialRecord.from_user_attrs(t.user_attrs)
        assert rec.model == "tiny-llama" and rec.tokens == 15
        assert set(rec.speed) == set(rec.ttft) == {"N150", "N300"}
        assert rec.top1_ci[0] <= rec.top1 <= rec.top1_ci[1]
        assert set(rec.accuracy) == {"N300"}  # N300's tensor-parallel numerics evaluated too
        assert rec.on("N150")["top1"] == rec.top1 and rec.objective("top1:N300") == rec.accuracy["N300"]["top1"]
        assert rec.host and rec.wall_s > 0 and rec.reused_from is None
        assert rec.decoder_json and "decoders" in rec.decoder_json
        assert t.values == [rec.objective(o) for o in spec.objectives]
        assert t.user_attrs["numerics_key"]
    attrs = study.user_attrs
    assert attrs["model"] == "tiny-llama" and attrs["devices"] == ["N150", "N300"]
    assert attrs["objectives"] == spec.objectives and attrs["spec"]["name"] == "lt-pareto"
    assert any(r.accuracy["N300"]["kld"] != r.kld for _, r in recs)  # the device changes the numbers
    assert attrs["perf_calibration"] and attrs["skipped_equivalent"] == 0 and attrs["grid_planned"] == 12
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE", "MAXIMIZE", "MINIMIZE"]

    # running it again finds nothing to do
    again = run(spec, workers=2, progress=False)
    assert again.workers == 0 and len(trials_of(spec)) == 12
    assert "12 complete" in capsys.readouterr().out

    # sweep status --json
    assert cli_main(["status", str(spec.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"COMPLETE": 12, "FAIL": 0, "REQUEUED": 0, "RUNNING": 0, "WAITING": 0}


def test_killed_run_then_resume_completes_every_config_once(tmp_path):
    """SIGKILL the whole run (parent and both workers) while a worker is inside a trial, then run
    the same command again: the stale RUNNING trial is failed and re-queued, nothing finished is
    re-run, and every config ends COMPLETE exactly once."""
    path = tiny_lt_pareto(tmp_path)
    spec = load_spec(path)
    proc, _ = start_hung_run(path, tmp_path)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = trials_of(spec)
    wait_dead([t.user_attrs["worker"]["pid"] for t in before if "worker" in t.user_attrs])
    finished_before = {t.number: t.user_attrs["config"] for t in before if t.state == TrialState.COMPLETE}
    assert any(t.state == TrialState.RUNNING for t in before)
    st = status(spec)
    assert any(not r["alive"] for r in st["running"])  # status sees the dead worker

    summary = run(spec, workers=2, progress=False)
    assert summary.recovered
    assert_each_config_complete_once(spec)
    after = {t.number: t for t in trials_of(spec)}
    for n, cfg in finished_before.items():  # finished trials are kept as they were, not re-run
        assert after[n].state == TrialState.COMPLETE and after[n].user_attrs["config"] == cfg
    stale = [t for t in after.values() if t.state == TrialState.FAIL]
    assert stale and all(t.user_attrs["superseded"] for t in stale)
    assert all("worker died" in t.user_attrs["fail_reason"] for t in stale)


def small_grid(tmp_path: Path) -> Path:
    p = tmp_path / "small.toml"
    p.write_text(SMALL + '[space]\nff1_3 = ["bfp8", "bf16"]\nff2 = ["bfp8", "bf16"]\n')
    return p


def test_a_worker_killed_mid_trial_is_replaced_in_the_same_run(tmp_path):
    path = small_grid(tmp_path)
    spec = load_spec(path)
    proc, pid = start_hung_run(path, tmp_path)
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "died" in out
    assert_each_config_complete_once(spec)


@pytest.mark.parametrize("ignored", [False, True], ids=["terminal", "sigint-ignored-at-start"])
def test_ctrl_c_fails_and_requeues_the_running_trial(tmp_path, ignored):
    """Ctrl-C exits 130 and loses nothing, also for a run started with SIGINT ignored (a script's
    background job), which once ran on to the end and exited 0 (its workers stopped, the runner
    respawned them)."""
    path = small_grid(tmp_path)
    spec = load_spec(path)
    proc, _ = start_hung_run(path, tmp_path, ignored)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "run the same command again" in out
    trials = trials_of(spec)
    assert not any(t.state == TrialState.RUNNING for t in trials)
    interrupted = [t for t in trials if "interrupted" in t.user_attrs.get("fail_reason", "")]
    assert interrupted and all(t.user_attrs["superseded"] for t in interrupted)
    waiting = Counter(t.user_attrs["config"] for t in trials if t.state == TrialState.WAITING)
    assert all(t.user_attrs["config"] in waiting for t in interrupted)

    run(spec, workers=2, progress=False)
    assert_each_config_complete_once(spec)


def test_concurrent_runs_never_queue_a_config_twice(tmp_path):
    path = tiny_lt_pareto(tmp_path)
    code = f"from sweep.space import load_spec; from sweep.study import prepare; print(prepare(load_spec({str(path)!r})).enqueued)"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    queued = sorted(int(p.communicate(timeout=120)[0].strip()) for p in procs)
    assert queued == [0, 0, 12]
    spec = load_spec(path)
    assert Counter(t.state for t in trials_of(spec)) == {TrialState.WAITING: 12}
    assert len({t.user_attrs["config"] for t in trials_of(spec)}) == 12


# --- failures, samplers, reuse ------------------------------------------------------------------------
def test_a_crashing_trial_is_recorded_fail_and_the_study_goes_on(tmp_path, monkeypatch, capsys):
    spec = load_spec(tiny_lt_pareto(tmp_path))
    monkeypatch.setenv("SWEEP_WORKER_HOOK", HOOK)
    monkeypatch.setenv("SWEEP_TEST_FAIL", "ff2: bf16")  # 3 of the 12 configs raise NonFiniteLogits
    prep = prepare(spec)
    assert prep.enqueued == 12 and prep.total == 12
    done = Worker(prep.study, spec).run()
    assert done == {"COMPLETE": 9, "FAIL": 3}
    st = status(spec)
    assert st["counts"] == {"COMPLETE": 9, "FAIL": 3, "REQUEUED": 0, "RUNNING": 0, "WAITING": 0}
    assert len(st["failures"]) == 3
    for f in st["failures"]:
        assert "ff2: bf16" in f["config"] and f["reason"].startswith("NonFiniteLogits: non-finite logits")
    assert cli_main(["status", str(spec.path)]) == 0
    assert "FAIL: NonFiniteLogits" in capsys.readouterr().out

    # a failed config stays failed on resume, and the run says so: exit 1, how to retry, no "resume"
    monkeypatch.delenv("SWEEP_TEST_FAIL")
    prep = prepare(spec)
    assert prep.enqueued == 0
    assert cli_main(["run", str(spec.path), "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert "12 planned: 9 complete, 3 failed, 0 to run" in out and "resume" not in out
    assert err.count("\n") == 1 and "3 trial(s) failed" in err and f"sweep run {spec.path} --retry-failed" in err
    # ... unless asked to retry
    prep = prepare(spec, retry_failed=True)
    assert prep.enqueued == 3 and prep.requeued_failed == 3
    Worker(prep.study, spec).run()
    assert_each_config_complete_once(spec)
    assert cli_main(["run", str(spec.path), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "12 planned: 12 complete, 0 to run" in out and "12 complete, 0 failed (+3 re-queued), 0 running, 0 waiting of 12;" in out
    assert "resume" not in out and not err

    # a config queued from outside the space (an allocation) counts apart from the planned grid
    from engine.vocab.config import ModelConfig
    from sweep.study import enqueue_config

    assert enqueue_config(load_study(spec), ModelConfig.parse("accuracy", spec.n_layers, spec.model), {})
    assert cli_main(["run", str(spec.path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "12 planned + 1 queued from outside the space (allocations): 12 complete, 1 to run" in out
    assert "13 complete, 0 failed (+3 re-queued), 0 running, 0 waiting of 13 (12 planned + 1 queued from outside the space)" in out
    assert "resume" not in out



def _dead_worker() -> dict:
    """A worker identity whose process has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True)
    pid = int(child.communicate()[0])
    return {"host": identity.host_name(), "pid": pid, "start": "1", "boot": identity.boot_id()}


def _claim_and_die_mid_suggest(study, spec) -> optuna.Trial:
    """What a worker SIGKILLed inside `space.suggest` leaves: a RUNNING trial of a dead worker
    with only its first param set."""
    trial = Worker(study, spec).claim() if spec.is_grid else study.ask()
    trial.set_user_attr("worker", _dead_worker())
    first = spec.space.params[0]
    trial.suggest_categorical(first.name, list(first.choices))
    return trial


def test_a_grid_trial_killed_mid_suggest_is_requeued_with_all_its_params(tmp_path):
    """CI once caught a resume running a config that was not in the grid: the dead trial had only
    some params set, and re-queuing those let the sampler fill the rest at random."""
    path = tiny_lt_pareto(tmp_path)
    spec = load_spec(path)
    prep = prepare(spec)
    dead = _claim_and_die_mid_suggest(prep.study, spec)
    ft = frozen_trial(prep.study, dead)
    assert 0 < len(ft.params) < len(spec.space.params)
    queued = ft.user_attrs["config"]

    assert study_mod.recover_stale(prep.study) == [ft.number]
    copy = [t for t in trials_of(spec) if t.user_attrs.get("requeued_from") == ft.number]
    assert len(copy) == 1 and copy[0].state == TrialState.WAITING
    assert copy[0].system_attrs["fixed_params"] == ft.system_attrs["fixed_params"]
    assert str(spec.space.config(copy[0].system_attrs["fixed_params"])) == queued == copy[0].user_attrs["config"]

    Worker(prep.study, spec).run()
    assert_each_config_complete_once(spec)


def test_a_trial_claimed_by_a_worker_killed_before_it_said_who_it_is(tmp_path):
    """Killed between the claim and writing its identity, a worker leaves a RUNNING trial that
    names no worker: recovered at once when no worker of the study is alive, never while one is."""
    spec = load_spec(small_grid(tmp_path))
    prep = prepare(spec)
    orphan = Worker(prep.study, spec).claim()  # RUNNING, no "worker" attribute
    with study_mod.worker_presence(spec):  # a live worker (this process) might still write it
        assert not study_mod.no_live_workers(spec)
        assert study_mod.recover_stale(prep.study, spec) == []
        assert [r["alive"] for r in status(spec)["running"]] == [True]
    assert study_mod.no_live_workers(spec)
    assert [r["alive"] for r in status(spec)["running"]] == [False]
    assert study_mod.recover_stale(prep.study) == []  # without the spec: only after the grace period
    assert study_mod.recover_stale(prep.study, spec) == [orphan.number]
    Worker(prep.study, spec).run()
    assert_each_config_complete_once(spec)


def test_journal_trials_are_recovered_when_no_worker_lives_whatever_host_they_name(tmp_path):
    """Every worker of a journal study is on this machine: with none alive, a RUNNING trial is dead
    even when its worker gave another host name ($TTSWEEP_HOST) and beat a moment ago."""
    spec = load_spec(small_grid(tmp_path))
    prep = prepare(spec)
    trial = Worker(prep.study, spec).claim()
    trial.set_user_attr("worker", {"host": "renamed-host", "pid": 1, "start": "1", "boot": "x"})
    trial.set_user_attr("heartbeat", time.time())
    with study_mod.worker_presence(spec):  # a live worker: it may be that one
        assert study_mod.recover_stale(prep.study, spec) == []
    assert study_mod.recover_stale(prep.study, spec) == [trial.number]


def test_a_journal_lock_left_by_a_killed_process_is_cleared_on_resume(tmp_path):
    """A process SIGKILLed while appending leaves the journal's lock file: with no worker alive the
    next run removes it at once instead of waiting out Optuna's grace period; never while one lives."""
    spec = load_spec(small_grid(tmp_path))
    prepare(spec)
    lock = Path(str(spec.journal_path) + ".lock")
    os.symlink(spec.journal_path, lock)  # what JournalFileSymlinkLock holds while appending
    with study_mod.worker_presence(spec):
        assert not study_mod.clear_stale_journal_lock(spec) and os.path.lexists(lock)
    seen: list[logging.LogRecord] = []
    spy = logging.Handler(logging.WARNING)
    spy.emit = seen.append
    logging.getLogger("optuna").addHandler(spy)
    try:
        prep = prepare(spec)
    finally:
        logging.getLogger("optuna").removeHandler(spy)
    assert not os.path.lexists(lock)
    assert not [r for r in seen if "lock file" in r.getMessage()]  # Optuna never waited on it, nor broke it
    Worker(prep.study, spec).run()
    assert_each_config_complete_once(spec)


def test_a_sampled_trial_killed_mid_suggest_is_replaced_by_a_new_sample(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text(SMALL + '[sampler]\nkind = "tpe"\nn_trials = 3\nn_startup = 1\n[space]\nff1_3 = ["bfp8", "bf16"]\nff2 = ["bfp8", "bf16"]\n')
    spec = load_spec(p)
    prep = prepare(spec)
    dead = _claim_and_die_mid_suggest(prep.study, spec)
    assert study_mod.recover_stale(prep.study) == [dead.number]
    ft = frozen_trial(prep.study, dead)
    assert ft.state == TrialState.FAIL and ft.user_attrs["superseded"]
    assert "sampler proposes a new trial" in ft.user_attrs["fail_reason"]
    assert not [t for t in trials_of(spec) if t.state == TrialState.WAITING]  # nothing partial queued
    Worker(prep.study, spec).run()
    trials = trials_of(spec)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3  # the dead trial used no budget
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert str(spec.space.config(t.params)) == t.user_attrs["config"]


def test_a_queued_trial_missing_params_fails_loudly(tmp_path):
    """A queued trial must fix every param: one the sampler filled at random would be another config."""
    spec = load_spec(small_grid(tmp_path))
    study = load_study(spec, create=True)
    study.enqueue_trial({"ff1_3": "bfp8"}, user_attrs={"config": "as queued"})  # ff2 missing
    assert Worker(study, spec).run() == {"FAIL": 1}
    (t,) = trials_of(spec)
    assert t.user_attrs["fail_reason"] == ("ValueError: trial was queued without params ff2; "
                                           "re-run `sweep run --retry-failed` to queue its config again")
    assert t.user_attrs["config"] == "as queued" and not t.params  # nothing was sampled



def test_grid_skips_configs_dominated_a_priori_and_reports_it(tmp_path, capsys):
    # li_ff2 reads the bfp8 SiLU product (activation mixed): hifi2 == hifi3 == hifi4 == hifi4fp32
    p = tmp_path / "g.toml"
    p.write_text(SMALL + '[space]\nli_ff2 = ["hifi2", "hifi3", "hifi4", "hifi4fp32", "lofi"]\nff1_3 = ["bfp8", "bf16"]\n')
    spec = load_spec(p)
    assert cli_main(["run", str(p), "--plan"]) == 0
    assert "4 to run, 6 skipped" in capsys.readouterr().out
    assert not (tmp_path / ".runs").exists()  # --plan writes nothing
    prep = prepare(spec)
    assert (prep.size, prep.total, prep.skipped) == (10, 4, 6)
    attrs = prep.study.user_attrs
    assert attrs["skipped_equivalent"] == 6 and len(attrs["skipped_configs"]) == 6
    assert all("li_ff2: hifi2" in s["same_as"] for s in attrs["skipped_configs"])
    Worker(prep.study, spec).run()
    assert sorted(t.params["li_ff2"] for t in trials_of(spec)) == ["hifi2", "hifi2", "lofi", "lofi"]


def test_sampler_budget_with_two_workers_and_reuse_of_equal_numerics(tmp_path):
    # 2 x 2 configs, two numerics classes per ff1_3 value: a 6-trial budget repeats some
    p = tmp_path / "t.toml"
    p.write_text(SMALL + """
[sampler]
kind = "tpe"
n_trials = 6
seed = 3
n_startup = 3
[[constraints]]
metric = "top1"
min = 0
[space]
ff1_3 = ["bfp8", "bf16"]
li_ff2 = ["hifi2", "hifi4"]
""")
    spec = load_spec(p)
    summary = run(spec, workers=2, progress=False)
    assert summary.counts["COMPLETE"] == 6 and summary.total == 6
    trials = [t for t in trials_of(spec) if t.state == TrialState.COMPLETE]
    assert len(trials_of(spec)) == 6
    by_key: dict = {}
    for t in trials:
        by_key.setdefault(t.user_attrs["numerics_key"], []).append(t)
        assert t.constraints == {"top1>=0": 0 - t.user_attrs["top1"]}
    assert len(by_key) <= 2  # hifi2 == hifi4 on w2 here, so at most 2 classes
    reused = [t for t in trials if t.user_attrs.get("reused_from")]
    assert reused  # 6 trials over at most 2 numerics classes: most reuse a measurement
    for ts in by_key.values():
        assert len({(t.user_attrs["top1"], t.user_attrs["kld"]) for t in ts}) == 1
    for t in reused:
        assert t.user_attrs["wall_s"] == 0 and set(t.user_attrs["speed"]) == {"N150", "N300"}


def test_constraints_make_trials_infeasible(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(SMALL + '[[constraints]]\nmetric = "top1"\nmin = 101\n[space]\nff2 = ["bfp8", "bf16"]\n')
    spec = load_spec(p)
    prep = prepare(spec)
    Worker(prep.study, spec).run()
    study = load_study(spec)
    assert len(records(study)) == 2 and study.best_trials == []


def test_sqlite_is_refused_with_several_workers(tmp_path):
    p = tiny_lt_pareto(tmp_path)
    spec = load_spec(p, storage=f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ValueError, match="SQLite"):
        run(spec, workers=2, progress=False)
    assert not (tmp_path / "x.db").exists()


def test_a_changed_study_file_is_not_resumed(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(SMALL + '[space]\nff2 = ["bfp8", "bf16"]\n')
    prepare(load_spec(p))
    p.write_text(SMALL + '[space]\nff2 = ["bfp8", "bfp4"]\n')
    with pytest.raises(ValueError, match="different study file"):
        prepare(load_spec(p))


def test_status_of_a_study_never_run_writes_nothing(tmp_path, capsys):
    p = tiny_lt_pareto(tmp_path)
    assert cli_main(["status", str(p), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"COMPLETE": 0, "FAIL": 0, "REQUEUED": 0, "RUNNING": 0, "WAITING": 0}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["lt.toml"]


def test_gpus_are_shared_out_one_per_worker_when_asked():
    """`sweep run --workers N --torch-device cuda` on N GPUs: one GPU each (CUDA_VISIBLE_DEVICES),
    each on its cuda:0; nothing asked: the engine's default device, nothing passed."""
    from sweep.study import device_plan

    assert device_plan(2, None, ["0", "1"]) == [(None, None)] * 2  # not asked: CPU runs stay as today
    assert device_plan(4, "cuda", ["0", "1", "2", "3"]) == [("0", "cuda:0"), ("1", "cuda:0"), ("2", "cuda:0"), ("3", "cuda:0")]
    assert device_plan(3, "cuda", ["5", "7"]) == [("5", "cuda:0"), ("7", "cuda:0"), ("5", "cuda:0")]
    assert device_plan(2, None, ["2", "3"], cuda_env_set=True) == [("2", "cuda:0"), ("3", "cuda:0")]
    assert device_plan(2, "cuda:1", ["0", "1"]) == [(None, "cuda:1")] * 2  # pinned
    assert device_plan(2, "cpu", []) == [(None, "cpu")] * 2
    with pytest.raises(ValueError, match="no GPU is visible"):
        device_plan(2, "cuda", [])


def test_torch_device_reaches_the_evaluator(tmp_path):
    import inspect

    from engine.accuracy.evaluator import Evaluator

    if "torch_device" not in inspect.signature(Evaluator).parameters:
        pytest.skip("engine.accuracy.evaluator.Evaluator takes no torch_device yet (being added in parallel)")
    spec = load_spec(small_grid(tmp_path))
    prep = prepare(spec)
    assert Worker(prep.study, spec, torch_device="cpu").run() == {"COMPLETE": 4}


# --- workers exit cleanly ---------------------------------------------------------------------------
def test_workers_exit_0_with_a_thread_still_inside_torch(tmp_path):
    """`sweep worker` once printed "done (exit 0)" and then aborted in the interpreter's teardown
    ("terminate called without an active exception", exit 134): a thread still inside torch's C++
    at exit. SWEEP_TEST_BUSY_THREAD leaves one running; the worker (and `sweep run`'s workers) must
    still exit 0 once everything is stored."""
    path = tmp_path / "one.toml"
    path.write_text(SMALL + '[space]\nff1_3 = ["bfp8", "bf16"]\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT), **hook_env(SWEEP_TEST_BUSY_THREAD="1"))
    out = subprocess.run([sys.executable, "-m", "sweep.cli", "worker", str(path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "done (exit 0)" in out.stdout and "terminate called" not in out.stderr
    assert status(load_spec(path))["counts"]["COMPLETE"] == 2
    path2 = tmp_path / "two.toml"
    path2.write_text(SMALL + '[space]\nff2 = ["bfp8", "bf16"]\n')
    out = subprocess.run([sys.executable, "-m", "sweep.cli", "run", str(path2), "--no-progress"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "died" not in out.stdout, out.stdout + out.stderr
    assert status(load_spec(path2))["counts"]["COMPLETE"] == 2


def test_the_worker_hook_is_a_module_or_a_file_function(monkeypatch):
    """SWEEP_WORKER_HOOK (the worker's plugin point): MODULE:FUNCTION or PATH.py:FUNCTION; unset: none."""
    from sweep.study.worker import before_evaluate_hook

    monkeypatch.delenv("SWEEP_WORKER_HOOK", raising=False)
    assert before_evaluate_hook() is None
    for target in (HOOK, "worker_hooks:before_evaluate"):
        monkeypatch.setenv("SWEEP_WORKER_HOOK", target)
        assert before_evaluate_hook().__name__ == "before_evaluate"
    monkeypatch.setenv("SWEEP_WORKER_HOOK", "no_colon")
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        before_evaluate_hook()
