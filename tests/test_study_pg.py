"""Studies on a real PostgreSQL server shared by several "hosts": processes with different host
identities ($TTSWEEP_HOST) and separate local lock folders (each host's copy of the study file
sits in its own folder, so its flocks and logs are its own). Nothing local can serialise them:
only the database guard (sweep.study.queue.SharedQueue).

tiny-llama with a short evaluation (prefill 16, decode 15); heartbeats every 1 s, a dead worker's
trial is stale after 3 s."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from optuna.trial import TrialState
from test_study import wait_for
from worker_hooks import hook_env

from sweep.space import load_spec
from sweep.study import load_study, status

ROOT = Path(__file__).resolve().parents[1]
FAST_BEATS = {"SWEEP_HEARTBEAT_S": "1", "SWEEP_STALE_S": "3"}

HEAD = """
[study]
name = "{name}"
model = "tiny-llama"
devices = ["N150"]
objectives = ["top1", "speed:N150"]
storage = "{url}"
[eval]
prefill = 16
decode = 15
"""
F = ["bfp4", "bfp8", "bf16", "fp32"]
GRID20 = ([f"precision_cfg = {{ff1_3: {a}, ff2: {b}}}" for a in F for b in F]
          + [f"precision_cfg = {{ff1_3: {a}, ff2: {a}, wo: bf16}}" for a in F])


def study_files(tmp_path: Path, url: str, name: str, body: str, hosts=("hostA", "hostB")) -> dict[str, Path]:
    """The same study file in one folder per host (separate .runs lock folders)."""
    out = {}
    for h in hosts:
        p = tmp_path / h / f"{name}.toml"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(HEAD.format(name=name, url=url) + body)
        out[h] = p
    return out


def grid20(tmp_path: Path, url: str, name: str = "grid20") -> dict[str, Path]:
    return study_files(tmp_path, url, name, "[space]\nconfigs = " + json.dumps(GRID20) + "\n")


def env_of(host: str, **extra) -> dict:
    env = dict(os.environ, TTSWEEP_HOST=host, SWEEP_WORKER_THREADS="1", **FAST_BEATS, **extra)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start(args: list[str], host: str, cwd: Path = ROOT, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=env_of(host, **extra), cwd=cwd, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def trials_of(path: Path):
    return load_study(load_spec(path)).get_trials(deepcopy=False)


def assert_exactly_once(path: Path, configs: int) -> list:
    """Every config of the grid COMPLETE exactly once; returns the trials."""
    spec = load_spec(path)
    trials = trials_of(path)
    done = Counter(t.user_attrs["config"] for t in trials if t.state == TrialState.COMPLETE)
    assert set(done) == {str(mc) for _, mc in spec.space.grid()} and len(done) == configs  # no gap
    assert set(done.values()) == {1}, done  # no duplicate
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING, TrialState.PRUNED)]
    return trials


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# --- exact once across hosts ----------------------------------------------------------------------
def test_two_hosts_race_a_20_config_grid_10_times_exactly_once(tmp_path, pg_server):
    """Ten races, each on a new empty database: both hosts create the schema, the study and queue
    the grid at the same moment (`sweep worker STUDY_FILE`), then work it together."""
    races = [grid20(tmp_path / f"race{i}", pg_server.new_database("race"), f"race{i}") for i in range(10)]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    hosts = {h: start(["tests/pg_host.py", str(barrier), "2", *[str(r[h]) for r in races]], h) for h in ("hostA", "hostB")}
    outs = {h: p.communicate(timeout=600)[0] for h, p in hosts.items()}
    for h, p in hosts.items():
        assert p.returncode == 0, outs[h]
        assert outs[h].count(" rc 0") == 10, outs[h]
    by_host: Counter = Counter()
    for r in races:
        trials = assert_exactly_once(r["hostA"], 20)
        assert len(trials) == 20  # nothing queued twice
        by_host.update(t.user_attrs["worker"]["host"] for t in trials)
    assert set(by_host) == {"hostA", "hostB"}, by_host  # both hosts worked


def test_a_sampled_study_on_two_hosts_ends_with_its_budget(tmp_path, pg_url):
    files = study_files(tmp_path, pg_url, "tpe8", '[sampler]\nkind = "tpe"\nn_trials = 8\nseed = 5\nn_startup = 4\n'
                        '[space]\nff1_3 = ["bfp4", "bfp8", "bf16"]\nff2 = ["bfp4", "bfp8", "bf16"]\n')
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = {h: start(["tests/pg_host.py", str(barrier), "2", str(p)], h) for h, p in files.items()}
    for p in procs.values():
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0 and "race 0 rc 0" in out, out
    trials = trials_of(files["hostA"])
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["worker"]["host"] for t in trials} == {"hostA", "hostB"}


# --- dead hosts -------------------------------------------------------------------------------------
def test_a_host_killed_mid_trial_the_other_finishes_and_reruns_its_trial_once(tmp_path, pg_url, capsys):
    files = grid20(tmp_path, pg_url)
    hang = tmp_path / "hang.pid"
    a = start(["-m", "sweep.cli", "run", str(files["hostA"]), "--no-progress"], "hostA", **hook_env(SWEEP_TEST_HANG=str(hang)))
    pid = wait_for(hang, a)
    spec_b = load_spec(files["hostB"])
    st = status(spec_b)
    assert st["hosts"] == {"hostA": [pid]}  # workers per host, seen from host B
    from sweep.cli import main as cli_main

    assert cli_main(["status", str(files["hostB"])]) == 0
    assert f"workers running trials: hostA: 1 (pid {pid})" in capsys.readouterr().out
    # host B joins by name, with no study file: the settings come from the database
    b = start(["-m", "sweep.cli", "worker", "grid20", "--storage", pg_url, "--threads", "1"], "hostB",
              cwd=files["hostB"].parent)
    time.sleep(1.0)
    kill_group(a)  # host A dies: its `sweep run` and its worker, mid-trial
    out = b.communicate(timeout=300)[0]
    assert b.returncode == 0, out
    trials = assert_exactly_once(files["hostB"], 20)
    (dead,) = [t for t in trials if t.state == TrialState.FAIL]
    assert dead.user_attrs["worker"] == {**dead.user_attrs["worker"], "host": "hostA", "pid": pid}
    (copy,) = [t for t in trials if t.user_attrs.get("requeued_from") == dead.number]  # re-run once
    assert copy.state == TrialState.COMPLETE and copy.user_attrs["worker"]["host"] == "hostB"
    assert copy.user_attrs["config"] == dead.user_attrs["config"]
    assert "stopped sending heartbeats" in copy.user_attrs["requeue_reason"]
    st = status(spec_b)
    assert (st["counts"]["FAIL"], st["counts"]["REQUEUED"], st["counts"]["COMPLETE"]) == (0, 1, 20)
    assert cli_main(["status", str(files["hostB"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"COMPLETE": 20, "FAIL": 0, "REQUEUED": 1, "RUNNING": 0, "WAITING": 0}


def test_the_study_resumes_after_every_process_on_every_host_is_killed(tmp_path, pg_url):
    files = grid20(tmp_path, pg_url)
    hang = tmp_path / "hang.pid"
    runs = {h: start(["-m", "sweep.cli", "run", str(p), "--no-progress"], h, **hook_env(SWEEP_TEST_HANG=str(hang)))
            for h, p in files.items()}
    t0 = time.time()
    while not (hang.exists() and hang.read_text().strip()):  # a worker of either host hangs mid-trial
        assert time.time() - t0 < 120, "hook never fired"
        time.sleep(0.05)
    time.sleep(0.5)
    for p in runs.values():
        kill_group(p)
    before = trials_of(files["hostA"])
    assert any(t.state == TrialState.RUNNING for t in before)
    complete_before = {t.number for t in before if t.state == TrialState.COMPLETE}

    res = subprocess.run([sys.executable, "-m", "sweep.cli", "run", str(files["hostA"]), "--workers", "2", "--no-progress"],
                         env=env_of("hostA"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    trials = assert_exactly_once(files["hostA"], 20)
    assert complete_before <= {t.number for t in trials if t.state == TrialState.COMPLETE}  # nothing finished re-run
    requeued = [t for t in trials if t.state == TrialState.FAIL]
    assert requeued and all(any(c.user_attrs.get("requeued_from") == t.number for c in trials) for t in requeued)


# --- first-time schema, drivers -----------------------------------------------------------------------
def test_hosts_creating_the_schema_at_once_do_not_crash(tmp_path, pg_url):
    """Optuna's table creation races on an empty database (`CREATE TYPE studydirection`): four
    processes prepare the same study at the same moment; the grid is queued once."""
    files = grid20(tmp_path, pg_url, "schema")
    go = time.time() + 4.0
    code = ("import sys, time; from sweep.space import load_spec; from sweep.study import prepare; "
            f"spec = load_spec(sys.argv[1]); time.sleep(max(0, {go} - time.time())); print(prepare(spec).enqueued)")
    procs = [start(["-c", code, str(files[h])], h) for h in ("hostA", "hostB", "hostA", "hostB")]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert sorted(int(o.strip().splitlines()[-1]) for o in outs) == [0, 0, 0, 20]
    assert Counter(t.state for t in trials_of(files["hostA"])) == {TrialState.WAITING: 20}


def test_a_missing_postgresql_driver_is_one_line_naming_the_extra(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(HEAD.format(name="s", url="postgresql://u:secret@127.0.0.1:1/db") + '[space]\nff2 = ["bfp8", "bf16"]\n')
    code = ("import sys; sys.modules['psycopg'] = sys.modules['psycopg2'] = None; from sweep.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, "-c", code, "run", str(p), "--no-progress"], env=env_of("h"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "pip install 'ttsweep[postgres]'" in res.stderr and "secret" not in res.stderr


def test_an_unreachable_server_is_one_line_without_the_password(tmp_path, capsys):
    from sweep.cli import main as cli_main

    p = tmp_path / "s.toml"
    p.write_text(HEAD.format(name="s", url="postgresql://u:secret@127.0.0.1:1/db") + '[space]\nff2 = ["bfp8", "bf16"]\n')
    assert cli_main(["status", str(p)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot connect to the database" in err
    assert "u:***@127.0.0.1:1/db" in err and "secret" not in err


def test_postgres_scheme_reaches_the_database(tmp_path, pg_url, capsys):
    """`postgres://` (psql's and many hosting services' spelling) once died in SQLAlchemy's
    NoSuchModuleError traceback; it is PostgreSQL."""
    from sweep.cli import main

    path = tmp_path / "s.toml"
    path.write_text('[study]\nmodel = "tiny-llama"\nobjectives = ["top1", "speed:N150"]\n[eval]\nprefill = 16\n'
                    'decode = 15\n[space]\nff1_3 = ["bfp8", "bf16"]\n')
    alias = pg_url.replace("postgresql://", "postgres://", 1)
    assert alias.startswith("postgres://")
    spec = load_spec(path, storage=alias)
    assert spec.storage == pg_url
    assert main(["run", str(path), "--storage", alias, "--plan"]) == 0
    from sweep.study import prepare

    assert prepare(spec).enqueued == 2
    capsys.readouterr()
    assert main(["status", str(path), "--storage", alias, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["WAITING"] == 2
