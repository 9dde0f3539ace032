"""Collect bench/results/crgan_quality.json: CR-GAN instance guidance of a long CPU run (issue 14).

It runs nothing heavy itself: it reads the ``reidgen quality`` JSON files already written for the
run's checkpoints (``--dual``: the long run's final checkpoint, ``--intermediate``: earlier ones;
``--no-dual``: the ``--no-dual-condition`` run, ``--dual-same-budget``: the dual run of the same
budget as that one) and the runs' ``metrics.jsonl`` (iterations, wall-clock minutes), and writes
one record with the figures the issue asks for and the commands that made them.

    python bench/crgan_quality.py --dual runs/crgan_long/quality.json \\
        --intermediate runs/crgan_long/quality_step_1000.json \\
        --no-dual runs/crgan_x_nodual/quality.json --dual-same-budget runs/crgan_x_l2/quality.json \\
        --commands-file runs/crgan_long/commands.txt \\
        --reid-direct runs/direct_cuhk03.json --reid-crgan runs/crgan_ft_s{0,1,2}/eval.json \\
        --reid-control runs/control_s{0,1,2}/eval.json

The re-id files are evaluation reports (``reidgen evaluate --json``, or a fine-tuning run's
``eval.json``), one per seed; the table keeps Rank-1 and mAP as mean and sample standard deviation
over the seeds, in percent. ``--previous`` carries the ablation of an earlier collection over
when the no-dual run was not repeated (it says so in the record).

Each quality file must be of a CR-GAN checkpoint (``kind`` crgan); the run folder is taken from
the checkpoint path it records (RUN/checkpoints/*.pt).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_results  # noqa: E402

KEPT = ("own_target_match", "own_target_match_chance", "diversity_inception", "diversity_inception_real",
        "diversity_inception_set", "diversity_inception_set_real", "diversity_lpips", "diversity_lpips_set",
        "identity_preservation", "identity_real", "fid", "fid_real", "kid", "kid_real", "foreground_l1",
        "background_l1_own", "background_l1_other", "background_l1_source", "spread_l1", "spread_l1_targets",
        "context_mask_person", "context_mask_background", "k", "n", "sources", "step", "seed", "seconds",
        "checkpoint", "dual_condition")


def run_facts(report: dict) -> dict:
    """Iterations and wall-clock minutes of the run a quality report's checkpoint comes from."""
    run = Path(report["checkpoint"]).resolve().parent.parent
    config = json.loads((run / "config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "l_con" in r and r.get("step", 0) <= (report.get("step") or 0)]
    minutes = (steps[-1]["time"] - records[0]["time"]) / 60 if steps else None
    return {"run": str(run), "iterations_planned": config["iterations"], "iterations_done": report.get("step"),
            "minutes_to_this_checkpoint": round(minutes, 1) if minutes is not None else None,
            "con_loss": config.get("con_loss", "mean_square"), "binary_masks": config.get("binary_masks", False),
            "dual_condition": config["model"]["dual_condition"], "batch_size": config["batch_size"],
            "lr": config["lr"], "id_model": config["id_model"]}


def load(path: str) -> dict:
    report = json.loads(Path(path).read_text())
    if report.get("kind") != "crgan":
        raise SystemExit(f"{path} is not a CR-GAN quality report (reidgen quality on a train-crgan checkpoint)")
    return {"quality_file": str(path), **run_facts(report), **{k: report.get(k) for k in KEPT}}


def reid_row(paths: list[str]) -> dict:
    """Mean ± sample std of Rank-1 and mAP (percent) over evaluation reports of different seeds."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    for p, r in zip(paths, reports):
        if "rank1" not in r or "mAP" not in r:
            raise SystemExit(f"{p} is not an evaluation report (expected rank1 and mAP, as eval.json has)")
    data = {r["data"] for r in reports}
    if len(data) > 1:
        raise SystemExit(f"the reports of one row were evaluated on different data: {sorted(data)}")
    rank1 = [100 * r["rank1"] for r in reports]
    maps = [100 * r["mAP"] for r in reports]

    def std(xs: list[float]) -> float | None:
        return round(statistics.stdev(xs), 2) if len(xs) > 1 else None

    return {"seeds": len(reports), "rank1_mean": round(statistics.fmean(rank1), 2), "rank1_std": std(rank1),
            "map_mean": round(statistics.fmean(maps), 2), "map_std": std(maps),
            "rank1": [round(x, 2) for x in rank1], "map": [round(x, 2) for x in maps],
            "data": data.pop(), "checkpoints": [r["checkpoint"] for r in reports], "files": paths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dual", required=True, help="quality JSON of the long run's final checkpoint")
    ap.add_argument("--intermediate", nargs="*", default=[], help="quality JSONs of its earlier checkpoints")
    ap.add_argument("--no-dual", help="quality JSON of the --no-dual-condition run")
    ap.add_argument("--dual-same-budget", help="quality JSON of the dual run with the no-dual run's budget")
    ap.add_argument("--compare", nargs="*", default=[],
                    help="quality JSONs of runs with one setting changed, same budget (e.g. --con-loss mean_square)")
    ap.add_argument("--commands-file", help="text file with the commands that made the runs and reports")
    ap.add_argument("--reid-direct", nargs="*", default=[], help="evaluation reports of the source model(s)")
    ap.add_argument("--reid-crgan", nargs="*", default=[], help="eval.json of each seed fine-tuned on renderings")
    ap.add_argument("--reid-control", nargs="*", default=[], help="eval.json of each seed of plain fine-tuning")
    ap.add_argument("--previous", help="an earlier crgan_quality.json whose no-dual ablation is carried over")
    ap.add_argument("--out", help="default bench/results/crgan_quality.json")
    args = ap.parse_args()

    final = load(args.dual)
    payload = {
        "own_target_match": final["own_target_match"],
        "own_target_match_chance": final["own_target_match_chance"],
        "diversity": {"across_targets_inception": final["diversity_inception"],
                      "set_pairs_inception": final["diversity_inception_set"],
                      "lpips": final["diversity_lpips"], "set_pairs_lpips": final["diversity_lpips_set"]},
        "identity_preservation": final["identity_preservation"], "identity_real": final["identity_real"],
        "iterations": final["iterations_done"], "minutes": final["minutes_to_this_checkpoint"],
        "long_run": final,
        "intermediate": [load(p) for p in args.intermediate],
        "compared": [load(p) for p in args.compare],
    }
    if args.no_dual:
        nodual = load(args.no_dual)
        payload["diversity_no_dual_condition"] = {
            "across_targets_inception": nodual["diversity_inception"],
            "set_pairs_inception": nodual["diversity_inception_set"],
            "lpips": nodual["diversity_lpips"], "set_pairs_lpips": nodual["diversity_lpips_set"]}
        payload["ablation"] = {"no_dual_condition": nodual,
                               "dual_same_budget": load(args.dual_same_budget) if args.dual_same_budget else None}
    elif args.previous:
        previous = json.loads(Path(args.previous).read_text())
        payload["diversity_no_dual_condition"] = previous.get("diversity_no_dual_condition")
        payload["ablation"] = {**(previous.get("ablation") or {}),
                               "carried_over_from": f"{args.previous} of {previous.get('timestamp')}: "
                                                    "the no-dual run was not repeated at this run's budget"}
    rows = {"direct": args.reid_direct, "crgan": args.reid_crgan, "control": args.reid_control}
    payload["reid"] = {name: reid_row(paths) for name, paths in rows.items() if paths} or None
    payload["diversity_note"] = (
        "across_targets: mean distance between the k renderings of one source (0 by construction when the "
        "generator ignores the target); set_pairs: random pairs of renderings of different sources, one partner "
        "per rendering (comparable between the dual and the no-dual model)")
    if args.commands_file:
        payload["commands"] = [line for line in Path(args.commands_file).read_text().splitlines() if line.strip()]
    write_results("crgan_quality", payload, path=Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
