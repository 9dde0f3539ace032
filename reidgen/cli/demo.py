"""`reidgen demo`: the main job, small and end to end."""

from __future__ import annotations

import argparse

from reidgen.core.errors import ReidgenError


def cmd_demo(args: argparse.Namespace) -> int:
    from reidgen.core.paths import resolve_data
    from trainer.demo import DemoConfig, run_demo

    try:
        data = resolve_data(args.data)
    except ReidgenError as exc:
        raise ReidgenError(f"{exc}. The demo needs a Market-style data set: pass --data DIR "
                           "(make demo DATA=DIR), or set REIDGEN_DATA to the folder holding market1501_mini") from None
    run_demo(DemoConfig(data=str(data), out=args.out, epochs=args.epochs, dgnet_iterations=args.dgnet_iterations,
                        dgnet_preset=args.dgnet_preset, records=args.records, device=args.device,
                        dgnet=args.dgnet or ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job, small and end to end on CPU (writes RUN/report.html)",
                       description="The main job on the embedded default (no Redis, no Docker), about 10 minutes on "
                                   "2 CPU cores with market1501_mini: train a teacher and an independent judge, "
                                   "train DG-Net, write a swap grid, generate a shard job in-process, fine-tune the "
                                   "teacher on real + synthetic images (and, as the control, on real images "
                                   "alone), evaluate every model and write a self-contained HTML report. Finished "
                                   "stages are reused when run again.")
    p.add_argument("--data", default="market1501_mini", help="data set folder or name (default market1501_mini)")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the teacher and of the judge (default 4)")
    p.add_argument("--dgnet-iterations", type=int, default=210, help="DG-Net iterations (default 210)")
    p.add_argument("--dgnet-preset", default="fast", choices=["fast", "small"],
                   help="DG-Net preset (default fast: the levers that converge fast on a CPU; small: without its "
                        "losses and banded AdaIN). Either trains at the demo's Adam rate 8e-4 and λ_id 1.0 on L_id^c")
    p.add_argument("--dgnet", metavar="RUN",
                   help="reuse a longer DG-Net run (and its teacher) trained on --data instead of training one")
    p.add_argument("--records", type=int, default=512, help="synthetic images in the shard job (default 512)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)
