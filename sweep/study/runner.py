"""The runner: `sweep run` starts N worker processes on this host, follows them, recovers the trials
of workers that die, respawns, and prints a summary.

A worker that dies (SIGKILL, OOM killer) leaves a RUNNING trial: the runner notices the dead worker
and recovers it at once (its pid is gone on this host); every run also starts by recovering stale
trials (`prepare`), so running the same command again resumes a study. Ctrl-C: each worker fails
its running trial with reason "interrupted", queues its params again and exits; the runner prints
the summary and raises KeyboardInterrupt (`sweep run` exits 130).

GPU hosts: with `torch_device` "cuda" (or CUDA_VISIBLE_DEVICES set and no `torch_device`), the N
workers are spread over the visible GPUs, one each (`device_plan`); `--device` keeps naming the
Wormhole system the speed is predicted for.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState

from sweep.space import StudySpec
from sweep.study.prepare import prepare
from sweep.study.storage import backend
from sweep.study.trials import Tally, fail_reason, superseded_numbers
from sweep.study.worker import FATAL_EXIT

STORAGE_ENV = "TTSWEEP_STORAGE"  # the storage URL handed to workers (not in argv: `ps` would show a password)


# --- the parent: workers, progress, summary ------------------------------------------------------
@dataclass
class RunSummary:
    name: str
    total: int  # trials the study aims at: the planned grid (or the sampler budget) + `extra`
    size: int
    skipped: int
    counts: dict[str, int]
    done: int
    wall_s: float
    workers: int
    interrupted: bool = False
    recovered: list[int] = field(default_factory=list)
    worker_errors: list[str] = field(default_factory=list)
    planned: int = 0  # grid configs planned (sampler: its budget)
    extra: int = 0  # trials queued from outside the space (allocations and the configs they face)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def worker_threads(workers: int) -> int:
    """Torch threads per worker: the machine's cores shared out (SWEEP_WORKER_THREADS overrides)."""
    env = os.environ.get("SWEEP_WORKER_THREADS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries when it is set, else
    torch.cuda.device_count()'s indices (none on a CPU-only torch)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no usable torch: no GPU
        return []


def cuda_env_set() -> bool:
    """CUDA_VISIBLE_DEVICES names at least one GPU (set empty or to -1, it hides them all)."""
    return bool([d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip() not in ("", "-1")])


def check_torch_device(device: str | None) -> None:
    """`--torch-device`, checked before anything is written: a device this torch can run on here.
    ValueError naming the problem and the fix (a bad device would otherwise fail every trial)."""
    if device is None:
        return
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--torch-device {device!r} is not a torch device; use cpu, cuda or cuda:N "
                         "(mps on Apple silicon); --device names the Wormhole system") from None
    if d.type == "cpu":
        return
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--torch-device {device}: this torch sees no CUDA GPU (torch {torch.__version__}, "
                             "CUDA_VISIBLE_DEVICES, drivers); run without it, or with --torch-device cpu")
        if d.index is not None and d.index >= n:
            raise ValueError(f"--torch-device {device}: only {n} GPU(s) visible (cuda:0..cuda:{n - 1})")
        return
    backend = {"mps": getattr(torch.backends, "mps", None)}.get(d.type, getattr(torch, d.type, None))
    available = getattr(backend, "is_available", None)
    if available is None:
        raise ValueError(f"--torch-device {device}: the engine runs on cpu, cuda or mps devices, not {d.type}")
    if not available():
        raise ValueError(f"--torch-device {device}: no {d.type} device is available here; use cpu or cuda")


