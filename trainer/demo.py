"""The main job, small and end to end on the embedded default (no broker, no Docker):

    teacher and judge (train-reid) → DG-Net (train-dgnet) → swap grid → quality figures, and beside
    them a shard job (generate, in-process) → the teacher fine-tuned on real + synthetic images and,
    as the control, on real images alone (train-reid --init --shards) → evaluation of all → report.html

Every stage is the same function the CLI runs on its own; the demo only chooses small settings
and writes the report. Stages whose output is already complete are reused, so a second
`make demo` (or one after an interruption) goes straight to the stages still missing.
"""
from __future__ import annotations

import json
import multiprocessing
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from api_schemas.evaluation import EvaluationReport
from api_schemas.jobs import JobSpec
from reidgen.core.checkpoint import Checkpoint, resolve_checkpoint, run_checkpoint, run_folder
from reidgen.core.errors import ReidgenError
from reidgen.core.market import scan_split
from trainer.evaluation.evaluate import evaluate_checkpoint
from trainer.evaluation.quality import format_quality_table, measure_quality
from trainer.report import Section, write_report
from trainer.tasks.dgnet import dgnet_preset_config, train_dgnet
from trainer.tasks.reid import ReidTrainConfig, preset_config, train_reid


@dataclass
class DemoConfig:
    data: str
    out: str
    epochs: int = 4               # teacher and judge (small preset)
    # What the synthetic images add, measured as a lab would use them: the teacher fine-tuned this
    # many epochs on real + synthetic images, beside a control fine-tuned as long on real images
    # alone (the extra epoch changes the teacher too; the difference between the two is the shards').
    finetune_epochs: int = 1
    # DG-Net: 210 iterations of 4 images per loader at twice the fast preset's Adam rate, with λ_id
    # on L_id^c doubled. They cost what 150 of 6 cost, three quarters of the 200 of 6 at the preset's
    # settings, for the same identity consistency by the judge and better reconstructions
    # (docs/demo.md, "Time").
    dgnet_iterations: int = 210
    dgnet_batch_size: int = 4
    dgnet_lr: float = 8e-4
    dgnet_id_cross: float = 1.0
    # The fast preset: the levers that converge fast on a CPU (README, "DG-Net in one CPU hour").
    dgnet_preset: str = "fast"
    # Feeding and L_id^c start at this fraction of the run: in a run this short G must first learn
    # to reconstruct (from 30 %, the paper's start, identity consistency fell: docs/demo.md).
    dgnet_feed_start: float = 0.5
    judge_seed: int = 7           # the independent judge: the teacher's recipe with another seed
    dgnet: str = ""               # reuse this (longer) DG-Net run and its teacher instead of training them
    quality_images: int = 256     # images for the generation-quality figures
    records: int = 512            # synthetic images in the shard job
    shard_size: int = 256
    workers: int = 1
    device: str = "auto"


def _done(last: Path) -> bool:
    return last.is_file()


def _stage(number: int, total: int, text: str) -> float:
    print(f"[{number}/{total}] {text}", flush=True)
    return time.perf_counter()


def _in_child(threads: int, log: str, fn, args: tuple) -> None:
    import os

    import torch

    torch.set_num_threads(threads)
    with open(log, "a") as f:  # the child's progress bars would garble the parent's
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout, sys.stderr = f, f
        fn(*args)


