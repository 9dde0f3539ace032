"""`reidgen swap-grid | render-grid`: image grids a person looks at."""

from __future__ import annotations

import argparse
from pathlib import Path

from reidgen.core.errors import ReidgenError


def _pick_people(data: str, split: str, count: int, seed: int) -> list[str]:
    """One image each of ``count`` distinct identities of a split, picked at random (seeded)."""
    import random

    from reidgen.core.market import scan_split
    from reidgen.core.paths import resolve_data

    by_id: dict[int, list[str]] = {}
    for it in scan_split(resolve_data(data), split):
        if it.pid > 0:
            by_id.setdefault(it.pid, []).append(it.path)
    if len(by_id) < count:
        raise ReidgenError(f"the {split} split of {data} has {len(by_id)} identities; {count} are needed")
    rng = random.Random(seed)
    return [rng.choice(by_id[i]) for i in rng.sample(sorted(by_id), count)]


def cmd_swap_grid(args: argparse.Namespace) -> int:
    from generator_service.inference.grids import interpolation_strip, swap_grid
    from generator_service.models.dgnet import DGNet
    from reidgen.core.images import load_batch

    model, _ = DGNet.from_checkpoint(args.checkpoint)
    size = model.cfg.image_size
    if args.appearance_images and args.structure_images:
        app_paths, str_paths = args.appearance_images, args.structure_images
    else:
        if not args.data:
            raise ReidgenError("give --data (images are picked from it) or --appearance-images and --structure-images")
        paths = _pick_people(args.data, args.split, args.appearance + args.structure, args.seed)  # distinct people
        app_paths, str_paths = paths[:args.appearance], paths[args.appearance:]
    appearance, structure = load_batch(app_paths, size), load_batch(str_paths, size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    swap_grid(model, appearance, structure).save(out)
    print(f"swap grid: {out} (rows: appearance, columns: structure)")
    if args.interpolation_out:
        interpolation_strip(model, appearance[0], appearance[-1] if len(appearance) > 1 else structure[0],
                            steps=args.steps).save(args.interpolation_out)
        print(f"interpolation strip: {args.interpolation_out} (row 1: appearance, row 2: structure)")
    return 0


def cmd_render_grid(args: argparse.Namespace) -> int:
    from generator_service.inference.engine import Engine
    from generator_service.inference.grids import render_grid

    sources = args.source_images or (_pick_people(args.source, args.source_split, args.sources, args.seed)
                                     if args.source else None)
    targets = args.target_images or (_pick_people(args.target, args.target_split, args.targets, args.seed + 1)
                                     if args.target else None)
    if not sources or not targets:
        raise ReidgenError("give --source (or --source-images) and --target (or --target-images)")
    engine = Engine.from_checkpoint(args.checkpoint, args.device, mask_provider=args.masks)
    (name,) = engine.models
    if engine.models[name].kind != "crgan":
        raise ReidgenError(f"{args.checkpoint} is not a CR-GAN checkpoint (reidgen train-crgan makes one)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_grid(engine, name, sources, targets, context_masks=args.context_masks).save(out)
    print(f"rendering grid: {out} (rows: source persons, columns: target contexts"
          f"{'; under each row its context masks' if args.context_masks else ''})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("swap-grid", help="PNG of appearance × structure swaps (paper Fig. 1), interpolation strip",
                       description="Rows take the appearance of the images in the first column, columns the "
                                   "structure of the images in the first row. Images are picked at random from "
                                   "distinct identities of --data, or given explicitly.")
    p.add_argument("--checkpoint", required=True, help="DG-Net checkpoint or run folder")
    p.add_argument("--data", help="data set to pick images from")
    p.add_argument("--split", default="query", choices=["train", "query", "gallery"])
    p.add_argument("--appearance", type=int, default=4, help="number of appearance images (rows)")
    p.add_argument("--structure", type=int, default=6, help="number of structure images (columns)")
    p.add_argument("--appearance-images", nargs="+", metavar="IMG")
    p.add_argument("--structure-images", nargs="+", metavar="IMG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--interpolation-out", metavar="PNG", help="also write an interpolation strip (Figs. 5, 9)")
    p.add_argument("--steps", type=int, default=8, help="interpolation steps")
    p.set_defaults(func=cmd_swap_grid)

    p = sub.add_parser("render-grid", help="PNG of source persons rendered into target contexts by CR-GAN",
                       description="Rows: source persons (first column, real); columns: target-domain images "
                                   "(first row, real); each cell the row's person rendered into the column's "
                                   "context. Images are picked at random from distinct identities, or given.")
    p.add_argument("--checkpoint", required=True, help="CR-GAN checkpoint or run folder")
    p.add_argument("--source", help="source data set to pick persons from")
    p.add_argument("--target", help="target data set to pick contexts from")
    p.add_argument("--source-split", default="query", choices=["train", "query", "gallery"])
    p.add_argument("--target-split", default="train", choices=["train", "query", "gallery"])
    p.add_argument("--sources", type=int, default=4, help="number of source persons (rows)")
    p.add_argument("--targets", type=int, default=6, help="number of target images (columns)")
    p.add_argument("--source-images", nargs="+", metavar="IMG")
    p.add_argument("--target-images", nargs="+", metavar="IMG")
    p.add_argument("--context-masks", action="store_true", help="add a row of context masks under each row")
    p.add_argument("--masks", choices=["pose", "selfie", "geometric"],
                   help="target person-mask provider (default: the one the model was trained with)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="PNG to write")
    p.set_defaults(func=cmd_render_grid)
