"""Benchmark: one DG-Net training iteration of the paper preset against the public reference code
(NVlabs/DG-Net), side by side on the CPU, on the same batches (issue 24, item 3).

The reference code is not part of this repository (licence CC BY-NC-SA 4.0: it may be run, not
copied here). Fetch it anywhere outside the repository and name it with --reference:

    git clone https://github.com/NVlabs/DG-Net /tmp/DG-Net
    python bench/dgnet_vs_reference.py --reference /tmp/DG-Net [--data market1501_mini]
        [--warmup 1] [--iters 3] [--threads 1] [--precision fp32|bf16]
        [--no-reference-cycle] [--encode-again-p 0.5] [--out PATH]

What it measures. The parent process draws ``warmup + iters`` pairs of batches once with the
project's data pipeline (real Market images, 256x128, 8 per loader, each with a random same-identity
positive, flip/pad/crop; no random erasing, which each trainer applies itself) and hands the very
same tensors to two child processes, one per implementation, each with ``--threads`` torch threads:

- reference: its ``DGNet_Trainer`` with ``configs/latest.yaml`` (``ID_class`` = the data's number of
  training identities), each iteration as its train.py runs one: ``update_learning_rate``,
  ``forward``, ``dis_update`` on clones of the cross images, ``gen_update``. Every loss is on, as
  late in training: the weights that gate branches in ``gen_update`` start at their caps
  (``teacher_w`` = ``max_teacher_w`` = 2: the teacher KL and the fine-grained CE on generated
  images, and the fine-grained CE on real images through ``teacher_w * B_w``; ``recon_f_w`` =
  ``recon_s_w`` = ``max_w`` = 1: the code reconstructions; ``recon_x_cyc_w`` = ``max_cyc_w`` = 2:
  the cycle reconstruction, two more decoder passes) and the iteration passed to ``gen_update`` is
  40000, past ``warm_iter`` = ``warm_teacher_iter`` = 30000, so its warm-up ramps only hold them at
  the caps. ``--no-reference-cycle`` sets the cycle weight and its cap to 0: the project's paper
  preset has no cycle loss (``cycle_max`` = 0), so that run compares the same set of losses.
- project: ``DGNetTrainer.train_step`` of the paper preset at step 40000 of its 100K (past the
  feeding start at 30 % and its 4 % ramp: every loss on at full weight), fp32, or bf16 autocast
  with ``--precision bf16`` (project only: the reference has no CPU bf16).

Both start from random weights (no ImageNet ResNet-50 offline; weights do not change the cost) and
share one teacher: the child running the reference builds the reference's baseline teacher
(ResNet-50, last stride 2, the stride it assumes when its opts.yaml names none) with random weights
and saves it where the reference loads it (``models/best/net_last.pth`` under a temporary working
folder); the parent imports that file as the project's teacher (`trainer.import_dgnet.import_reid`).
With probability ``--encode-again-p`` (0.5 in both, as they train) the structure reconstruction
takes the live E_s on the detached generated image, else a frozen copy of E_s on the live image;
the branch each iteration took is recorded, as it changes the cost a little.

The reference runs unmodified, patched at run time in its child only: ``Tensor.cuda`` and
``Module.cuda`` return their object (it moves tensors to CUDA on its training path), torchvision's
``resnet50`` ignores ``pretrained=True`` (no download; random weights), and ``cv2`` (imported by its
trainer for edge inputs, unused with ``single: gray``) is an empty stand-in module when absent. Its
config's Adam ``beta1: 0`` is passed as the float 0.0 (recent torch refuses an int beside a float).

Prints seconds per iteration (the mean of the measured iterations) of each, the ratio
project/reference, and the first iteration's losses side by side (comparable sums; they need not
be equal), and writes ``bench/results/dgnet_vs_reference.json`` (or ``--out``), which names the
reference as NVlabs/DG-Net and its commit, never a path of this machine.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import run_child, write_results  # noqa: E402

# The iteration both trainers are at: past the feeding start (reference: warm_iter and
# warm_teacher_iter, 30000; project: 30 % of 100K) and its ramp, so every loss has its full weight.
LATE_ITERATION = 40_000
TEACHER_STRIDE = 2
# The reference's files this benchmark runs; the JSON says whether any differs from the commit.
REFERENCE_FILES = ("trainer.py", "networks.py", "reIDmodel.py", "utils.py", "random_erasing.py",
                   "configs/latest.yaml")
# Comparable first-iteration losses, in print order (each side sums its own terms into these).
LOSS_ROWS = ("d_total", "img_self", "img_pos", "code", "id_cross", "adv", "id_real", "id_pos", "feed", "cycle",
             "g_total")


def git(ref: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(ref), *args], capture_output=True, text=True).stdout.strip()


def reference_source(ref: Path) -> dict:
    """NVlabs/DG-Net at the checkout's commit, and which of the files run here differ from it."""
    commit = git(ref, "rev-parse", "HEAD") or None
    modified = [name for name in REFERENCE_FILES
                if commit is None or git(ref, "hash-object", name) != git(ref, "rev-parse", f"HEAD:{name}")]
    return {"repository": "NVlabs/DG-Net", "commit": commit, "config": "configs/latest.yaml",
            "files_differing_from_commit": modified}


