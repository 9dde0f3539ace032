"""`reidgen convert-checkpoint | import-dgnet | export | import-reid`: checkpoint files in and out."""

from __future__ import annotations

import argparse


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    from reidgen.core.checkpoint import convert_checkpoint

    changes = convert_checkpoint(args.old, args.new, trust=args.trust)
    for change in changes[:10]:
        print(f"  {change}")
    if len(changes) > 10:
        print(f"  ... and {len(changes) - 10} more")
    done = f"converted {len(changes)} value(s)" if changes else "nothing needed converting"
    print(f"{done}; {args.new} holds only tensors and plain data and loads safely")
    return 0


def cmd_import_dgnet(args: argparse.Namespace) -> int:
    from reidgen.core.paths import resolve_data
    from trainer.import_dgnet import import_dgnet

    out = import_dgnet(args.gen, args.id, resolve_data(args.data), args.out, dis=args.dis, teacher=args.teacher,
                       teacher_last_stride=args.teacher_last_stride, ea_last_stride=args.id_stride)
    teacher = f"; teacher {out.with_name(out.stem + '.teacher.pt')}" if args.teacher else ""
    print(f"wrote {out} (DG-Net, paper preset, reference layout{'' if args.dis else ', D not imported'}{teacher})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import time

    from generator_service.models.dgnet import export_inference
    from reidgen.core.checkpoint import resolve_checkpoint

    t0 = time.perf_counter()
    out = export_inference(args.run, args.out)
    source = resolve_checkpoint(args.run)
    mb = 1024 * 1024
    print(f"wrote {out}: {out.stat().st_size / mb:.1f} MiB (from {source}, {source.stat().st_size / mb:.1f} MiB) "
          f"in {time.perf_counter() - t0:.1f} s; inference only: E_a, E_s, G, configuration and label map")
    return 0


def cmd_import_reid(args: argparse.Namespace) -> int:
    from reidgen.core.paths import resolve_data
    from trainer.import_dgnet import import_reid

    out = import_reid(args.file, resolve_data(args.data), args.out, last_stride=args.last_stride)
    print(f"wrote {out} (re-id: ResNet-50, average pooling, last stride {args.last_stride})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-checkpoint",
                       help="one-time: rewrite an old checkpoint of your own as tensors and plain data",
                       description="reidgen reads checkpoints with torch.load(weights_only=True): tensors, numbers, "
                                   "strings, lists, tuples and dicts only, so loading a file someone hands you cannot "
                                   "run code. A checkpoint written by an older reidgen may hold other objects (e.g. "
                                   "numpy arrays) and is refused. This command unpickles OLD fully - which runs "
                                   "whatever code the file contains - converts what it holds (numpy arrays to "
                                   "tensors, numpy scalars to numbers, ...), checks that the result loads with "
                                   "weights_only=True and writes it to NEW. Only a file that is, by its opcodes, a "
                                   "checkpoint of an older reidgen is unpickled; still, --trust runs any code in "
                                   "the file: use it only on checkpoints you made yourself.")
    p.add_argument("old", metavar="OLD", help="the old checkpoint file, or a run folder (uses checkpoints/last.pt)")
    p.add_argument("new", metavar="NEW", help="where to write the converted checkpoint (a new file)")
    p.add_argument("--trust", action="store_true",
                   help="unpickle OLD fully: this runs any code in the file, with your permissions. Give it only "
                        "for a checkpoint you made yourself with an older reidgen, never for a file from someone "
                        "else")
    p.set_defaults(func=cmd_convert_checkpoint)

    p = sub.add_parser("import-dgnet", help="a public DG-Net model (gen_*.pt, id_*.pt) as a reidgen checkpoint",
                       description="Import the files of the DG-Net reference trainer (NVlabs/DG-Net: gen_XXXXXXXX.pt, "
                                   "id_XXXXXXXX.pt, optionally dis_XXXXXXXX.pt and the teacher's net_last.pth) as "
                                   "one reidgen DG-Net checkpoint (paper preset, reference generator layout) that "
                                   "serve, generate, swap-grid, evaluate and quality accept. Files are read as "
                                   "tensors only (weights_only=True). The classes are the sorted ids of --data's "
                                   "training split, which must be the data set the model was trained on.")
    p.add_argument("--gen", required=True, help="generator file gen_XXXXXXXX.pt")
    p.add_argument("--id", required=True, help="appearance encoder file id_XXXXXXXX.pt")
    p.add_argument("--dis", help="discriminator file dis_XXXXXXXX.pt (only needed to train on from the import)")
    p.add_argument("--data", required=True, help="the data set it was trained on (Market-style folder or name)")
    p.add_argument("--teacher", help="the teacher's net_last.pth: imported beside --out as OUT.teacher.pt and "
                                     "recorded as the checkpoint's teacher (soft labels of batch jobs)")
    p.add_argument("--teacher-last-stride", type=int, choices=[1, 2], default=2,
                   help="the teacher's last stride (its opts.yaml 'stride'; default 2)")
    p.add_argument("--id-stride", type=int, choices=[1, 2], default=1,
                   help="E_a's last stride: the model's config.yaml 'ID_stride' (default 1, as configs/latest.yaml)")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.set_defaults(func=cmd_import_dgnet)

    p = sub.add_parser("export", help="the inference part of a DG-Net run or checkpoint (no D, no optimiser state)",
                       description="Write E_a with its heads, E_s, G, the configuration, the label map and the "
                                   "teacher's path (for batch jobs' soft labels) of a DG-Net run folder or checkpoint "
                                   "to one file: no discriminator, optimiser or RNG state. It is a reidgen checkpoint "
                                   "of tensors and plain data (read with weights_only=True), so serve --models and "
                                   "job specs accept it like the full one; training cannot resume from it.")
    p.add_argument("run", help="DG-Net run folder or checkpoint")
    p.add_argument("--out", required=True, help="file to write (e.g. models/market.pt)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-reid",
                       help="the DG-Net reference's baseline teacher (net_last.pth) as a re-id checkpoint",
                       description="Import a baseline ResNet-50 classifier of the DG-Net reference / "
                                   "Person_reID_baseline (ft_net: torchvision ResNet-50 under 'model.', ClassBlock "
                                   "head under 'classifier.') as a reidgen re-id checkpoint, for use as a teacher "
                                   "or D_id. Read as tensors only (weights_only=True).")
    p.add_argument("file", help="net_last.pth")
    p.add_argument("--data", required=True, help="the data set it was trained on (Market-style folder or name)")
    p.add_argument("--last-stride", type=int, choices=[1, 2], default=2,
                   help="its last stride (opts.yaml 'stride'; default 2)")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.set_defaults(func=cmd_import_reid)
