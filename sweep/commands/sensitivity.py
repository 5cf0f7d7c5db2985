"""`sweep sensitivity STUDY [--workers N] [--out DIR] [--fisher]`: measure the study's sensitivity
profile: from its [sensitivity] base config, change one (layer, family) choice at a time and
measure the damage on the section's short teacher-forced window.

The probes are the trials of a study of their own (`<name>.sensitivity`, same storage), so the
profile resumes after a crash and several workers or hosts share it like any study (another host
joins with `sweep worker <name>.sensitivity --storage URL`). When every probe is measured it writes
`<out>/profile.csv` (sweep.profile.COLUMNS: delta-KLD with its 95% interval, delta-Top-1, the
Top-1 discordant positions and McNemar p, per probe) and `<out>/profile-heatmap.png` (layers x
family=choice). `--fisher` adds the first-order estimate (engine.accuracy.fisher: one fp32 backward pass,
sum over positions of (g . dy)^2 per probe) as column `fisher` and prints its Spearman rank
agreement with the measured delta-KLD.
"""
from __future__ import annotations

import json
from pathlib import Path

DEFAULT_OUT = "reports/allocate"


def register(sub) -> None:
    p = sub.add_parser("sensitivity", help="measure a study's per-layer sensitivity profile ([sensitivity] section)",
                       description=__doc__)
    p.add_argument("study", help="study file with a [sensitivity] section, e.g. studies/smollm2-allocate.toml")
    p.add_argument("-w", "--workers", type=int, default=1, help="worker processes (default: %(default)s)")
    p.add_argument("--storage", help="override the study file's storage URL")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for profile.csv and the heatmap (default: %(default)s)")
    p.add_argument("--fisher", action="store_true",
                   help="also compute the first-order (Fisher) estimate and its rank agreement with the measured profile")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--retry-failed", action="store_true",
                   help="queue again the probes whose trials FAILed; by default they stay failed")
    p.set_defaults(func=run)


def run(args) -> int:
    from sweep.commands.paths import check_output
    from sweep.profile import measured, write_csv
    from sweep.space import load_spec, sensitivity_study
    from sweep.study import load_study
    from sweep.study import run as run_study

    spec = load_spec(args.study, storage=args.storage)
    sspec = sensitivity_study(spec)  # no [sensitivity]: a one-line error before anything is written
    check_output(args.out, "--out", kind="dir", default=DEFAULT_OUT)
    summary = run_study(sspec, workers=args.workers, progress=not args.no_progress,
                        retry_failed=getattr(args, "retry_failed", False))
    if summary.worker_errors and summary.counts.get("WAITING", 0):
        return 1
    from sweep.commands.run import failed_status

    if failed_status("sensitivity", args.study, summary.counts, args.storage, rerun="sensitivity"):
        return 1  # a profile with failed probes is not written
    study = load_study(sspec)
    profile = measured(study, sspec.space)
    out = Path(args.out)
    info = {"study": spec.name, "model": spec.model, "base": sspec.space_doc["probes"]["base"],
            "prefill": sspec.eval["prefill"], "decode": sspec.eval["decode"], "probes": int(len(profile) - 1),
            "layers": len(sspec.space.layers), "families": sspec.space_doc["probes"]["families"]}
    info |= _wall_times(study)
    if args.fisher:
        info |= _add_fisher(profile, sspec)
    write_csv(profile, out / "profile.csv")
    (out / "profile.json").write_text(json.dumps(info, indent=2) + "\n")
    from sweep.plots import plot_profile
    from sweep.report import display_name

    heat = plot_profile(profile, out / "profile-heatmap",
                        f"{display_name(spec.model)}: delta KLD of one change to {info['base']} "
                        f"({info['prefill']}+{info['decode']} tokens)")
    _print(profile, info, out, heat)
    return 0


def _wall_times(study) -> dict:
    """Evaluation wall time of the profile's trials, and of its base trial (one short trial)."""
    from optuna.trial import TrialState

    ts = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    walls = [float(t.user_attrs.get("wall_s") or 0.0) for t in ts]
    return {"wall_s_total": round(sum(walls), 1), "wall_s_per_probe": round(sum(walls) / max(1, len(walls)), 3)}


def _add_fisher(profile, sspec) -> dict:
    """Fill column `fisher` (first-order delta) and return {fisher_spearman, fisher_s}."""
    from scipy.stats import spearmanr

    from engine.accuracy.evaluator import Evaluator
    from engine.accuracy.fisher import fisher_profile
    from sweep.probes import Probe

    ev = Evaluator(sspec.model, prefill=sspec.eval["prefill"], decode=sspec.eval["decode"], device=sspec.primary,
                   **sspec.numerics_kwargs())
    space = sspec.space
    probes = [Probe.parse(label) for label in profile["probe"]]
    pairs = [(p.layer, space.layer_config(p.layer, p.family, p.choice)) for p in probes if p.layer is not None]
    fp = fisher_profile(ev, space.base, pairs)
    it = iter(fp.deltas)
    profile["fisher"] = [0.0 if p.layer is None else next(it) for p in probes]
    probes_only = profile[profile["layer"] >= 0]
    rho = spearmanr(probes_only["fisher"], probes_only["d_kld"]).statistic
    return {"fisher_spearman": round(float(rho), 4), "fisher_s": round(fp.seconds_backward + fp.seconds_probes, 2)}


def _print(profile, info: dict, out: Path, heat: Path) -> None:
    probes = profile[profile["layer"] >= 0].sort_values("d_kld", ascending=False)
    print(f"sensitivity of {info['study']} ({info['model']}): {info['probes']} probes over {info['layers']} layers "
          f"from {info['base']}, {info['prefill']}+{info['decode']} tokens; base KLD {profile['config_kld'].iloc[0]:.5f}")
    print("most damaging probes (delta KLD [95%], Top-1 discordant probe-right/base-right):")
    for r in probes.head(8).itertuples():
        print(f"  {r.probe:<28} {r.d_kld:+.5f} [{r.d_kld_lo:+.5f}, {r.d_kld_hi:+.5f}]  {r.probe_right}/{r.base_right}")
    if "fisher_spearman" in info:
        print(f"first-order (Fisher) estimate: Spearman {info['fisher_spearman']:.3f} with the measured delta-KLD "
              f"({info['fisher_s']:.1f} s)")
    print(f"wrote {out / 'profile.csv'}, {out / 'profile.json'}, {heat}")
