"""`sweep worker STUDY [--storage URL] [--torch-device DEV]`: join a study from any host.

One worker in this process: it claims trials until none are left, then exits (on a shared
database it first waits for other workers' running trials, since a dead host's trial comes back
to the queue). STUDY is a study file (the study is created and its grid queued if need be, as
`sweep run` does: safe from many hosts at once) or, with --storage, the name of a study already
in that storage. `sweep run` on each host is equivalent; this is the one-process form for
schedulers (one worker per GPU, per container, per SLURM task).
"""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("worker", help="join a study from any host: one worker that claims trials until none are left")
    p.add_argument("study", help="study file (e.g. studies/lt-pareto.toml), or a study name with --storage")
    p.add_argument("--storage", help="storage URL (postgresql://user@host/db, ...); overrides the study file's")
    p.add_argument("--torch-device", metavar="DEV",
                   help="torch device of the evaluations (cuda:0, cpu; default: the engine's, or cuda:0 when "
                        "CUDA_VISIBLE_DEVICES names a GPU). Not the Wormhole --device")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    # the process ends without interpreter teardown once everything is stored (sweep.cli.main)
    p.set_defaults(func=run, hard_exit=True)


def run(args) -> int:
    import os
    import zlib

    from sweep.space import load_spec
    from sweep.study import identity
    from sweep.study.runner import check_torch_device, cuda_env_set
    from sweep.study.storage import backend
    from sweep.study.trials import Tally
    from sweep.study.worker import open_worker_study, serve

    check_torch_device(args.torch_device)
    if Path(args.study).is_file() or args.study.endswith(".toml"):
        spec = load_spec(args.study, storage=args.storage)
        storage_url = spec.storage
    elif args.storage:
        spec, storage_url = None, args.storage
    else:
        raise ValueError(f"{args.study}: no such study file; give a study file, or a study name with --storage URL")
    if not backend(storage_url).atomic_claim:
        raise ValueError("SQLite storage cannot hand out trials to several workers safely; use a journal file "
                         "(one machine) or PostgreSQL/MySQL, or `sweep run STUDY --workers 1`")
    if spec is not None:
        from sweep.study.prepare import prepare

        storage = prepare(spec).queue.storage  # creates the study / queues the grid if nobody has yet (guarded)
    else:
        spec, storage = open_worker_study(storage_url, args.study, lock_dir=str(Path.cwd() / ".runs"))
    device = args.torch_device or ("cuda:0" if cuda_env_set() else None)
    host, pid = identity.host_name(), os.getpid()
    index = 1000 + zlib.crc32(f"{host}/{pid}".encode()) % 1_000_000  # seeds this worker's sampler
    print(f"sweep worker: {host} pid {pid} joins study {spec.name}" + (f" on {device}" if device else ""), flush=True)
    rc = serve(spec, storage, index, device, args.threads or None)
    import optuna

    tally = Tally.of(optuna.load_study(study_name=spec.name, storage=storage).get_trials(deepcopy=False))
    c = tally.counts
    if rc == 0 and c["FAIL"]:
        from sweep.commands.run import failed_status

        rc = failed_status("worker", args.study, c, args.storage)
    print(f"sweep worker: {host} pid {pid} done (exit {rc}); study {spec.name}: {c['COMPLETE']} complete, "
          f"{c['FAIL']} failed, {c['REQUEUED']} re-queued, {c['RUNNING']} running, {c['WAITING']} waiting", flush=True)
    return rc
