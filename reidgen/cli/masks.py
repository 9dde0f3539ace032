"""`reidgen masks`: person masks for CR-GAN, cached on disk."""

from __future__ import annotations

import argparse
from pathlib import Path

from reidgen.core.errors import ReidgenError


def cmd_masks(args: argparse.Namespace) -> int:
    from generator_service.models.masks import build_mask_provider, compute_masks, mask_sheet
    from reidgen.core.market import scan_split
    from reidgen.core.paths import resolve_data

    opts = {}
    if args.provider == "folder":
        if not args.folder:
            raise ReidgenError("--provider folder needs --folder DIR holding one PNG mask per image (same stem)")
        opts["folder"] = args.folder
    elif args.provider in ("pose", "selfie") and args.model:
        opts["model_path"] = args.model
    provider = build_mask_provider(args.provider, **opts)
    data = resolve_data(args.data)
    items = [it for split in args.splits for it in scan_split(data, split)]
    if args.limit:
        items = items[:args.limit]
    masks = compute_masks(provider, items, args.out, strict=args.strict_images)
    shown = [it.path for it in items if it.path in masks][:args.sheet_size]
    sheet = Path(args.out) / f"sheet_{provider.name}.png"
    mask_sheet(shown, [masks[p] for p in shown]).save(sheet)
    print(f"{len(masks)} masks in {args.out} ({provider.name}); check them by eye: {sheet}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("masks", help="person masks for CR-GAN (TFLite segmenter, a folder of masks, or a prior)",
                       description="Compute person masks (1 = person) for the images of a data set, cached as PNGs "
                                   "under --out (one folder per provider and model, so reruns skip done images), and "
                                   "a contact sheet of masks over images to check by eye. Providers: pose (default; "
                                   "MediaPipe pose-landmark segmentation, offline), selfie (MediaPipe selfie "
                                   "segmentation), folder (any human parser's PNGs with the images' file names), "
                                   "geometric (a person-shaped prior, no model).")
    p.add_argument("--data", required=True, help="data set folder or name")
    p.add_argument("--out", required=True, help="mask cache folder")
    p.add_argument("--provider", default="pose", choices=["pose", "selfie", "folder", "geometric"])
    p.add_argument("--model", help="the .tflite file (default: $REIDGEN_MASK_MODEL or ../shared/models)")
    p.add_argument("--folder", help="precomputed masks for --provider folder")
    p.add_argument("--splits", nargs="+", default=["train"], choices=["train", "query", "gallery"])
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--sheet-size", type=int, default=32, help="images on the contact sheet")
    p.add_argument("--strict-images", action="store_true", help="fail on an unreadable image instead of skipping")
    p.set_defaults(func=cmd_masks)
