"""DG-Net in one CPU hour (issue 22): the fast-convergence levers side by side, at equal compute.

Each arm is the small preset with one lever on (`ARMS`), trained on the full Market-1501 train set
with the same seed, teacher and judge, on one core. Its CPU-minutes are its iterations times its
seconds per iteration measured on a free core (``bench/dgnet_speed.py --arms``): wall-clock time on
a shared machine is noise. This script only measures and collects; the runs are trained
beforehand (README, "DG-Net in one CPU hour"):

    python bench/dgnet_fast.py --arms runs/arms --speed bench/results/dgnet_speed_arms.json \\
        --judge runs/judge_full/checkpoints/last.pt [--long runs/dgnet_fast --control runs/teacher_control]

It writes ``bench/results/dgnet_fast.json`` (every arm's curve of the cheap quality figures against
CPU-minutes, judged by the teacher and by the judge, and its final figures at ``--n`` images) and
``bench/results/dgnet_fast_curves.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The arms: settings over the small preset, one lever each, then the combination (the fast preset).
ARMS: dict[str, dict] = {
    "small": {},
    "perc": {"perc": 1.0},
    "idf": {"id_recon": 1.0},
    "projected": {"discriminator": "projected"},
    "diffaug": {"diffaugment": "color,translation,cutout"},
    "mlp_lr": {"lr_mlp_mult": 10.0},
    "perc_idf": {"perc": 1.0, "id_recon": 1.0},  # the fast preset
    "projected_all": {"discriminator": "projected", "diffaugment": "color,translation,cutout", "perc": 1.0,
                      "id_recon": 1.0},
    # The second round, over the fast preset (perc + idf): the banded style loss on the cross images,
    # the AdaIN MLPs' learning rate, and the learning rate of E_s, G and D.
    "perc_idf_style": {"perc": 1.0, "id_recon": 1.0, "style": 1.0},
    "perc_idf_style_mlp_lr": {"perc": 1.0, "id_recon": 1.0, "style": 1.0, "lr_mlp_mult": 10.0},
    "perc_idf_lr4": {"perc": 1.0, "id_recon": 1.0, "lr_gen": 4e-4},
    "perc_idf_style_lr4": {"perc": 1.0, "id_recon": 1.0, "style": 1.0, "lr_gen": 4e-4},
    "perc01_idf_style_lr4": {"perc": 0.1, "id_recon": 1.0, "style": 1.0, "lr_gen": 4e-4},
    # The third round, over the fast preset of the second (perc + idf + lr 4e-4): how the appearance
    # code reaches G. The code standardised before the MLPs; region-adaptive (banded) AdaIN; the
    # appearance-modulated RGB head; and their combinations.
    "lr4_code_norm": {"perc": 1.0, "id_recon": 1.0, "lr_gen": 4e-4, "code_norm": True},
    "lr4_bands": {"perc": 1.0, "id_recon": 1.0, "lr_gen": 4e-4, "adain_bands": True},
    "lr4_bands_code_norm": {"perc": 1.0, "id_recon": 1.0, "lr_gen": 4e-4, "adain_bands": True, "code_norm": True},
    "lr4_bands_rgb": {"perc": 1.0, "id_recon": 1.0, "lr_gen": 4e-4, "adain_bands": True, "rgb_modulation": True},
    "lr4_bands_code_norm_rgb": {"perc": 1.0, "id_recon": 1.0, "lr_gen": 4e-4, "adain_bands": True,
                                "code_norm": True, "rgb_modulation": True},
}

# The cheap figures the trainer logs on 64 fixed training images (every --quality-every iterations).
CURVE_KEYS = ("identity_consistency", "reconstruction_identity", "identity_consistency_judge",
              "reconstruction_identity_judge", "reconstruction_ssim", "teacher_fd")
# The figures of `reidgen quality` kept per snapshot.
FINAL_KEYS = ("identity_consistency", "reconstruction_identity", "structure_identity_share", "real_identity",
              "identity_consistency_judge", "reconstruction_identity_judge", "structure_identity_share_judge",
              "real_identity_judge", "reconstruction_ssim", "reconstruction_l1", "fid", "kid", "fid_real",
              "diversity_ssim", "teacher_fd", "step")


def seconds_per_iteration(speed: dict, arm: str, bf16: bool) -> float:
    """The arm's seconds per iteration on a free core, from a ``dgnet_speed.py --arms`` record
    (``--cost-proxy`` may name another arm whose figure stands in, recorded as such)."""
    precision = "bf16" if bf16 else "fp32"
    arm = COST_PROXY.get(arm, arm)
    for r in speed["results"]:
        # the layout training ran in (records made before the layout was recorded: the default then)
        if r.get("arm") == arm and r["precision"] == precision and r.get("layout", "default") == "default":
            return r["seconds_per_iteration"]
    raise SystemExit(f"the speed record has no {precision} figure for arm {arm!r}: run bench/dgnet_speed.py --arms")


COST_PROXY: dict[str, str] = {}


def snapshot_quality(checkpoint: Path, judge: str, n: int, device: str) -> dict:
    """`reidgen quality` of one snapshot at n images with the judge, cached beside it."""
    from trainer.evaluation.quality import measure_quality

    cached = checkpoint.with_name(f"quality_{checkpoint.stem}_n{n}.json")
    report = json.loads(cached.read_text()) if cached.is_file() else {}
    if not set(FINAL_KEYS) <= set(report) or report.get("judge") != judge:
        report = measure_quality(checkpoint, judge=judge, n=n, device=device)
        cached.write_text(json.dumps(report, indent=2))
    return {k: report[k] for k in FINAL_KEYS}


def collect_arm(run: Path, arm: str, speed: dict, judge: str, n: int, device: str,
                steps: dict[int, int] | None = None) -> dict:
    """One arm: its settings, cost, the cheap curve against CPU-minutes and `reidgen quality` of its
    last kept snapshot at n images, or of the snapshots in ``steps`` {step: n} (FID needs Inception:
    minutes per snapshot on a CPU)."""
    from reidgen.core.checkpoint import load_checkpoint
    from trainer.runlog import read_jsonl

    final = load_checkpoint(run, "dgnet")
    config = final["train_config"]
    spi = seconds_per_iteration(speed, arm, bool(config.get("cpu_bf16")))
    curve = [{"step": r["step"], "cpu_minutes": round(r["step"] * spi / 60, 2),
              **{k: r[k] for k in CURVE_KEYS if k in r}}
             for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "quality"]
    kept = sorted((run / "checkpoints").glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    snapshots = []
    step_of = {int(p.stem.split("_")[1]): p for p in kept}
    missing = sorted(set(steps or ()) - set(step_of))
    if missing:
        raise SystemExit(f"{run} keeps no snapshot at step(s) {missing}; it has {sorted(step_of)}")
    last = kept[-1] if kept else run / "checkpoints" / "last.pt"  # a run that kept no snapshots: its end
    for path, size in [(step_of[s], k) for s, k in steps.items()] if steps else [(last, n)]:
        figures = snapshot_quality(path, judge, size, device)
        snapshots.append({**figures, "n": size, "cpu_minutes": round(figures["step"] * spi / 60, 2)})
        print(arm, json.dumps(snapshots[-1]), flush=True)
    return {"settings": ARMS.get(arm, {}), "run": str(run), "iterations": final["step"],
            "cost_measured_as": COST_PROXY.get(arm, arm),
            "seconds_per_iteration": spi, "cpu_minutes": round(final["step"] * spi / 60, 2),
            "curve": curve, "snapshots": snapshots, "final": snapshots[-1] if snapshots else None}


def plot_curves(arms: dict, path: Path) -> None:
    """Four panels against CPU-minutes: reconstruction identity and identity consistency (judge),
    reconstruction SSIM (cheap curves), FID (snapshots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reconstruction_identity_judge", "reconstruction identity (judge)", "curve"),
              ("identity_consistency_judge", "identity consistency (judge)", "curve"),
              ("reconstruction_ssim", "reconstruction SSIM", "curve"),
              ("fid", "FID, swaps vs real (n = snapshots')", "snapshots")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (key, title, source) in zip(axes, panels):
        for name, arm in arms.items():
            points = [(p["cpu_minutes"], p[key]) for p in arm[source] if key in p]
            if points:
                ax.plot(*zip(*points), marker="o" if source == "snapshots" else None, markersize=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("CPU-minutes (one core)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    from bench.common import RESULTS, write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", help="folder with one run folder per arm, named as in ARMS")
    ap.add_argument("--arms-from", metavar="JSON",
                    help="take the arms from an earlier results file instead (their runs need not exist); its long "
                         "run becomes an arm, named '<arm> (long)'")
    ap.add_argument("--speed", required=True, help="the dgnet_speed.py --arms JSON (seconds per iteration per arm)")
    ap.add_argument("--judge", required=True, help="the independent re-id model (train-reid, another seed)")
    ap.add_argument("--n", type=int, default=500, help="images per `reidgen quality` measurement of an arm")
    ap.add_argument("--long-n", type=int, default=500, help="the same for the long run")
    ap.add_argument("--cost-proxy", nargs="*", default=[], metavar="ARM=MEASURED",
                    help="an arm missing from the speed record takes this measured arm's seconds per iteration")
    ap.add_argument("--long", help="the long run of the winning preset (RUN, trained with --keep-checkpoints)")
    ap.add_argument("--long-arm", default="perc_idf", help="the arm whose settings and speed the long run has")
    ap.add_argument("--control", help="re-id control for the long run (bench/dgnet_cpu_run.py --control)")
    ap.add_argument("--long-steps", nargs="*", metavar="STEP[:N]",
                    help="the long run's snapshots to measure with reidgen quality (default: its last at --long-n), "
                         "e.g. 300:250 where it has spent an arm's CPU-minutes, at the arms' n, and its end")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--name", default="dgnet_fast",
                    help="results name: bench/results/NAME.json and NAME_curves.png (e.g. dgnet_fast_mini)")
    ap.add_argument("--data-label", default="market1501 (full train set)", help="the arms' training data (recorded)")
    ap.add_argument("--commands", nargs="*", default=[], help="the commands that trained the runs (recorded)")
    args = ap.parse_args()

    speed = json.loads(Path(args.speed).read_text())
    COST_PROXY.update(pair.split("=", 1) for pair in args.cost_proxy)
    arms = {}
    if args.arms_from:
        earlier = json.loads(Path(args.arms_from).read_text())
        arms.update(earlier["arms"])
        if earlier.get("long"):
            named = [k for k, v in ARMS.items() if v == earlier["long"]["settings"]]
            arms[f"{named[0] if named else 'earlier'} (long)"] = earlier["long"]
    for name in ARMS if args.arms else ():
        run = Path(args.arms) / name
        if (run / "checkpoints" / "last.pt").is_file():
            arms[name] = collect_arm(run, name, speed, args.judge, args.n, args.device)
    if not arms and not args.long:
        raise SystemExit(f"no arm runs under {args.arms} (expected folders named {', '.join(ARMS)}); give --arms, "
                         "--arms-from or --long")
    payload = {"device": args.device, "data": args.data_label, "judge": args.judge, "quality_n": args.n,
               "long_quality_n": args.long_n,
               "cost_proxy": COST_PROXY, "arms": arms, "arms_from": args.arms_from,
               "commands": args.commands}
    if args.long:
        from bench.dgnet_cpu_run import reid_report
        from reidgen.core.checkpoint import load_checkpoint

        steps = {int(a): int(b or args.long_n) for a, _, b in (s.partition(":") for s in args.long_steps or ())}
        long_run = collect_arm(Path(args.long), args.long_arm, speed, args.judge, args.long_n, args.device, steps)
        config = load_checkpoint(args.long, "dgnet")["train_config"]
        reid = {}
        compared = [("teacher", config["teacher"]), ("dgnet", args.long)] + ([("control", args.control)]
                                                                            if args.control else [])
        for name, checkpoint in compared:
            r = reid_report(checkpoint, config["data"], args.device)
            reid[name] = {"rank1": r.rank1, "mAP": r.mAP, "mINP": r.mINP}
            print(name, reid[name], flush=True)
        final = long_run["final"]
        long_run["reid"] = reid
        long_run["targets_met"] = {
            "identity_consistency_judge>=0.30": final["identity_consistency_judge"] >= 0.30,
            "reconstruction_identity_judge>=0.70": final["reconstruction_identity_judge"] >= 0.70,
            "reconstruction_ssim>=0.5": final["reconstruction_ssim"] >= 0.5,
            "fid<312 (run B)": final["fid"] < 312.0,
            **({"dgnet_mAP>=control_mAP": reid["dgnet"]["mAP"] >= reid["control"]["mAP"]} if args.control else {}),
        }
        payload.update(long=long_run, final=final, cpu_minutes=long_run["cpu_minutes"])
        arms = {**arms, f"{args.long_arm} (long)": long_run}
    plot_curves(arms, RESULTS / f"{args.name}_curves.png")
    write_results(args.name, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
