"""The proof that DG-Net generates people on a CPU: generation quality at the start, middle and end
of one long small-preset run, and re-id of its teacher and of its E_a on the full query/gallery.

The run itself is trained beforehand (README, "DG-Net on this CPU") with ``--keep-checkpoints`` so
that its snapshots are there; this script only measures:

    python bench/dgnet_cpu_run.py --run runs/dgnet_cpu [--n 500]   # bench/results/dgnet_cpu_run.json

Targets (issue 11): identity consistency ≥ 0.30, reconstruction SSIM ≥ 0.5, DG-Net E_a's mAP ≥
its teacher's. Every figure comes from `reidgen quality` / `reidgen evaluate`'s own functions.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_results  # noqa: E402

KEYS = ("identity_consistency", "structure_identity_share", "reconstruction_identity", "real_identity",
        "reconstruction_ssim", "reconstruction_l1", "fid",
        "kid", "kid_std", "fid_real", "kid_real", "diversity_ssim", "diversity_ssim_real", "teacher_fd", "step")
JUDGED = ("identity_consistency_judge", "structure_identity_share_judge", "reconstruction_identity_judge",
          "real_identity_judge")


def snapshots(run: Path) -> dict[str, Path]:
    """The first, middle and last kept checkpoints of a run."""
    from reidgen.core.checkpoint import run_checkpoint

    kept = sorted(run_checkpoint(run).parent.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if len(kept) < 3:
        raise SystemExit(f"{run} keeps {len(kept)} snapshots; train with --keep-checkpoints (3 or more needed)")
    return {"start": kept[0], "middle": kept[len(kept) // 2], "final": kept[-1]}


def reid_report(checkpoint, data: str, device: str):
    """The full query/gallery evaluation of a checkpoint: the run folder's eval.json when it was
    made for this very checkpoint and data set (train-reid writes one), else evaluated now and saved."""
    from api_schemas.evaluation import EvaluationReport
    from reidgen.core.checkpoint import resolve_checkpoint
    from trainer.evaluation.evaluate import evaluate_checkpoint
    from trainer.evaluation.quality import run_folder

    path = resolve_checkpoint(checkpoint).resolve()
    saved = run_folder(checkpoint) / "eval.json"
    if saved.is_file():
        report = EvaluationReport.model_validate_json(saved.read_text())
        if (resolve_checkpoint(report.checkpoint).resolve() == path
                and Path(report.data).resolve() == Path(data).resolve()):
            return report
    report = evaluate_checkpoint(path, data, device=device)
    saved.write_text(report.model_dump_json(indent=2))
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the DG-Net run folder")
    ap.add_argument("--n", type=int, default=500, help="images per quality measurement (FID is biased at small n)")
    ap.add_argument("--data", help="query/gallery data set (default: the run's training data)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--control", metavar="RUN",
                    help="the teacher trained further on real images alone for as many images as the DG-Net run "
                         "saw (reidgen train-reid --init TEACHER ...): separates the generated images' share of "
                         "E_a's gain from the extra training")
    ap.add_argument("--judge", metavar="CKPT",
                    help="an independent re-id model (train-reid with another seed): its identity figures too")
    ap.add_argument("--results", default="dgnet_cpu_run",
                    help="name of the JSON under bench/results/ (another name keeps an earlier run's figures)")
    args = ap.parse_args()

    from reidgen.core.checkpoint import load_checkpoint
    from trainer.evaluation.quality import measure_quality
    from trainer.runlog import read_jsonl

    run = Path(args.run)
    final = load_checkpoint(run, "dgnet")
    data = args.data or final["train_config"]["data"]
    teacher = final["train_config"]["teacher"]
    blocks = {}
    for name, path in snapshots(run).items():
        # A measurement already made at this n (e.g. with `reidgen quality --out`, while the run
        # went on) is reused: RUN/quality_<snapshot>_n<N>.json.
        cached = run / f"quality_{path.stem}_n{args.n}.json"
        report = json.loads(cached.read_text()) if cached.is_file() else {}
        keys = KEYS + (JUDGED if args.judge else ())
        # Missing, made before a figure was added, or judged by another model: measured again.
        if not set(keys) <= set(report) or report.get("judge") != args.judge:
            report = measure_quality(path, data, judge=args.judge, n=args.n, device=args.device)
            cached.write_text(json.dumps(report, indent=2))
        blocks[name] = {k: report[k] for k in keys}
        print(name, json.dumps(blocks[name]), flush=True)

    reid = {}
    compared = [("teacher", teacher), ("dgnet", run)] + ([("control", args.control)] if args.control else [])
    for name, checkpoint in compared:
        r = reid_report(checkpoint, data, args.device)
        reid[name] = {"rank1": r.rank1, "mAP": r.mAP, "rank5": r.rank5, "rank10": r.rank10, "mINP": r.mINP}
        print(name, reid[name], flush=True)

    steps = [r for r in read_jsonl(run / "metrics.jsonl") if "l_img1" in r]
    hours = (steps[-1]["time"] - steps[0]["time"]) / 3600 if len(steps) > 1 else 0.0
    final_q = blocks["final"]
    targets = {
        "identity_consistency>=0.30": final_q["identity_consistency"] >= 0.30,
        "reconstruction_ssim>=0.5": final_q["reconstruction_ssim"] >= 0.5,
        "dgnet_mAP>=teacher_mAP": reid["dgnet"]["mAP"] >= reid["teacher"]["mAP"],
    }
    if args.control:
        targets["dgnet_mAP>=control_mAP"] = reid["dgnet"]["mAP"] >= reid["control"]["mAP"]
    write_results(args.results, {
        "device": args.device, "run": str(run), "data": str(data), "teacher": str(teacher),
        "judge": args.judge,
        "iterations": final["step"], "train_config": final["train_config"], "train_hours": round(hours, 3),
        "quality_n": args.n, **blocks, "reid": reid, "control": args.control, "targets_met": targets,
    })
    for target, met in targets.items():
        print(f"{target}: {'met' if met else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