def device_plan(workers: int, torch_device: str | None, gpus: list[str], cuda_env_set: bool = False
                ) -> list[tuple[str | None, str | None]]:
    """Per worker (CUDA_VISIBLE_DEVICES to give it or None to inherit, torch_device or None for the
    engine's default). GPUs are used when asked: `torch_device` "cuda", or none given while
    CUDA_VISIBLE_DEVICES is set (`cuda_env_set`); then worker i gets GPU gpus[i % len(gpus)] alone
    and runs on its "cuda:0". "cuda:K" pins every worker to that GPU; "cpu" (or any other device)
    is passed as is."""
    if torch_device is None and not cuda_env_set:
        return [(None, None)] * workers
    if torch_device not in (None, "cuda"):
        return [(None, torch_device)] * workers
    if not gpus:
        raise ValueError("--torch-device cuda: no GPU is visible (torch.cuda.device_count() is 0 or "
                         "CUDA_VISIBLE_DEVICES is empty); run without it, or with --torch-device cpu")
    return [(gpus[i % len(gpus)], "cuda:0") for i in range(workers)]


def _spawn(spec: StudySpec, index: int, log_dir: Path, threads: int,
           device: tuple[str | None, str | None] = (None, None)) -> subprocess.Popen:
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env[STORAGE_ENV] = spec.storage
    gpu, torch_device = device
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    log = open(log_dir / f"{spec.name}.worker{index}.log", "w")  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "sweep.study", "worker", "--study", spec.name, "--index", str(index),
             "--threads", str(threads)] + (["--torch-device", torch_device] if torch_device else []),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    finally:
        log.close()


def extra_trials(trials: list[FrozenTrial]) -> int:
    """Trials queued with a config from outside the study's space (`sweep allocate`), superseded
    copies and pruned duplicates left out."""
    from sweep.records import QUEUED_CONFIG

    sups = superseded_numbers(trials)
    return sum(1 for t in trials if QUEUED_CONFIG in t.user_attrs and t.number not in sups
               and t.state != TrialState.PRUNED)


def _aim(spec: StudySpec, planned: int, tl: Tally, trials: list[FrozenTrial]) -> tuple[int, int]:
    """(trials the study aims at, of which queued from outside the space). A grid aims at its
    planned configs plus the extra trials; a sampler at its budget, which extra trials use up too."""
    extra = extra_trials(trials)
    if spec.is_grid:
        return planned + extra, extra
    return max(planned, tl.slots), extra


def _best_text(trials: list[FrozenTrial], primary: str) -> str:
    best = None
    fastest = None
    for t in trials:
        a = t.user_attrs
        if t.state != TrialState.COMPLETE or "top1" not in a:
            continue
        sp = float((a.get("speed") or {}).get(primary, float("nan")))
        key_b = (a["top1"], sp)
        key_f = (sp, a["top1"])
        if best is None or key_b > best:
            best = key_b
        if fastest is None or key_f > fastest:
            fastest = key_f
    if best is None:
        return ""
    return (f"best top1 {best[0]:.1f}% @ {best[1]:.1f} t/s/u | "
            f"fastest {fastest[0]:.1f} t/s/u @ {fastest[1]:.1f}%")


def _log_tail(spec: StudySpec, index: int, n: int = 5) -> str:
    try:
        lines = (spec.runs_dir / f"{spec.name}.worker{index}.log").read_text().strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def run(spec: StudySpec, workers: int = 1, progress: bool = True, retry_failed: bool = False,
        out=None, poll_s: float = 0.5, torch_device: str | None = None) -> RunSummary:
    """Run (or resume) a study with `workers` worker processes; returns a summary.

    Raises KeyboardInterrupt after a clean shutdown when interrupted by SIGINT or SIGTERM (the
    summary is printed), even when started with SIGINT ignored (a background job of a script):
    the workers stop on SIGINT in any case, so the runner must too, not respawn them.
    """
    with _interruptible():
        return _run(spec, workers, progress, retry_failed, out, poll_s, torch_device)


