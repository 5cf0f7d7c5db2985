"""Fault injection for the study tests, through the worker's plugin point (SWEEP_WORKER_HOOK, see
sweep.study.worker.before_evaluate_hook): `hook_env(SWEEP_TEST_...=...)` is the environment that
makes every worker of a run (in this process or in subprocesses) call `before_evaluate` below with
each trial's config string just before it evaluates it. The switches:

    SWEEP_TEST_HANG=PATH   the first trial to evaluate (whoever creates PATH) writes its pid
                           there and sleeps, so a test can SIGKILL a worker mid-trial;
    SWEEP_TEST_FAIL=TEXT   trials whose config string contains TEXT raise NonFiniteLogits;
    SWEEP_TEST_BUSY_THREAD=1  the first trial starts a daemon thread that multiplies matrices with
                           torch until the process ends: a thread inside torch's C++ at exit, as a
                           library's can be, which aborts a process that tears its interpreter down
                           ("terminate called without an active exception", exit 134).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

HOOK = f"{Path(__file__).resolve()}:before_evaluate"
_busy: list[threading.Thread] = []


def hook_env(**env: str) -> dict[str, str]:
    """`env` plus the variable that installs `before_evaluate` as the workers' hook."""
    return {"SWEEP_WORKER_HOOK": HOOK, **env}


def before_evaluate(cfg: str) -> None:
    if os.environ.get("SWEEP_TEST_BUSY_THREAD") and not _busy:
        import torch

        a = torch.ones(512, 512)

        def spin():
            while True:
                a @ a

        _busy.append(threading.Thread(target=spin, daemon=True, name="test-busy"))
        _busy[0].start()
    hang = os.environ.get("SWEEP_TEST_HANG")
    if hang:
        try:
            fd = os.open(hang, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            fd = None
        if fd is not None:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            while True:
                time.sleep(0.2)
    fail = os.environ.get("SWEEP_TEST_FAIL")
    if fail and fail in cfg:
        from engine.accuracy.evaluator import NonFiniteLogits

        raise NonFiniteLogits("non-finite logits at decode position 3 (test hook SWEEP_TEST_FAIL)")
