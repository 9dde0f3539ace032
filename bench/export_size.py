"""Size and load time of a full DG-Net training checkpoint against its inference export
(`reidgen export`), per preset, side by side in one run:

    python bench/export_size.py [--presets paper small] [--repeats 3]   # bench/results/export_size.json

The full checkpoint is made here rather than trained: the networks at a preset with 751 classes
(Market-1501), the trainer's three optimisers after one step (so Adam and SGD carry their state)
and an RNG state, saved with the trainer's own `save_checkpoint`. Its size is what a real run's
file is at that preset; only the values differ. Load time = `DGNet.from_checkpoint`, the call the
service and workers make, median of the repeats, the two files alternating.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_results  # noqa: E402

CLASSES = 751


def full_checkpoint(preset: str, path: Path) -> Path:
    """A checkpoint with the payload and optimiser state a train-dgnet run writes at ``preset``."""
    import torch

    from generator_service.models.dgnet import DGNet
    from reidgen.core.checkpoint import save_checkpoint
    from reidgen.core.config import config_to_dict
    from reidgen.core.rng import rng_state
    from trainer.tasks.dgnet import dgnet_preset_config

    cfg = dgnet_preset_config(preset, data="market1501", teacher="teacher.pt", pretrained="none")
    net = DGNet(cfg.model, CLASSES)
    optimisers = [torch.optim.SGD(net.ea.parameters(), lr=cfg.lr_ea, momentum=0.9, nesterov=True),
                  torch.optim.Adam(list(net.es.parameters()) + list(net.dec.parameters()), lr=cfg.lr_gen),
                  torch.optim.Adam(net.dis.parameters(), lr=cfg.lr_gen)]
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    for opt in optimisers:
        opt.step()
    return save_checkpoint(path, "dgnet", {
        "model_config": config_to_dict(cfg.model), "train_config": config_to_dict(cfg),
        "label_map": [str(i) for i in range(CLASSES)], "model": net.state_dict(),
        "optimizers": [opt.state_dict() for opt in optimisers], "step": cfg.iterations, "rng": [rng_state()]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["paper", "small"], choices=["paper", "small"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from generator_service.models.dgnet import DGNet, export_inference

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            files = {"full": full_checkpoint(preset, Path(tmp) / f"{preset}_full.pt")}
            files["export"] = export_inference(files["full"], Path(tmp) / f"{preset}_export.pt")
            seconds = {name: [] for name in files}
            for i in range(args.repeats):
                for name in (("full", "export") if i % 2 == 0 else ("export", "full")):
                    start = time.perf_counter()
                    DGNet.from_checkpoint(files[name])
                    seconds[name].append(time.perf_counter() - start)
            results[preset] = {
                "size_MiB": {name: round(path.stat().st_size / 2**20, 1) for name, path in files.items()},
                "load_s_median": {name: round(statistics.median(s), 3) for name, s in seconds.items()},
            }
            sizes, loads = results[preset]["size_MiB"], results[preset]["load_s_median"]
            print(f"{preset:<6} size {sizes['full']:7.1f} → {sizes['export']:6.1f} MiB "
                  f"({sizes['full'] / sizes['export']:.2f}× smaller); load {loads['full']:.2f} → "
                  f"{loads['export']:.2f} s ({loads['full'] / loads['export']:.2f}× faster)", flush=True)
    write_results("export_size", {"device": "cpu", "classes": CLASSES, "repeats": args.repeats, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
