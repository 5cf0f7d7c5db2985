"""Who a worker is (host + pid + process start + boot) and whether a worker on this host still lives.

The host name is `socket.gethostname()`, or `$TTSWEEP_HOST` when set: tests run two "hosts" on one
machine that way, and a user can name hosts whose hostnames collide (containers). A process is only
judged alive or dead by its pid on the host (and boot) that recorded it; other hosts' workers are
judged by their heartbeats.
"""
from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

import optuna

HOST_ENV = "TTSWEEP_HOST"


def host_name() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def proc_start(pid: int) -> str:
    """Start time of a process (ticks since boot), "zombie" for a zombie, "" when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return "zombie"
    return fields[19]


def worker_identity() -> dict:
    pid = os.getpid()
    return {"host": host_name(), "pid": pid, "start": proc_start(pid), "boot": boot_id()}


def on_this_host(w: dict) -> bool:
    """Whether a worker identity was recorded on this host since its last boot."""
    return w.get("host") == host_name() and w.get("boot", "") == boot_id()


def pid_alive(w: dict) -> bool:
    """Whether the process of a worker identity of this host still runs (not a reused pid)."""
    pid = int(w.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = proc_start(pid)
    if start == "zombie":
        return False
    return not (w.get("start") and start and start != w["start"])


def host_info() -> str:
    """One line about this host for the trial record (name, OS, cpus, versions)."""
    try:
        import torch

        tv = torch.__version__
    except Exception:  # noqa: BLE001
        tv = "?"
    return (f"{host_name()} ({platform.system()} {platform.machine()}, {os.cpu_count()} cpus, "
            f"python {platform.python_version()}, torch {tv}, optuna {optuna.__version__})")