# -- the shared batches (parent) -----------------------------------------------------------------
def draw_batches(data: str, count: int, batch_size: int, seed: int, out: Path) -> int:
    """``count`` pairs of batches of the paper preset's training pipeline, saved to ``out`` with the
    number of training identities (returned)."""
    import torch

    from reidgen.core.market import LabelMap, scan_split
    from trainer.feeds.data import ImageDataset, endless_batches, epoch_loader
    from trainer.feeds.samplers import RandomBatchSampler
    from trainer.feeds.transforms import train_transform
    from trainer.tasks.dgnet import PairDataset, dgnet_preset_config

    cfg = dgnet_preset_config("paper")
    size = cfg.model.image_size
    items = scan_split(data, "train")
    label_map = LabelMap.from_items(items)
    pairs = PairDataset(ImageDataset(items, train_transform(size, pad=cfg.pad, erasing_p=0), label_map, size))
    samplers = [RandomBatchSampler(len(items), batch_size, seed + i) for i in (0, 1)]
    stream = endless_batches(lambda sampler: epoch_loader(pairs, sampler, 0, torch.device("cpu")), samplers, 0)
    # Each batch: ((x, y, positive, ok, index) of loader a, the same of loader b).
    batches = [next(stream) for _ in range(count)]
    torch.save({"batches": batches, "classes": len(label_map)}, out)
    return len(label_map)


# -- the reference (child) -----------------------------------------------------------------------
def patch_for_cpu(ref: Path) -> None:
    """Let the unmodified reference run on the CPU, in this process only (see the docstring)."""
    import torch
    import torchvision

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    resnet50 = torchvision.models.resnet50
    torchvision.models.resnet50 = lambda *args, pretrained=False, **kwargs: resnet50(weights=None)
    try:
        import cv2  # noqa: F401
    except ImportError:
        sys.modules["cv2"] = types.ModuleType("cv2")
    # Its modules (trainer, utils, networks, ...) by their plain names: the reference's folder comes
    # first and this repository (which has a `trainer` package) is taken off the path.
    ours = {REPO, REPO / "bench"}
    sys.path[:] = [str(ref)] + [p for p in sys.path if not p or Path(p).resolve() not in ours]


