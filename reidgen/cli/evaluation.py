"""`reidgen evaluate | quality`: re-id retrieval figures and generation quality of a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reidgen.core.errors import ReidgenError

CRGAN_QUALITY_OPTIONS = ("targets", "target_split", "source_split", "k", "lpips_weights")


def _quality_crgan(args: argparse.Namespace) -> int:
    """`reidgen quality` on a CR-GAN checkpoint: instance guidance on held-out source × target pairs."""
    from trainer.evaluation.quality import run_folder
    from trainer.evaluation.quality_crgan import DEFAULT_K, format_crgan_quality_table, measure_crgan_quality

    k = DEFAULT_K if args.k is None else args.k
    report = measure_crgan_quality(args.checkpoint, args.data, targets=args.targets, id_model=args.teacher,
                                   n=args.n if args.n is not None else 100 * k, k=k,
                                   source_split=args.source_split or "train",
                                   target_split=args.target_split or "gallery", lpips_weights=args.lpips_weights,
                                   seed=args.seed, device=args.device, batch_size=args.batch_size)
    out = Path(args.out) if args.out else run_folder(args.checkpoint) / "quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if report["n"] < report["n_requested"]:
        print(f"note: n = {report['n']} renderings instead of {report['n_requested']}: too few target (2n) or "
              "source images, or unreadable ones", file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else f"{format_crgan_quality_table(report)}\njson: {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from reidgen.core.paths import resolve_data
    from trainer.evaluation.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(args.checkpoint, resolve_data(args.data), part_weights=args.part_weights,
                                 flip=not args.no_flip, device=args.device, batch_size=args.batch_size,
                                 workers=args.workers, strict_images=args.strict_images, lmp=args.lmp)
    print(report.model_dump_json(indent=2) if args.json else report.table())
    if report.skipped_images and not args.json:
        print(f"warning: skipped {len(report.skipped_images)} unreadable image(s), first: "
              f"{report.skipped_images[0]}", file=sys.stderr)
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    from trainer.evaluation.quality import format_quality_table, measure_quality, run_folder
    from trainer.evaluation.quality_crgan import checkpoint_kind

    if checkpoint_kind(args.checkpoint) == "crgan":
        if args.judge:
            raise ReidgenError(f"--judge: only for DG-Net checkpoints; {args.checkpoint} is a CR-GAN checkpoint "
                               "(its identity judge is --teacher)")
        for flag in ("no_fid", "no_floor"):
            if getattr(args, flag):
                raise ReidgenError(f"--{flag.replace('_', '-')}: only for DG-Net checkpoints; {args.checkpoint} is a "
                                   "CR-GAN checkpoint")
        return _quality_crgan(args)
    given = [f"--{name.replace('_', '-')}" for name in CRGAN_QUALITY_OPTIONS if getattr(args, name) is not None]
    if given:
        raise ReidgenError(f"{', '.join(given)}: only for CR-GAN checkpoints; {args.checkpoint} is a DG-Net checkpoint")
    report = measure_quality(args.checkpoint, args.data, teacher=args.teacher, judge=args.judge,
                             n=2000 if args.n is None else args.n, seed=args.seed, device=args.device,
                             batch_size=args.batch_size, fid=not args.no_fid, floor=not args.no_floor)
    out = Path(args.out) if args.out else run_folder(args.checkpoint) / "quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if report["n"] < report["n_requested"]:
        print(f"note: n = {report['n']} instead of {report['n_requested']}: the training split has too few images "
              "(2n are needed: n for the swaps and the real set, n for the real-vs-real floor)", file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else f"{format_quality_table(report)}\njson: {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Rank-1/5/10, mAP, mINP of a checkpoint on a query/gallery split",
                       description="Evaluate with the Market-1501 protocol (same-camera matches of the same id and "
                                   "junk images ignored). Features are flip-averaged unless --no-flip.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run folder (uses checkpoints/last.pt)")
    p.add_argument("--data", required=True, help="folder with query/ and bounding_box_test/, or a data set name")
    p.add_argument("--part-weights", type=float, nargs="+", metavar="W",
                   help="weights of the feature parts in the score (DG-Net: 1 β)")
    p.add_argument("--no-flip", action="store_true", help="do not average with mirrored images")
    p.add_argument("--lmp", type=int, default=0, metavar="P",
                   help="local max pooling: P horizontal stripes of the backbone's feature map as the feature")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--strict-images", action="store_true", help="fail on an unreadable image instead of skipping")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("quality", help="generation quality of a DG-Net or CR-GAN checkpoint: FID/KID, diversity, "
                                       "identity, CR-GAN's instance guidance",
                       description="DG-Net checkpoint: measured on n images of its training split: FID and KID of "
                                   "cross-identity swaps G(a_i, s_j) against real images (Inception-v3 weights "
                                   "shipped offline) beside the real-vs-real floor at the same n, diversity SSIM "
                                   "(paper Table 1), self-reconstruction L1/SSIM, the teacher's identity "
                                   "consistency of the swaps and the Fréchet distance of its features. "
                                   "CR-GAN checkpoint: each of n/k source persons (training split, so D_id knows "
                                   "them) is rendered into k targets of the target domain's held-out split: "
                                   "own-target match rate (the rendering's background is nearest its own target's; "
                                   "chance 1/k), diversity across the k renderings (Inception features; LPIPS with "
                                   "--lpips-weights), D_id identity preservation, FID/KID to the targets beside the "
                                   "real floor, foreground L1 on the source's person. The kind is read from the "
                                   "checkpoint. Prints a table and writes JSON.")
    p.add_argument("--checkpoint", required=True, help="DG-Net or CR-GAN checkpoint, or run folder")
    p.add_argument("--data", help="data set (default: the one the checkpoint was trained on; CR-GAN: the source)")
    p.add_argument("--teacher", metavar="CKPT", help="re-id classifier judging identity (default: the checkpoint's "
                                                     "teacher; CR-GAN: its D_id, --id-model of train-crgan)")
    p.add_argument("--judge", metavar="CKPT",
                   help="DG-Net: an independent re-id model on the same identities (e.g. train-reid with another "
                        "--seed) that no part of training used; its identity figures are reported beside the "
                        "teacher's, which training may have learnt to please (--set id_recon=...)")
    p.add_argument("--n", type=int,
                   help="images: DG-Net swaps and each real set (default 2000); CR-GAN renderings = n/k sources × k "
                        "targets, and each real target set (default 100·k). FID is biased at small n: compare at "
                        "equal n")
    p.add_argument("--seed", type=int, default=0, help="seed of the image sample and the pairs")
    p.add_argument("--no-floor", action="store_true",
                   help="DG-Net: leave out the real-vs-real floor (a third of the Inception passes); it depends "
                        "only on the data, --n and --seed, so one run with it serves every checkpoint")
    p.add_argument("--no-fid", action="store_true",
                   help="DG-Net: leave out FID and KID and their floor, every Inception-v3 pass: most of the time "
                        "on a CPU; the identity, SSIM and diversity figures stay")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (CR-GAN: renderings)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON file to write (default RUN/quality.json)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    c = p.add_argument_group("CR-GAN checkpoints only")
    c.add_argument("--targets", metavar="DATA", help="target-domain data set whose contexts are used (default: the "
                                                     "checkpoint's --target)")
    c.add_argument("--target-split", choices=["train", "query", "gallery"],
                   help="split the targets come from (default gallery: held out, never seen in training)")
    c.add_argument("--source-split", choices=["train", "query", "gallery"],
                   help="split the source persons come from (default train: identity preservation needs identities "
                        "D_id knows; with another split it is left out)")
    c.add_argument("--k", type=int, help="targets per source (default 6; own-target chance is 1/k)")
    c.add_argument("--lpips-weights", metavar="PTH",
                   help="torchvision's ImageNet AlexNet state dict (alexnet-owt-7be5be79.pth) to add LPIPS "
                        "diversity; nothing is downloaded, without it LPIPS is left out")
    p.set_defaults(func=cmd_quality)
