"""A worker: claims trials of a study one at a time and evaluates them until none are left.

Per trial a worker evaluates accuracy once (engine.accuracy.evaluator.Evaluator, one per worker process,
built on first use, on `torch_device` when one is given) unless a COMPLETE trial with the same
numerics key exists (then it reuses that trial's accuracy: `reused_from`), predicts speed and
TTFT for every device of the study (engine.perf.model.predict), and stores a `sweep.records.TrialRecord`
as user attributes, plus:

    numerics_key   digest of sweep.equivalence.numerics_key (equal = provably same numerics)
    worker         {"host", "pid", "start", "boot"}: who runs / ran the trial (`identity`)
    heartbeat      unix time, refreshed every heartbeat_s() while the trial runs (and, on a
                   shared database, Optuna's heartbeat row)
    trial_s        the whole trial's wall time (accuracy + perf + storage)
    fail_reason    FAIL trials: one line (exception type and message)
    superseded     FAIL trials whose config was queued again (killed worker, Ctrl-C)
    requeued_from  the trial number a re-queued trial replaces
    duplicate_of   PRUNED trials: a grid config that was already COMPLETE

A trial whose evaluation raises (NonFiniteLogits, MemoryError, anything) is told FAIL with its
reason and the study goes on. SIGINT / SIGTERM: the worker fails its running trial with reason
"interrupted", queues its params again and exits 130; finished trials are never lost (each is
told as soon as it ends). Samplers: a new trial is asked only under the queue's guard while the
budget (`n_trials`, counting every trial that is not superseded) has room.

SWEEP_WORKER_HOOK names a function called before each evaluation (`before_evaluate_hook`).

`serve` is the whole life of a worker process: `python -m sweep.study worker` (started by
`sweep run`) and `sweep worker` (joining a study from any host) both end there.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from engine.vocab.config import ModelConfig
from sweep.equivalence import numerics_digest
from sweep.records import ALLOCATION, QUEUED_CONFIG, TrialRecord, accuracy_attrs
from sweep.space import StudySpec, spec_from_dict
from sweep.study import identity, locks
from sweep.study.optuna_compat import frozen_trial, storage_of, trial_id, unwrapped_storage
from sweep.study.prepare import make_sampler
from sweep.study.queue import TrialQueue, queue_for, storage_for_queue
from sweep.study.recovery import fail_and_requeue
from sweep.study.storage import heartbeat_s, redact
from sweep.study.trials import Tally

FATAL_EXIT = 3  # worker exit status: cannot work at all (model cannot load, ...)


class _Interrupted(Exception):
    pass


class FatalWorkerError(RuntimeError):
    """The worker cannot evaluate anything (its evaluator cannot be built)."""


def one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


class Worker:
    """One worker: claims trials of a study and evaluates them until none are left."""

    def __init__(self, study: optuna.Study, spec: StudySpec, index: int = 0, queue: TrialQueue | None = None,
                 torch_device: str | None = None):
        self.study = study
        self.spec = spec
        self.index = index
        self.queue = queue or queue_for(spec, unwrapped_storage(storage_of(study)))
        self.torch_device = torch_device
        self.evaluator = None  # the last one used
        self.evaluators: dict = {}  # numerics layout -> Evaluator
        self._layout_map: dict | None = None
        self.stop = False
        self.in_eval = False
        self.current: optuna.Trial | None = None
        self.host = identity.host_info()
        self._hb_stop = threading.Event()
        self._hb = None

    # --- claiming --------------------------------------------------------------------------
    def claim(self) -> optuna.Trial | None:
        if self.spec.is_grid:
            return self.queue.claim(self.study)
        with self.queue.guard():
            trial = self.queue.claim(self.study)
            if trial is not None:
                return trial
            tally = Tally.of(self.study.get_trials(deepcopy=False))
            if tally.slots >= int(self.spec.sampler.n_trials or 0):
                return None
            with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": we beat ourselves
                warnings.simplefilter("ignore")
                return self.study.ask()

    def _wait_for_others(self) -> bool:
        """Nothing to claim: on shared storage, while other workers' trials run, wait a heartbeat and
        recover the trials of dead workers (they come back to the queue); True to claim again."""
        if not self.queue.waits_for_others or not self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return False
        deadline = time.time() + heartbeat_s()
        while not self.stop and time.time() < deadline:
            time.sleep(0.1)
        if self.stop:
            return False
        with self.queue.guard():
            self.queue.recover(self.study)
        return True

    # --- heartbeat ---------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._hb_stop.wait(heartbeat_s()):
            t = self.current
            if t is None:
                continue
            try:
                self.queue.beat(self.study, trial_id(t))
            except Exception:  # noqa: BLE001 - the trial just finished, or a transient storage error
                pass

    # --- one trial ---------------------------------------------------------------------------
    def _evaluator(self, device: str | None = None):
        """The evaluator for `device`'s numerics (default the primary device), one per layout. A device
        whose numerics are not emulated (TG) uses the primary's, and a non-emulated primary N150's."""
        from engine.accuracy.evaluator import Evaluator

        layouts = self._layouts()
        emulated = next((d for d in (device or self.spec.primary, self.spec.primary) if layouts[d]), "N150")
        lay = layouts.get(emulated) or (1, 1)
        if lay not in self.evaluators:
            kw = {"torch_device": self.torch_device} if self.torch_device else {}  # CPU runs: the engine's default
            kw |= self.spec.numerics_kwargs()
            with locks.study_lock(self.spec, "evaluator"):
                ev = self.evaluators[lay] = Evaluator(self.spec.model, **self.spec.eval, device=emulated, **kw)  # prefill, decode, windows
            from sweep.probes import ProbeSpace

            if isinstance(self.spec.space, ProbeSpace):  # every trial is the base with one layer changed:
                ev.set_anchor(self.spec.space.base)  # a probe of layer L recomputes from layer L on
        self.evaluator = self.evaluators[lay]
        return self.evaluator

    def _layouts(self) -> dict[str, tuple | None]:
        """device -> (tensor-parallel chips, wo split) of its numerics, None where not emulated (TG)."""
        if self._layout_map is None:
            from engine.accuracy.evaluator import numerics_layout
            from engine.models.loaders import model_spec

            spec = model_spec(self.spec.model)
            out = {}
            for d in self.spec.devices:
                try:
                    out[d] = numerics_layout(spec, d)
                except ValueError:
                    out[d] = None
            self._layout_map = out
        return self._layout_map

    def _find_equal(self, digest: str, number: int) -> FrozenTrial | None:
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number != number and t.user_attrs.get("numerics_key") == digest and "top1" in t.user_attrs:
                return t
        return None

    def _trial_config(self, trial: optuna.Trial) -> ModelConfig:
        """The config a claimed trial evaluates: its queued config string, or its params."""
        queued = trial.user_attrs.get(QUEUED_CONFIG)
        if queued:  # a config from outside the space (an allocation, a comparison): no params
            return ModelConfig.parse(queued, self.spec.n_layers, self.spec.model)
        fixed = frozen_trial(self.study, trial).system_attrs.get("fixed_params")
        missing = [p.name for p in self.spec.space.params if fixed and p.name not in fixed]
        if missing:  # the sampler would fill them at random: another config than the one queued
            raise ValueError(f"trial was queued without params {', '.join(missing)}; "
                             "re-run `sweep run --retry-failed` to queue its config again")
        return self.spec.space.config(self.spec.space.suggest(trial))

    def process(self, trial: optuna.Trial) -> str:
        """Evaluate one claimed trial; returns its final state name."""
        t_start = time.time()
        self.current = trial
        try:
            self.queue.beat(self.study, trial_id(trial))  # at once: a trial never lacks a heartbeat for long
            trial.set_user_attr("worker", identity.worker_identity())
            mc = self._trial_config(trial)
            cfg = str(mc)
            digest = numerics_digest(mc, layout=self._layouts()[self.spec.primary] or (1, 1))
            trial.set_user_attr("config", cfg)
            trial.set_user_attr("numerics_key", digest)
            if self.spec.is_grid:
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                    if t.user_attrs.get("config") == cfg and t.number != trial.number:
                        trial.set_user_attr("duplicate_of", t.number)
                        self.study.tell(trial, state=TrialState.PRUNED)
                        return "PRUNED"
            rec = self._record(trial, mc, cfg, digest)
            for k, v in rec.to_user_attrs().items():
                trial.set_user_attr(k, v)
            trial.set_user_attr("trial_s", round(time.time() - t_start, 3))
            for c in self.spec.constraints:
                trial.set_constraint(c.key, c.violation(rec.objective(c.metric)))
            values = [rec.objective(o) for o in self.spec.objectives]
            bad = [o for o, v in zip(self.spec.objectives, values) if not math.isfinite(v)]
            if bad:
                raise ValueError(f"objective {bad[0]} is not finite ({values[self.spec.objectives.index(bad[0])]})")
            self.study.tell(trial, values)
            return "COMPLETE"
        except (KeyboardInterrupt, _Interrupted):
            self.in_eval = False
            self.stop = True
            ft = frozen_trial(self.study, trial)
            if not ft.state.is_finished():
                fail_and_requeue(self.study, ft, "interrupted (Ctrl-C or SIGTERM) during the trial; re-queued", death=False)
            return "INTERRUPTED"
        except FatalWorkerError:
            ft = frozen_trial(self.study, trial)
            if not ft.state.is_finished():
                fail_and_requeue(self.study, ft, "worker could not start its evaluator; re-queued", death=False)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one trial fails that trial only
            reason = one_line(exc)
            try:
                trial.set_user_attr("fail_reason", reason)
                trial.set_user_attr("trial_s", round(time.time() - t_start, 3))
                self.study.tell(trial, state=TrialState.FAIL)
            except UpdateFinishedTrialError:
                pass
            return "FAIL"
        finally:
            self.in_eval = False
            self.current = None

    def _record(self, trial: optuna.Trial, mc: ModelConfig, cfg: str, digest: str) -> TrialRecord:
        src = self._find_equal(digest, trial.number)
        if src is not None:
            a = src.user_attrs
            acc = accuracy_attrs(a)  # with its per-token record: the numerics are equal
            acc["accuracy"] = dict(a.get("accuracy") or {})
            reused_from = a.get("reused_from") or a["config"]
            wall = 0.0
        else:
            primary = self._layouts()[self.spec.primary]
            others = {}  # a layout other than the primary's -> its devices
            for d in self.spec.devices[1:]:
                lay = self._layouts()[d]
                if lay is not None and lay != primary:
                    others.setdefault(lay, []).append(d)
            try:
                ev = self._evaluator()
                extra = {lay: self._evaluator(devs[0]) for lay, devs in others.items()}
            except Exception as exc:  # noqa: BLE001
                raise FatalWorkerError(one_line(exc)) from exc
            t0 = time.perf_counter()
            self.in_eval = True  # from here SIGINT / SIGTERM interrupt the evaluation
            if self.stop:
                raise _Interrupted()
            hook = before_evaluate_hook()
            if hook is not None:
                hook(cfg)
            res = ev.evaluate(mc)
            per_device = {}
            for lay, devs in others.items():  # once per distinct numerics, not per device
                r = extra[lay].evaluate(mc)
                for d in devs:
                    per_device[d] = dict(top1=r.top1, top5=r.top5, top1_ci=list(r.top1_ci), top5_ci=list(r.top5_ci), kld=r.kld)
            self.in_eval = False
            wall = time.perf_counter() - t0
            acc = accuracy_attrs(res) | {"accuracy": per_device}
            reused_from = None
        from engine.perf import model as perf

        speed, ttft = {}, {}
        for d in self.spec.devices:
            r = perf.predict(self.spec.model, d, mc, **self.spec.perf)
            speed[d], ttft[d] = float(r.speed_tsu), float(r.ttft_ms)
        try:
            dj = mc.to_decoder_json()
        except Exception:  # noqa: BLE001 - e.g. hifi3 / fp32 have no tt-metal equivalent
            dj = None
        return TrialRecord(config=cfg, model=self.spec.model, speed=speed, ttft=ttft, wall_s=round(wall, 4),
                           host=self.host, reused_from=reused_from, decoder_json=dj,
                           allocation=trial.user_attrs.get(ALLOCATION), **acc)

    # --- the loop ------------------------------------------------------------------------------
    def run(self, max_trials: int | None = None) -> dict[str, int]:
        done: dict[str, int] = {}
        self._hb = threading.Thread(target=self._heartbeat, daemon=True)
        self._hb.start()
        try:
            with locks.worker_presence(self.spec):
                n = 0
                while not self.stop and (max_trials is None or n < max_trials):
                    trial = self.claim()
                    if trial is None:
                        if self._wait_for_others():
                            continue
                        break
                    state = self.process(trial)
                    done[state] = done.get(state, 0) + 1
                    n += 1
        finally:
            self._hb_stop.set()
            self._hb.join(timeout=5)  # a beat in flight ends; no thread of ours outlives the worker
        return done


def before_evaluate_hook() -> Callable[[str], None] | None:
    """The worker's plugin point: SWEEP_WORKER_HOOK=MODULE:FUNCTION (or PATH.py:FUNCTION) names a
    function that every worker calls with the trial's config string just before it evaluates its
    accuracy (the trial is claimed, its heartbeat runs, SIGINT / SIGTERM interrupt it from here on),
    e.g. to log or trace trials or to inject faults (tests/worker_hooks.py). What it raises fails the
    trial as an error of the evaluation would. Unset or empty: no hook. Loaded once per process."""
    return _load_hook(os.environ.get("SWEEP_WORKER_HOOK", ""))


@functools.lru_cache(maxsize=None)
def _load_hook(target: str) -> Callable[[str], None] | None:
    if not target:
        return None
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"SWEEP_WORKER_HOOK={target!r}: write MODULE:FUNCTION or PATH.py:FUNCTION")
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        if spec is None or spec.loader is None or not Path(where).is_file():
            raise ValueError(f"SWEEP_WORKER_HOOK={target!r}: no file {where}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def open_worker_study(storage_url: str, study_name: str, lock_dir: str | None = None):
    """(spec, storage) of a study that already exists in `storage_url`; the spec is read back
    from the study with this host's storage URL (and, for a worker joining from another host,
    `lock_dir` for its local lock files and logs)."""
    storage = storage_for_queue(storage_url, create=False)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise ValueError(f"study {study_name!r} is not in {redact(storage_url)}; start it with `sweep run STUDY_FILE "
                         "--storage URL` (or give `sweep worker` the study file)") from None
    if "spec" not in study.user_attrs:
        raise ValueError(f"study {study_name!r} in {redact(storage_url)} was not made by `sweep run` (no spec)")
    spec = spec_from_dict(study.user_attrs["spec"])
    spec = dataclasses.replace(spec, storage=storage_url, _lock_dir=lock_dir)
    return spec, storage


def serve(spec: StudySpec, storage, index: int, torch_device: str | None = None, threads: int | None = None) -> int:
    """The life of a worker process: claim and evaluate trials until none are left. Exit status:
    0 done, 130 interrupted (SIGINT / SIGTERM; the running trial is re-queued), FATAL_EXIT when
    the evaluator cannot be built."""
    state: dict = {"worker": None}
    if threads:
        import torch

        torch.set_num_threads(threads)

    def on_signal(signum, frame):  # noqa: ARG001
        w = state["worker"]
        if w is None:  # still starting (maybe inside torch's C++): remember, stop before the first claim
            state["stop"] = True
            return
        if w.stop and not w.in_eval:
            return
        w.stop = True
        if w.in_eval:
            w.in_eval = False
            raise _Interrupted()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        n_existing = len(study.get_trials(deepcopy=False))
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec, index, n_existing))
        worker = Worker(study, spec, index, queue_for(spec, storage), torch_device)
        worker.stop = bool(state.get("stop"))
        state["worker"] = worker
        worker.run()
    except FatalWorkerError as exc:
        print(f"worker {index} ({identity.host_name()}, pid {os.getpid()}): cannot evaluate: {exc}", file=sys.stderr)
        return FATAL_EXIT
    except (KeyboardInterrupt, _Interrupted):
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 130 if worker.stop else 0


def worker_main(storage_url: str, study_name: str, index: int, threads: int | None = None,
                torch_device: str | None = None) -> int:
    """Entry point of a worker process started by `sweep run` (`python -m sweep.study worker`)."""
    spec, storage = open_worker_study(storage_url, study_name)
    return serve(spec, storage, index, torch_device, threads)