@contextlib.contextmanager
def _interruptible():
    """SIGINT and SIGTERM raise KeyboardInterrupt while inside (main thread only)."""
    def interrupt(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        old = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave the handlers alone
        old = {}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _run(spec: StudySpec, workers: int, progress: bool, retry_failed: bool, out, poll_s: float,
         torch_device: str | None) -> RunSummary:
    out = sys.stdout if out is None else out
    devices = _check_workers(spec, workers, torch_device)
    t0 = time.time()
    prep = prepare(spec, retry_failed=retry_failed)
    study, queue = prep.study, prep.queue

    def tally() -> tuple[Tally, list[FrozenTrial]]:
        ts = study.get_trials(deepcopy=False)
        return Tally.of(ts), ts

    tl, trials = tally()
    total, extra = _aim(spec, prep.total, tl, trials)
    if spec.is_grid:
        remaining = tl.counts["WAITING"] + tl.counts["RUNNING"]
    else:
        remaining = max(total - tl.done, tl.counts["WAITING"])
    print(_start_message(spec, prep, tl, remaining, extra), file=out, flush=True)
    errors: list[str] = []
    interrupted = False
    recovered = list(prep.recovered)
    n_workers = 0
    if remaining > 0:
        log_dir = spec.runs_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        n_workers = min(workers, remaining)
        pool = _Pool(spec, log_dir, worker_threads(n_workers), devices, n_workers, 2 * workers)
        pool.start()
        interrupted = _supervise(pool, queue, study, tally, prep.total, total, tl.done, progress, poll_s, errors,
                                 recovered)
    tl, trials = tally()
    total, extra = _aim(spec, prep.total, tl, trials)
    summary = RunSummary(spec.name, total, prep.size, prep.skipped, tl.counts, tl.done, time.time() - t0,
                         n_workers, interrupted, recovered, errors, prep.total, extra)
    _print_summary(summary, trials, spec, out)
    if interrupted:
        raise KeyboardInterrupt
    return summary


def _check_workers(spec: StudySpec, workers: int, torch_device: str | None) -> list:
    """Check --workers and --device against the storage and the machine; the device of each worker."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if workers > 1 and not backend(spec.storage).atomic_claim:
        raise ValueError("SQLite storage cannot hand out trials to several workers safely (a trial can run twice); "
                         "use a journal file (journal:PATH, one machine) or PostgreSQL/MySQL, or --workers 1")
    check_torch_device(torch_device)
    cuda_env = cuda_env_set()
    wants_gpus = torch_device == "cuda" or (torch_device is None and cuda_env)
    return device_plan(workers, torch_device, visible_gpus() if wants_gpus else [], cuda_env)


def _start_message(spec: StudySpec, prep, tl: Tally, remaining: int, extra: int) -> str:
    """The run's first line: the space, the plan and what is left to run."""
    c = tl.counts
    msg = f"study {spec.name}: {prep.size} configs in the space"
    if spec.is_grid:
        msg += f", {prep.skipped} skipped as equal in numerics to a faster config; {prep.total} planned"
    else:
        msg += f", {spec.sampler.kind} sampler, budget {prep.total} trials"
    if extra:
        msg += f" + {extra} queued from outside the space (allocations)"
    msg += f": {c['COMPLETE']} complete" + (f", {c['FAIL']} failed" if c["FAIL"] else "") + f", {remaining} to run"
    if prep.requeued_failed:
        msg += f" ({prep.requeued_failed} failed trial(s) queued again)"
    if prep.recovered:
        msg += f"; recovered {len(prep.recovered)} trial(s) of dead workers ({', '.join(map(str, prep.recovered))})"
    return msg


@dataclass
class _Pool:
    """The worker processes of one `sweep run`: started, reaped, respawned (at most `max_respawns`)."""
    spec: StudySpec
    log_dir: Path
    threads: int
    devices: list
    size: int
    max_respawns: int
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    next_index: int = 0
    respawns: int = 0
    fatal: bool = False

    def start(self) -> None:
        self.procs = {i: _spawn(self.spec, i, self.log_dir, self.threads, self.devices[i]) for i in range(self.size)}
        self.next_index = self.size

    def respawn(self, n: int) -> None:
        for _ in range(n):
            i = self.next_index
            self.procs[i] = _spawn(self.spec, i, self.log_dir, self.threads, self.devices[i % len(self.devices)])
            self.next_index += 1
            self.respawns += 1

    def reap(self, errors: list[str]) -> bool:
        """Forget the workers that ended (their errors into `errors`); whether one died."""
        died = False
        for i, p in list(self.procs.items()):
            rc = p.poll()
            if rc is None:
                continue
            del self.procs[i]
            if rc == FATAL_EXIT:
                self.fatal = True
                errors.append(f"worker {i} stopped: {_log_tail(self.spec, i, 3)}")
            elif rc not in (0, 130):
                died = True
                errors.append(f"worker {i} died (exit status {rc}): {_log_tail(self.spec, i, 3)}")
        return died


def _supervise(pool: _Pool, queue, study, tally, planned: int, total: int, done: int, progress: bool, poll_s: float,
               errors: list[str], recovered: list[int]) -> bool:
    """Watch the workers until none is left: recover and respawn after deaths, move the progress
    bar. Whether the run was interrupted (Ctrl-C: the workers are shut down)."""
    from engine.progress import bar as progress_bar

    spec = pool.spec
    bar = progress_bar(total=total, initial=min(done, total), desc=spec.name, unit="trial", leave=True,
                       show=progress)  # on a terminal only: trials done, rate, time left
    if bar.disable:
        bar = None
    last_done = done
    try:
        while pool.procs:
            time.sleep(poll_s)
            if pool.reap(errors):
                with queue.guard():
                    recovered += queue.recover(study)
                tl, _ = tally()
                more = tl.counts["WAITING"] > 0 or (not spec.is_grid and tl.slots < planned)
                if more and pool.respawns < pool.max_respawns and not pool.fatal:
                    pool.respawn(max(0, pool.size - len(pool.procs)))
            if bar is not None:
                tl, trials = tally()
                if tl.done != last_done:
                    bar.update(min(tl.done, total) - bar.n)
                    last_done = tl.done
                    bar.set_postfix_str(_best_text(trials, spec.primary), refresh=True)
            if not pool.procs and not pool.fatal and pool.respawns < pool.max_respawns:
                # every worker is gone: trials still RUNNING belong to dead workers (e.g. of a
                # run killed before this one started): recover them and go on
                with queue.guard():
                    rec = queue.recover(study)
                recovered += rec
                if rec:
                    tl, _ = tally()
                    pool.respawn(min(pool.size, tl.counts["WAITING"]) or 1)
    except KeyboardInterrupt:
        _shutdown(pool.procs)
        return True
    finally:
        if bar is not None:
            tl, trials = tally()
            bar.update(max(0, min(tl.done, total) - bar.n))
            bar.close()
    return False


def _shutdown(procs: dict[int, subprocess.Popen], grace_s: float = 30.0) -> None:
    """Ask workers to stop (SIGINT: each fails and re-queues its running trial), then make sure."""
    for p in procs.values():
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
    deadline = time.time() + grace_s
    try:
        for p in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.time()))
    except KeyboardInterrupt:
        pass
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def _print_summary(s: RunSummary, trials: list[FrozenTrial], spec: StudySpec, out) -> None:
    c = s.counts
    sups = superseded_numbers(trials)
    line = (f"study {s.name}: {c['COMPLETE']} complete, {c['FAIL']} failed"
            + (f" (+{c['REQUEUED']} re-queued)" if c["REQUEUED"] else "")
            + f", {c['RUNNING']} running, {c['WAITING']} waiting of {s.total}"
            + (f" ({s.planned} planned + {s.extra} queued from outside the space)" if s.extra else ""))
    if spec.is_grid:
        line += f"; {s.skipped} skipped as equal in numerics"
    line += f"; wall {s.wall_s:.1f} s with {s.workers} worker(s)"
    print(line, file=out)
    best = _best_text(trials, spec.primary)
    if best:
        print(f"  {best} ({spec.primary})", file=out)
    for e in s.worker_errors:
        print(f"  {e}", file=out)
    for t in trials:
        if t.state == TrialState.FAIL and t.number not in sups:
            print(f"  trial {t.number} FAIL: {fail_reason(t, trials)}", file=out)
    if c["WAITING"]:
        print(f"  {c['WAITING']} trial(s) not run yet: run the same command again to resume", file=out)
    if c["RUNNING"]:
        print(f"  {c['RUNNING']} trial(s) still RUNNING in other workers (or in dead ones: the next run recovers them); "
              "`sweep status` lists them", file=out)
    out.flush()