def reference_losses(t) -> tuple[dict, dict]:
    """(comparable sums, every loss attribute) of the reference trainer after an iteration."""
    names = ("loss_dis_total", "loss_gen_recon_x_a", "loss_gen_recon_x_b", "loss_gen_recon_xp_a",
             "loss_gen_recon_xp_b", "loss_gen_recon_f_a", "loss_gen_recon_f_b", "loss_gen_recon_s_a",
             "loss_gen_recon_s_b", "loss_gen_recon_id", "loss_gen_adv_a", "loss_gen_adv_b", "loss_id", "loss_pid",
             "loss_teacher", "loss_gen_cycrecon_x_a", "loss_gen_cycrecon_x_b", "loss_gen_total")
    raw = {name: float(getattr(t, name)) for name in names}
    rows = {
        "d_total": raw["loss_dis_total"],
        "img_self": raw["loss_gen_recon_x_a"] + raw["loss_gen_recon_x_b"],
        "img_pos": raw["loss_gen_recon_xp_a"] + raw["loss_gen_recon_xp_b"],
        "code": sum(raw[f"loss_gen_recon_{k}_{s}"] for k in "fs" for s in "ab"),
        "id_cross": raw["loss_gen_recon_id"],
        "adv": raw["loss_gen_adv_a"] + raw["loss_gen_adv_b"],
        "id_real": raw["loss_id"],  # primary CE + teacher_w·B_w · fine CE, real images
        "id_pos": raw["loss_pid"],
        "feed": raw["loss_teacher"],  # KL to the teacher + B_w · fine CE, generated images
        "cycle": raw["loss_gen_cycrecon_x_a"] + raw["loss_gen_cycrecon_x_b"],
        "g_total": raw["loss_gen_total"],
    }
    return rows, raw


