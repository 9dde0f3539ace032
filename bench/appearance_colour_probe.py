"""Probe: how much of each body stripe's colour a re-id model's appearance code holds.

DG-Net's appearance code is the re-id backbone's feature map max-pooled to (parts x 1). Ridge
regression from the code (parts x channels values) to the mean RGB of each of the same horizontal
stripes of the image is fitted on most of ``--n`` training images and scored (R², pooled over the
stripes and channels) on the rest. A high R² says the colour is in the code, so a generator that
does not reproduce it fails to read it, not to receive it (docs/dgnet/fast.md, third round).

    python bench/appearance_colour_probe.py --checkpoint runs/teacher [--data market1501_mini] [--n 256]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_results  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the loaders' ImageNet normalisation


def ridge_r2(x, y, held_out: int, ridge: float) -> float:
    """R² on the last ``held_out`` rows of a ridge fit on the others (inputs standardised on the fit)."""
    import torch

    fit_x, test_x, fit_y, test_y = x[:-held_out], x[-held_out:], y[:-held_out], y[-held_out:]
    mu, sd = fit_x.mean(0), fit_x.std(0) + 1e-6
    fit_x, test_x = (fit_x - mu) / sd, (test_x - mu) / sd
    y_mean = fit_y.mean(0)
    w = torch.linalg.solve(fit_x.T @ fit_x + ridge * torch.eye(x.shape[1]), fit_x.T @ (fit_y - y_mean))
    residual = ((test_x @ w + y_mean - test_y) ** 2).sum()
    return float(1 - residual / ((test_y - test_y.mean(0)) ** 2).sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a re-id checkpoint (train-reid), e.g. DG-Net's teacher")
    ap.add_argument("--data", default="market1501_mini")
    ap.add_argument("--n", type=int, default=256, help="training images (a quarter held out)")
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--ridge", type=float, nargs="+", default=[10.0, 100.0, 1000.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from torch.nn import functional as F

    from generator_service.models.reid import ReidNet
    from reidgen.core.images import load_batch
    from reidgen.core.market import scan_split
    from reidgen.core.paths import resolve_data

    net, _ = ReidNet.from_checkpoint(args.checkpoint)
    items = [it for it in scan_split(str(resolve_data(args.data)), "train") if it.pid > 0]
    random.Random(args.seed).shuffle(items)
    images = load_batch([it.path for it in items[:args.n]], (128, 64))
    with torch.no_grad():
        code = F.adaptive_max_pool2d(net.backbone(images), (args.parts, 1)).flatten(1)
    pixels = images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    colours = F.adaptive_avg_pool2d(pixels, (args.parts, 1)).flatten(1)  # (n, 3 x parts) mean RGB per stripe
    held_out = len(images) // 4
    r2 = {str(lam): ridge_r2(code, colours, held_out, lam) for lam in args.ridge}
    for lam, value in r2.items():
        print(f"ridge {lam:>8}: held-out R² of the stripes' mean colour {value:.3f}")
    write_results("appearance_colour_probe", {
        "device": "cpu", "data": args.data, "n": len(images), "held_out": held_out, "parts": args.parts,
        "code_values": code.shape[1], "r2_by_ridge": r2, "best_r2": max(r2.values()), "seed": args.seed,
        "command": f"python bench/appearance_colour_probe.py --checkpoint <train-reid run> --data {args.data} "
                   f"--n {args.n} --seed {args.seed}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