@contextmanager
def _beside(name: str, fn, args: tuple, log: Path):
    """Run ``fn(*args)`` in a child process while the body runs here, each with half the threads.

    The demo's independent stages (teacher and judge; the quality figures and the synthetic
    re-id model) run two at a time: these small networks gain less from a second thread than
    from a second process. The child writes its output to ``log``; its failure is raised here."""
    import torch

    threads = torch.get_num_threads()
    half = max(1, threads // 2)
    log.parent.mkdir(parents=True, exist_ok=True)
    child = multiprocessing.get_context("spawn").Process(target=_in_child, args=(half, str(log), fn, args),
                                                         name=name)
    child.start()
    torch.set_num_threads(half)
    try:
        yield
    except BaseException:
        child.terminate()  # the demo stops here: no point waiting for the other stage to finish
        raise
    finally:
        torch.set_num_threads(threads)
        child.join()
    if child.exitcode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
        raise ReidgenError(f"the demo's {name} stage failed ({tail[0] if tail else f'exit {child.exitcode}'}); "
                           f"its log: {log}")


def _finetune(config: ReidTrainConfig, out: str) -> Path:
    """``config`` trained into ``out``, unless it is there already; a model of another recipe there (an
    earlier demo's, trained from ImageNet) is refused rather than reported under this recipe's name."""
    checkpoint = run_checkpoint(out)
    if not _done(checkpoint):
        train_reid(config, out)
        return checkpoint
    trained = Checkpoint.read(checkpoint, "reid").train_config
    same_start = bool(trained.get("init")) and Path(trained["init"]).resolve() == Path(config.init).resolve()
    if not same_start or trained.get("epochs") != config.epochs:
        raise ReidgenError(f"{out} holds a model of another recipe (an earlier demo's: epochs {trained.get('epochs')}, "
                           f"init {trained.get('init') or 'ImageNet'}); remove it and {Path(out).parent / 'eval'} "
                           "to train it again")
    return checkpoint


def _synthetic_lane(spec: JobSpec, shards: str, finetune: tuple[ReidTrainConfig, str], data: str, out: Path,
                    device: str) -> None:
    """The shard job, in-process; the teacher fine-tuned on real + synthetic images (unless finished);
    its evaluation, written to ``out``."""
    from worker.run import run_job
    from worker.shards import contact_sheet, verify

    run_job(spec, Path(shards), device=device)
    report = verify(shards)
    if not report.ok:
        raise ReidgenError(f"the demo's shards do not verify:\n{report.summary()}")
    contact_sheet(shards, count=32).save(Path(shards).parent / "shards_sheet.png")
    _evaluate(_finetune(*finetune), data, out, device)


def _evaluate(checkpoint: Path, data: str, out: Path, device: str) -> EvaluationReport:
    if out.is_file():
        return EvaluationReport.model_validate_json(out.read_text())
    report = evaluate_checkpoint(checkpoint, data, device=device)
    out.write_text(report.model_dump_json(indent=2))
    return report


def _input_sheet(data: str, out: Path, count: int = 16) -> Path:
    """A row of real training images of distinct people: what the models learn from."""
    from reidgen.core.images import image_grid, load_batch

    items = [it for it in scan_split(data, "train") if it.pid > 0]
    firsts = {}
    for it in items:
        firsts.setdefault(it.pid, it.path)
    paths = random.Random(0).sample(sorted(firsts.values()), min(count, len(firsts)))
    batch = load_batch(paths, (128, 64))
    image_grid([list(batch[: count // 2]), list(batch[count // 2:])]).save(out)
    return out


def _reused_run(run: str, data: str) -> dict:
    """The checkpoint, teacher and step of a DG-Net run given to ``--dgnet``, refused clearly when
    it was trained on other data (its classes would not match the demo's)."""
    ckpt = Checkpoint.read(run, "dgnet")
    checkpoint = ckpt.path
    trained_on = Path(ckpt.train_config["data"]).resolve()
    if trained_on != Path(data).resolve():
        raise ReidgenError(f"--dgnet {run} was trained on {trained_on}, the demo runs on {data}; pass --data "
                           f"{trained_on}")
    return {"checkpoint": checkpoint, "run": run_folder(checkpoint), "teacher": Path(ckpt.train_config["teacher"]),
            "step": ckpt.step}


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage; returns the path of the HTML report."""
    from generator_service.inference.grids import interpolation_strip, swap_grid
    from generator_service.models.dgnet import DGNet
    from reidgen.core.images import load_batch
    from worker.shards import verify

    out, data, total = Path(cfg.out), cfg.data, 5
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    reused = _reused_run(cfg.dgnet, data) if cfg.dgnet else None
    t = _stage(1, total, f"teacher and judge: baseline re-id models (small preset, {cfg.epochs} epochs, seeds 0 "
                         f"and {cfg.judge_seed}) on {data}")
    teacher, judge = run_checkpoint(out / "teacher"), run_checkpoint(out / "judge")
    if reused:
        teacher = reused["teacher"]
        print(f"  reusing the teacher of {cfg.dgnet}: {teacher}")
    # The judge names the people in the generated images for the quality figures: DG-Net trains
    # against the teacher (soft labels, identity losses), so the teacher cannot judge it alone.
    def reid_config(seed: int, shards: tuple[str, ...] = ()):
        return preset_config("small", data=data, epochs=cfg.epochs, milestones=(max(1, cfg.epochs - 1),),
                             workers=cfg.workers, device=cfg.device, evaluate=False, seed=seed, shards=shards)

    train_teacher = not reused and not _done(teacher)
    if not _done(judge):
        with _beside("judge", train_reid, (reid_config(cfg.judge_seed), out / "judge"), out / "judge.log"):
            if train_teacher:
                train_reid(reid_config(0), out / "teacher")
    elif train_teacher:
        train_reid(reid_config(0), out / "teacher")
    timings["teacher_and_judge"] = time.perf_counter() - t

    t = _stage(2, total, f"DG-Net: joint training ({cfg.dgnet_preset} preset, {cfg.dgnet_iterations} iterations, "
                         "online feed)")
    dgnet = run_checkpoint(out / "dgnet")
    dgnet_run = out / "dgnet"
    if reused:
        dgnet, dgnet_run = reused["checkpoint"], reused["run"]
        print(f"  reusing {dgnet} (step {reused['step']})")
    elif not _done(dgnet):
        train_dgnet(dgnet_preset_config(cfg.dgnet_preset, data=data, teacher=str(teacher), judge=str(judge),
                                        iterations=cfg.dgnet_iterations, batch_size=cfg.dgnet_batch_size,
                                        lr_gen=cfg.dgnet_lr, id_cross=cfg.dgnet_id_cross,
                                        feed_start=cfg.dgnet_feed_start, workers=cfg.workers, device=cfg.device,
                                        grid_every=max(1, cfg.dgnet_iterations // 4),
                                        quality_every=max(2, cfg.dgnet_iterations // 4)), out / "dgnet")
    timings["dgnet"] = time.perf_counter() - t

    t = _stage(3, total, "swap grid and interpolation strip from query images of distinct people")
    model, _ = DGNet.from_checkpoint(dgnet)
    query = [it for it in scan_split(data, "query") if it.pid > 0]
    by_id: dict[int, str] = {}
    for it in query:
        by_id.setdefault(it.pid, it.path)
    if len(by_id) < 2:
        raise ReidgenError(f"the query split of {data} has {len(by_id)} identities; the swap grid needs 2 or more")
    picked = random.Random(0).sample(sorted(by_id.values()), min(10, len(by_id)))
    rows = min(4, len(picked) // 2)  # 4 appearance rows × 6 structure columns when there are people enough
    size = model.cfg.image_size
    appearance, structure = load_batch(picked[:rows], size), load_batch(picked[rows:], size)
    swap_grid(model, appearance, structure).save(out / "swap_grid.png")
    interpolation_strip(model, appearance[0], appearance[1]).save(out / "interpolation.png")
    timings["swap_grid"] = time.perf_counter() - t

    t = _stage(4, total, f"beside each other: a shard job of {cfg.records} generated images with soft labels, the "
                         f"teacher fine-tuned {cfg.finetune_epochs} epoch(s) on real + synthetic images; the "
                         f"generation-quality figures ({cfg.quality_images} images), the teacher fine-tuned as long on "
                         "real images alone (the control); the evaluation of each model (the query/gallery split, "
                         "Market protocol, flip-averaged features)")
    shards, evals = out / "shards", out / "eval"
    spec = JobSpec(kind="dgnet_random_structures", checkpoint=str(dgnet), data=data, subset=cfg.records,
                   structures_per_image=1, cross_identity=True, seed=0, shard_size=cfg.shard_size,
                   encoding="jpeg", jpeg_quality=95)

    def finetune_config(shards: tuple[str, ...] = ()) -> ReidTrainConfig:
        # From the teacher, at its last learning rate (the preset's × gamma), without warm-up.
        base = reid_config(0, shards)
        return replace(base, init=str(teacher), epochs=cfg.finetune_epochs, milestones=(), warmup_epochs=0.0,
                       lr=base.lr * base.gamma)

    quality_file = out / "quality.json"
    # The evaluations live in the demo's folder: a reused teacher or DG-Net run is only read.
    evals.mkdir(exist_ok=True)
    synthetic = (finetune_config((str(shards.resolve()),)), str(out / "real_plus_synthetic"))
    lane = (spec, str(shards), synthetic, data, evals / "real_plus_synthetic.json", cfg.device)
    with _beside("synthetic data", _synthetic_lane, lane, out / "real_plus_synthetic.log"):
        if not quality_file.is_file() or json.loads(quality_file.read_text()).get("checkpoint") != str(dgnet):
            # Without Inception (FID, KID): on a CPU it took more time than the rest of this stage (4
            # minutes on one core at n = 256); `reidgen quality` measures it apart (docs/demo.md).
            quality = measure_quality(dgnet, data, teacher=str(teacher), judge=str(judge), n=cfg.quality_images,
                                      device=cfg.device, fid=False)
            quality_file.write_text(json.dumps(quality, indent=2))
        control = _finetune(finetune_config(), str(out / "real_only"))
        epochs = f"{cfg.finetune_epochs} epoch{'s' if cfg.finetune_epochs != 1 else ''}"
        results = [
            ("baseline (teacher): real images only", _evaluate(teacher, data, evals / "teacher.json", cfg.device)),
            ("DG-Net E_a: s_prim + 0.5·s_fine", _evaluate(dgnet, data, evals / "dgnet.json", cfg.device)),
            (f"teacher + {epochs} on real images (control)",
             _evaluate(control, data, evals / "real_only.json", cfg.device)),
        ]
    # Written by the lane: read back here.
    results.append((f"teacher + {epochs} on real + synthetic shards",
                    _evaluate(run_checkpoint(synthetic[1]), data, evals / "real_plus_synthetic.json", cfg.device)))
    quality = json.loads(quality_file.read_text())
    print(format_quality_table(quality))
    report = verify(shards)
    print(f"  {report.summary().splitlines()[0]}")
    for name, r in results:
        print(f"  {name:<44} Rank-1 {100 * r.rank1:6.2f}  mAP {100 * r.mAP:6.2f}")
    timings["quality_and_synthetic"] = time.perf_counter() - t

    _stage(5, total, "report")
    grids = sorted((dgnet_run / "grids").glob("step_*.png"), key=lambda p: int(p.stem.split("_")[1]))
    sections = [
        Section("Results", f"Evaluated on {data} (query × gallery, Market protocol). Short CPU runs: the figures "
                           "show the pipeline works end to end, not what long GPU runs reach.", results=results),
        Section("Inputs", "Real training images of distinct people.",
                pictures=[(_input_sheet(data, out / "inputs.png"), "training images")]),
        Section("DG-Net swaps", "Rows take the appearance of the first column, columns the structure of the "
                                "first row (paper Fig. 1).",
                pictures=[(out / "swap_grid.png", "swap grid (query images, unseen in training)"),
                          (out / "interpolation.png", "row 1: appearance interpolated; row 2: structure")]),
        Section("DG-Net generation quality", "Measured on the training split by reidgen quality (the same "
                                             "figures as the README's); identity is judged twice, by the teacher "
                                             "DG-Net trained against and by an independent judge (the teacher's "
                                             "recipe, another seed). FID and KID are left out to keep the demo "
                                             f"short: reidgen quality --checkpoint {dgnet_run} --judge {judge} "
                                             f"--n {cfg.quality_images} adds them, with their real-vs-real floor. The "
                                             "curves come from the fixed images training measured as it went.",
                code=format_quality_table(quality),
                pictures=[(dgnet_run / "quality.png", "cheap quality figures during training")]),
        Section("DG-Net training", "Grid rows: a, b, reconstruction of a, a from its positive's appearance, "
                                   "a's appearance on b's structure, b's on a's.",
                pictures=[(dgnet_run / "metrics.png", "DG-Net losses")] +
                         ([(grids[-1], f"training grid at {grids[-1].stem}")] if grids else [])),
        Section("Synthetic shards", report.summary().splitlines()[0] + ": every checksum verified",
                pictures=[(out / "shards_sheet.png", "records of the shard job")]),
        Section("Re-id training curves",
                pictures=[(out / "teacher" / "metrics.png", "baseline (teacher)"),
                          (out / "judge" / "metrics.png", "the judge (same recipe, another seed)"),
                          (out / "real_only" / "metrics.png", "fine-tuned on real images (control)"),
                          (out / "real_plus_synthetic" / "metrics.png", "fine-tuned on real + synthetic")]),
        Section("Timings", code=json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=2)),
    ]
    path = write_report(out / "report.html", "reidgen demo: DG-Net end to end", sections)
    print(f"report: {path}")
    return path


def demo_checkpoints(out: str | Path) -> dict[str, Path]:
    """The checkpoints a finished demo leaves (for tests and for users who continue from them)."""
    out = Path(out)
    return {name: resolve_checkpoint(out / name) for name in ("teacher", "dgnet", "real_only", "real_plus_synthetic")}