def reference_child(args, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    ref = Path(args.reference).resolve()
    patch_for_cpu(ref)
    import yaml

    # The reference's modules (plain names: `trainer` here is its trainer.py, not this repository's package).
    ft_net = importlib.import_module("reIDmodel").ft_net
    reference = importlib.import_module("trainer")
    if Path(reference.__file__).resolve().parent != ref:
        raise SystemExit(f"imported {reference.__file__}, not the reference's trainer.py")
    shared = torch.load(work / "batches.pt")
    classes = shared["classes"]

    # The teacher it loads from models/best (relative to the working folder): its own baseline class
    # with random weights. The parent imports the same file as the project's teacher.
    torch.manual_seed(args.seed)
    best = work / "models" / "best"
    best.mkdir(parents=True, exist_ok=True)
    torch.save(ft_net(classes, stride=TEACHER_STRIDE).state_dict(), best / "net_last.pth")
    (best / "opts.yaml").write_text(f"stride: {TEACHER_STRIDE}\n")
    os.chdir(work)

    config = yaml.safe_load((ref / "configs" / "latest.yaml").read_text())
    cycle = config["max_cyc_w"] if args.reference_cycle else 0.0
    late = {"ID_class": classes, "teacher_w": config["max_teacher_w"], "recon_f_w": config["max_w"],
            "recon_s_w": config["max_w"], "recon_x_cyc_w": cycle, "max_cyc_w": cycle,
            "use_encoder_again": args.encode_again_p}
    config.update(late)
    # latest.yaml's `beta1: 0` reads as an int, which torch's Adam now refuses beside the float beta2.
    config.update(beta1=float(config["beta1"]), beta2=float(config["beta2"]))
    torch.manual_seed(args.seed)
    trainer = reference.DGNet_Trainer(config)

    times, branches, first, finite = [], [], None, True
    for batch in shared["batches"]:
        (xa, ya, pa, _, _), (xb, yb, pb, _, _) = batch
        trainer.enc_content_copy = None  # set again by gen_update only when it takes the frozen-copy branch
        start = time.perf_counter()
        trainer.update_learning_rate()
        outputs = trainer.forward(xa, xb, pa, pb)
        x_ab, x_ba = outputs[0], outputs[1]
        trainer.dis_update(x_ab.clone(), x_ba.clone(), xa, xb, config, num_gpu=1)
        trainer.gen_update(*outputs, xa, xb, pa, pb, ya, yb, config, LATE_ITERATION, num_gpu=1)
        times.append(time.perf_counter() - start)
        branches.append("live" if trainer.enc_content_copy is None else "frozen copy")
        rows, raw = reference_losses(trainer)
        finite = finite and all(math.isfinite(v) for v in raw.values())
        first = first or (rows, raw)
    return {"implementation": "reference", "precision": "fp32", "settings": late, "iteration_seconds": times,
            "structure_branch": branches, "losses_first_iteration": first[0], "raw_losses_first_iteration": first[1],
            "losses_finite": finite}


# -- the project (child) -------------------------------------------------------------------------
def project_losses(logs: dict, lam: dict) -> dict:
    """The project's terms summed as the reference's comparable sums (`reference_losses`)."""
    fine_ratio = lam["fine"] / lam["prim"] if lam["prim"] else 0.0
    return {
        "d_total": logs["d_adv"] + logs["d_r1"],
        "img_self": logs["l_img1"], "img_pos": logs["l_img2"], "code": logs["l_code"],
        "id_cross": logs["l_id_cross"], "adv": logs["l_adv"],
        "id_real": logs["l_id_self"] + lam["fine_real"] * logs.get("l_fine_real", 0.0),
        "id_pos": logs["l_id_pos"],
        "feed": logs.get("l_prim", 0.0) + fine_ratio * logs.get("l_fine", 0.0),
        "cycle": logs.get("l_cycle", 0.0),
        "g_total": logs["total"],
    }


def project_child(args, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import trainer.tasks.dgnet as dgnet

    bf16 = args.precision == "bf16"
    cfg = dgnet.dgnet_preset_config("paper", data=args.data_dir, teacher=str(work / "teacher.pt"), pretrained="none",
                                    ea_from_teacher=False, device="cpu", workers=0, grid_every=0, quality_every=0,
                                    checkpoint_every=10**9, encode_again_p=args.encode_again_p, seed=args.seed,
                                    amp=bf16, cpu_bf16=bf16)
    trainer = dgnet.DGNetTrainer(cfg, work / "project_run", progress=False)
    trainer.loop.prepare(trainer)  # the layout and optimiser settings training runs with (channels_last)
    trainer.step = LATE_ITERATION

    # Record the structure branch: E_s goes through frozen_copy only in the frozen-copy branch.
    branches: list[str] = []
    frozen_copy = dgnet.frozen_copy

    def recording(module, *inputs):
        if module is trainer.net.es:
            branches[-1] = "frozen copy"
        return frozen_copy(module, *inputs)

    dgnet.frozen_copy = recording
    shared = torch.load(work / "batches.pt")
    times, first, finite = [], None, True
    for batch in shared["batches"]:
        branches.append("live")
        start = time.perf_counter()
        logs = trainer.train_step(batch)
        times.append(time.perf_counter() - start)
        trainer.step += 1
        finite = finite and all(math.isfinite(v) for v in logs.values())
        first = first or (project_losses(logs, trainer.lambdas()), logs)
    return {"implementation": "project", "precision": args.precision, "preset": "paper",
            "channels_last": trainer.channels_last_on_cpu,
            "step": LATE_ITERATION, "lambdas": trainer.lambdas(), "iteration_seconds": times,
            "structure_branch": branches, "losses_first_iteration": first[0],
            "raw_losses_first_iteration": first[1], "losses_finite": finite}


def child(args) -> None:
    import torch

    work = Path(args.work)
    with contextlib.redirect_stdout(sys.stderr):  # the reference prints its losses every iteration
        result = reference_child(args, work) if args.child == "reference" else project_child(args, work)
    measured = result["iteration_seconds"][args.warmup:]
    result.update(seconds_per_iteration=sum(measured) / len(measured), torch_threads=torch.get_num_threads(),
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))


# -- the parent ----------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="a checkout of NVlabs/DG-Net (outside this repository)")
    ap.add_argument("--data", default="market1501_mini")
    ap.add_argument("--warmup", type=int, default=1, help="iterations run before the measured ones")
    ap.add_argument("--iters", type=int, default=3, help="measured iterations per implementation")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per child")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="the project's (reference: fp32)")
    ap.add_argument("--no-reference-cycle", dest="reference_cycle", action="store_false",
                    help="reference without its cycle loss (the paper preset has none)")
    ap.add_argument("--encode-again-p", type=float, default=0.5,
                    help="probability of the live-E_s structure reconstruction, both sides")
    ap.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="where the JSON goes (default bench/results/dgnet_vs_reference.json)")
    ap.add_argument("--child", choices=("reference", "project"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be at least 1 and --warmup at least 0")
    if args.child:
        child(args)
        return 0

    ref = Path(args.reference).resolve()
    if not (ref / "trainer.py").is_file() or not (ref / "configs" / "latest.yaml").is_file():
        ap.error(f"{args.reference} is not a checkout of NVlabs/DG-Net (trainer.py, configs/latest.yaml); "
                 "fetch it with: git clone https://github.com/NVlabs/DG-Net /tmp/DG-Net")
    from reidgen.core.paths import resolve_data
    from trainer.import_dgnet import import_reid

    data = str(resolve_data(args.data))
    common = ["--reference", str(ref), "--data-dir", data, "--warmup", str(args.warmup), "--iters", str(args.iters),
              "--threads", str(args.threads), "--precision", args.precision, "--seed", str(args.seed),
              "--encode-again-p", str(args.encode_again_p)] + ([] if args.reference_cycle else ["--no-reference-cycle"])
    with tempfile.TemporaryDirectory(prefix="dgnet_vs_reference_") as tmp:
        work = Path(tmp)
        classes = draw_batches(data, args.warmup + args.iters, args.batch_size, args.seed, work / "batches.pt")
        reference = run_child(__file__, "--child", "reference", "--work", tmp, *common)
        # The teacher the reference child made, as the project's teacher checkpoint: the same weights.
        import_reid(work / "models" / "best" / "net_last.pth", data, work / "teacher.pt", last_stride=TEACHER_STRIDE)
        project = run_child(__file__, "--child", "project", "--work", tmp, *common)

    source = reference_source(ref)
    ratio = project["seconds_per_iteration"] / reference["seconds_per_iteration"]
    print(f"DG-Net training iteration on the CPU, {args.threads} torch thread(s), batch {args.batch_size} per loader, "
          f"256x128, {classes} identities, {args.warmup} warm-up + {args.iters} measured iterations")
    sides = ((f"reference NVlabs/DG-Net@{(source['commit'] or 'unknown')[:8]} (fp32)", reference),
             (f"project paper preset ({args.precision})", project))
    for label, r in sides:
        print(f"  {label:<40} {r['seconds_per_iteration']:8.2f} s/it  peak RSS {r['peak_rss_mb']:6.0f} MB  "
              f"structure branch {', '.join(r['structure_branch'])}")
    print(f"  project / reference: {ratio:.3f}x")
    cycle_note = "" if args.reference_cycle else ", reference cycle off"
    print(f"first iteration's losses (sums over both loaders{cycle_note}):")
    print(f"  {'term':<10} {'reference':>10} {'project':>10}")
    first = reference["losses_first_iteration"], project["losses_first_iteration"]
    for row in LOSS_ROWS:
        print(f"  {row:<10} {first[0][row]:10.4f} {first[1][row]:10.4f}")
    if not (reference["losses_finite"] and project["losses_finite"]):
        print("WARNING: a loss is not finite", file=sys.stderr)

    command = (f"python bench/dgnet_vs_reference.py --reference <NVlabs/DG-Net checkout> --data {args.data} "
               f"--warmup {args.warmup} --iters {args.iters} --threads {args.threads} --precision {args.precision}"
               f"{'' if args.reference_cycle else ' --no-reference-cycle'} --encode-again-p {args.encode_again_p}"
               f" --seed {args.seed}")
    write_results("dgnet_vs_reference", {
        "device": "cpu", "command": command, "torch_threads": args.threads,
        "data": Path(args.data).name, "training_identities": classes, "batch_per_loader": args.batch_size,
        "image_size": [256, 128], "warmup": args.warmup, "iterations": args.iters, "iteration": LATE_ITERATION,
        "reference_source": source, "reference_cycle": args.reference_cycle, "teacher_last_stride": TEACHER_STRIDE,
        "reference_seconds_per_iteration": reference["seconds_per_iteration"],
        "project_seconds_per_iteration": project["seconds_per_iteration"], "project_over_reference": ratio,
        "reference": reference, "project": project,
    }, path=Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
