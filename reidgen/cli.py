"""The `reidgen` command line. Heavy imports happen inside each command, so `--help` is instant."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reidgen.config import config_to_dict, parse_settings, setting_names
from reidgen.errors import ReidgenError

DESCRIPTION = """\
reidgen: synthetic training data for person re-identification (DG-Net, CR-GAN).

Data sets are Market-1501 style folders (bounding_box_train/, query/, bounding_box_test/);
--data takes a path or a data set name under $REIDGEN_DATA (default ../shared/data).
"""


def _add_reid_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", "--real", dest="data",
                   help="training data (the real images): a Market-style folder or a data set name (e.g. "
                        "market1501_mini)")
    p.add_argument("--out", required=True, help="run folder for checkpoints, metrics.jsonl, metrics.png, eval.json")
    p.add_argument("--preset", default="small", choices=["paper", "small", "tiny"],
                   help="paper: ResNet-50 at 256×128, 60 epochs; small (default): ImageNet EfficientNet-Lite0 "
                        "at 128×64 for CPU; tiny: a small random CNN for smoke tests")
    p.add_argument("--resume", metavar="CKPT", help="resume exactly from a checkpoint (its configuration wins)")
    g = p.add_argument_group("overrides of the preset")
    g.add_argument("--backbone", choices=["resnet50", "efficientnet_lite0", "small_cnn"])
    g.add_argument("--pretrained", help="none | imagenet (offline: bundled or cached weights) | "
                                        "imagenet-download (ResNet-50 via torchvision) | PATH to a state dict")
    g.add_argument("--last-stride", type=int, choices=[1, 2])
    g.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--sampler", choices=["random", "pk"], help="random batches, or P identities × K images")
    g.add_argument("--p", type=int, help="identities per batch with --sampler pk")
    g.add_argument("--k", type=int, help="images per identity with --sampler pk")
    g.add_argument("--lr", type=float, help="learning rate of the heads (backbone: × --backbone-lr-mult)")
    g.add_argument("--backbone-lr-mult", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--milestones", type=float, nargs="*", help="epochs at which the lr is multiplied by --gamma")
    g.add_argument("--gamma", type=float)
    g.add_argument("--erasing-p", type=float, help="random erasing probability")
    g.add_argument("--seed", type=int)
    g.add_argument("--workers", type=int, help="data loader processes")
    g.add_argument("--max-steps", type=int, help="stop after this many steps")
    g.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="also save every N steps")
    g.add_argument("--keep-checkpoints", action="store_true", default=None, help="keep step_N.pt snapshots")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    g.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="disable bf16 autocast on CUDA")
    g.add_argument("--strict-images", action="store_true", default=None,
                   help="stop at the first unreadable image instead of skipping it")
    g.add_argument("--no-eval", dest="evaluate", action="store_false", default=None,
                   help="skip the query/gallery evaluation after training")
    g.add_argument("--eval-data", help="evaluate on this data set's query/gallery (default: --target with "
                                       "--online-render, else --data)")
    x = p.add_argument_group("fine-tuning and cross-domain (CR-GAN)")
    x.add_argument("--init", metavar="CKPT", help="start from this re-id checkpoint (same identities)")
    x.add_argument("--online-render", metavar="CRGAN_CKPT",
                   help="train on source images rendered on the fly into random target contexts by CR-GAN")
    x.add_argument("--target", help="target data set whose contexts --online-render uses")
    y = p.add_argument_group("real plus synthetic images (DG-Net's discriminative losses on generated images)")
    y.add_argument("--shards", nargs="+", metavar="DIR",
                   help="job folders of reidgen generate: each step adds synthetic images trained with KL to their "
                        "stored soft labels (L_prim) and a fine-grained head's CE to the structure identity (L_fine)")
    y.add_argument("--online-generator", metavar="DGNET_CKPT",
                   help="instead of shards, generate the same kind of samples on the fly (appearance of each real "
                        "image on another person's structure) with this DG-Net checkpoint and its teacher")
    y.add_argument("--synthetic-ratio", type=float, help="synthetic images per real image in each batch (1.0)")
    y.add_argument("--prim-weight", type=float, help="weight of L_prim (2.0, the paper's λ_prim)")
    y.add_argument("--fine-weight", type=float, help="weight of L_fine (0.4 = 0.2·λ_prim)")


def _add_set_option(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help=f"any setting of the run's configuration by name (config.json shows them all), e.g. "
                        f"--set {example}; repeatable; JSON values (numbers, true/false, lists) are read as such")


def _add_gan_run_options(g: argparse._ArgumentGroup) -> None:
    """How a GAN run runs (train-dgnet, train-crgan): seed, hardware, checkpoints, grids."""
    g.add_argument("--seed", type=int)
    g.add_argument("--workers", type=int, help="data loader processes")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    g.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="disable bf16 autocast on CUDA")
    g.add_argument("--checkpoint-every", type=int, metavar="ITERS", help="save checkpoints/last.pt every N iterations")
    g.add_argument("--keep-checkpoints", action="store_true", default=None, help="keep step_N.pt snapshots")
    g.add_argument("--grid-every", type=int, metavar="ITERS", help="write an image grid every N iterations")
    g.add_argument("--max-steps", type=int, help="stop after this many iterations (the schedule keeps --iterations)")


def _overrides(args: argparse.Namespace, preset: object, handled: tuple[str, ...] = ()) -> dict:
    """The settings the user gave: every option whose name is a setting of the preset's
    configuration (each option is declared once, in the parser, with the setting's name as its
    dest), then ``--set KEY=VALUE``; ``handled``: settings the command fills in itself."""
    names = setting_names(preset) - {"preset", *handled}
    out = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names and v is not None}
    out.update(parse_settings(getattr(args, "set", None) or [], names))
    return out


def cmd_train_reid(args: argparse.Namespace) -> int:
    from reidgen.core.settings import TorchrunSettings
    from reidgen.paths import resolve_data
    from trainer.evaluate import evaluate_checkpoint
    from trainer.train_reid import REID_PRESETS, preset_config, train_reid

    if args.resume:
        last = train_reid(None, args.out, resume=args.resume)  # type: ignore[arg-type]
        saved = json.loads((Path(args.out) / "config.json").read_text())
    else:
        if not args.data:
            raise ReidgenError("--data is required (a Market-style folder or a data set name)")
        data = str(resolve_data(args.data))
        extra = {k: str(resolve_data(getattr(args, k))) for k in ("target", "eval_data") if getattr(args, k)}
        if args.shards:
            extra["shards"] = tuple(str(Path(d).resolve()) for d in args.shards)
        overrides = _overrides(args, REID_PRESETS[args.preset], handled=("data", "target", "eval_data", "shards"))
        cfg = preset_config(args.preset, data=data, **overrides, **extra)
        last = train_reid(cfg, args.out)
        saved = config_to_dict(cfg)
    if TorchrunSettings.from_env().rank != 0:
        return 0  # under torchrun every rank trains; rank 0 alone wrote the run and evaluates it
    print(f"checkpoint: {last}")
    eval_data = saved["eval_data"] or (saved["target"] if saved["online_render"] else saved["data"])
    if saved["evaluate"] and (Path(eval_data) / "query").is_dir():
        report = evaluate_checkpoint(last, eval_data)
        (Path(args.out) / "eval.json").write_text(report.model_dump_json(indent=2))
        print(report.table())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from reidgen.paths import resolve_data
    from trainer.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(args.checkpoint, resolve_data(args.data), part_weights=args.part_weights,
                                 flip=not args.no_flip, device=args.device, batch_size=args.batch_size,
                                 workers=args.workers, strict_images=args.strict_images, lmp=args.lmp)
    print(report.model_dump_json(indent=2) if args.json else report.table())
    if report.skipped_images and not args.json:
        print(f"warning: skipped {len(report.skipped_images)} unreadable image(s), first: "
              f"{report.skipped_images[0]}", file=sys.stderr)
    return 0


def cmd_train_dgnet(args: argparse.Namespace) -> int:
    from reidgen.paths import resolve_data
    from trainer.train_dgnet import DGNET_TRAIN_PRESETS, dgnet_preset_config, train_dgnet

    if args.resume:
        last = train_dgnet(None, args.out, resume=args.resume)
    else:
        if not args.data or not args.teacher:
            raise ReidgenError("--data and --teacher are required (the teacher comes from reidgen train-reid)")
        cfg = dgnet_preset_config(args.preset, data=str(resolve_data(args.data)), teacher=args.teacher,
                                  **_overrides(args, DGNET_TRAIN_PRESETS[args.preset], handled=("data", "teacher")))
        last = train_dgnet(cfg, args.out)
    print(f"checkpoint: {last}")
    return 0


def cmd_train_crgan(args: argparse.Namespace) -> int:
    from reidgen.paths import resolve_data
    from trainer.train_crgan import CRGAN_TRAIN_PRESETS, crgan_preset_config, train_crgan

    if args.resume:
        last = train_crgan(None, args.out, resume=args.resume)
    else:
        if not (args.source and args.target and args.id_model):
            raise ReidgenError("--source, --target and --id-model are required (the identity model comes from "
                               "reidgen train-reid on the source)")
        overrides = _overrides(args, CRGAN_TRAIN_PRESETS[args.preset], handled=("source", "target", "id_model"))
        cfg = crgan_preset_config(args.preset, source=str(resolve_data(args.source)),
                                  target=str(resolve_data(args.target)), id_model=args.id_model, **overrides)
        last = train_crgan(cfg, args.out)
    print(f"checkpoint: {last}")
    return 0


def _pick_people(data: str, split: str, count: int, seed: int) -> list[str]:
    """One image each of ``count`` distinct identities of a split, picked at random (seeded)."""
    import random

    from reidgen.market import scan_split
    from reidgen.paths import resolve_data

    by_id: dict[int, list[str]] = {}
    for it in scan_split(resolve_data(data), split):
        if it.pid > 0:
            by_id.setdefault(it.pid, []).append(it.path)
    if len(by_id) < count:
        raise ReidgenError(f"the {split} split of {data} has {len(by_id)} identities; {count} are needed")
    rng = random.Random(seed)
    return [rng.choice(by_id[i]) for i in rng.sample(sorted(by_id), count)]


def cmd_swap_grid(args: argparse.Namespace) -> int:
    from generator_service.dgnet import DGNet
    from generator_service.grids import interpolation_strip, swap_grid
    from generator_service.images import load_batch

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


CRGAN_QUALITY_OPTIONS = ("targets", "target_split", "source_split", "k", "lpips_weights")


def cmd_quality(args: argparse.Namespace) -> int:
    from trainer.quality import format_quality_table, measure_quality, run_folder
    from trainer.quality_crgan import checkpoint_kind

    if checkpoint_kind(args.checkpoint) == "crgan":
        return _quality_crgan(args)
    given = [f"--{name.replace('_', '-')}" for name in CRGAN_QUALITY_OPTIONS if getattr(args, name) is not None]
    if given:
        raise ReidgenError(f"{', '.join(given)}: only for CR-GAN checkpoints; {args.checkpoint} is a DG-Net checkpoint")
    report = measure_quality(args.checkpoint, args.data, teacher=args.teacher, n=2000 if args.n is None else args.n,
                             seed=args.seed,
                             device=args.device, batch_size=args.batch_size)
    out = Path(args.out) if args.out else run_folder(args.checkpoint) / "quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if report["n"] < report["n_requested"]:
        print(f"note: n = {report['n']} instead of {report['n_requested']}: the training split has too few images "
              "(2n are needed: n for the swaps and the real set, n for the real-vs-real floor)", file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else f"{format_quality_table(report)}\njson: {out}")
    return 0


def _quality_crgan(args: argparse.Namespace) -> int:
    """`reidgen quality` on a CR-GAN checkpoint: instance guidance on held-out source × target pairs."""
    from trainer.quality import run_folder
    from trainer.quality_crgan import DEFAULT_K, format_crgan_quality_table, measure_crgan_quality

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


def cmd_render_grid(args: argparse.Namespace) -> int:
    from generator_service.engine import Engine
    from generator_service.grids import render_grid

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


def cmd_masks(args: argparse.Namespace) -> int:
    from generator_service.masks import build_mask_provider, compute_masks, mask_sheet
    from reidgen.market import scan_split
    from reidgen.paths import resolve_data

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


def _add_root_args(p: argparse.ArgumentParser, models: bool) -> None:
    """The roots of a server (serve: --models is its models root): a job names files under them only."""
    if models:
        p.add_argument("--models-root", help="a job's checkpoint and teacher are model names under this folder "
                                             "(default $REIDGEN_MODELS_ROOT or ./models)")
    p.add_argument("--data-root", help="a job's data and target are data set names under this folder "
                                       "(default $REIDGEN_DATA or ../shared/data beside the checkout)")
    p.add_argument("--shards-root", help="a job's out is a folder name under this folder "
                                         "(default $REIDGEN_SHARDS_ROOT or ./shards)")


def cmd_serve(args: argparse.Namespace) -> int:
    from generator_service.serve import serve
    from reidgen.core.settings import WorkerSettings

    jobs = None
    if args.jobs if args.jobs is not None else WorkerSettings.from_env().redis_url_is_set:
        from worker.jobs import CeleryJobs

        jobs = CeleryJobs()
    serve(args.models, jobs=jobs, host=args.host, port=args.port, api_key_file=args.api_key_file, device=args.device,
          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
          batching=not args.no_batching, max_images=args.max_images, max_pixels=args.max_pixels,
          request_timeout_s=args.timeout, mask_provider=args.masks, data_root=args.data_root,
          shards_root=args.shards_root, max_job_records=args.max_job_records, max_job_tasks=args.max_job_tasks,
          min_shard_size=args.min_shard_size, max_active_jobs=args.max_active_jobs,
          header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout, keep_alive_s=args.keep_alive,
          max_connections=args.max_connections)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from reidgen.paths import resolve_data
    from trainer.demo import DemoConfig, run_demo

    try:
        data = resolve_data(args.data)
    except ReidgenError as exc:
        raise ReidgenError(f"{exc}. The demo needs a Market-style data set: pass --data DIR "
                           "(make demo DATA=DIR), or set REIDGEN_DATA to the folder holding market1501_mini") from None
    run_demo(DemoConfig(data=str(data), out=args.out, epochs=args.epochs, dgnet_iterations=args.dgnet_iterations,
                        records=args.records, device=args.device, dgnet=args.dgnet or ""))
    return 0


def _load_spec(path: str):
    from pydantic import ValidationError

    from api_schemas.jobs import JobSpec

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ReidgenError(f"cannot read the job spec {path} ({exc.strerror})") from None
    try:
        return JobSpec.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "spec"
        raise ReidgenError(f"job spec {path}: {where}: {first['msg']} ({exc.error_count()} problem(s))") from None


def cmd_generate(args: argparse.Namespace) -> int:
    spec = _load_spec(args.spec)
    if args.submit:
        from api_schemas.jobs import JobRequest
        from worker.jobs import submit_job

        job_id = submit_job(JobRequest(spec=spec, out=str(Path(args.out).resolve())))
        print(f"job {job_id} submitted ({args.out}); follow it with GET /v1/jobs/{job_id}")
        return _follow(job_id) if args.follow else 0
    from worker.run import run_job
    from worker.shards import verify

    results = run_job(spec, args.out, device=args.device, progress=not args.no_progress)
    made = sum(r.records for r in results if r.status == "done")
    failed = sum(r.failed for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    print(f"{len(results)} shard(s) in {args.out}: {made} records written, {skipped} shard(s) already done, "
          f"{failed} record(s) failed")
    report = verify(args.out)
    print(report.summary().splitlines()[-1] if report.ok else report.summary())
    return 0 if report.ok else 1


def _follow(job_id: str) -> int:
    """A progress bar over a submitted job's shards until it ends (Ctrl-C stops watching, not the job)."""
    import time

    from tqdm import tqdm

    from worker.jobs import JobStore

    store = JobStore()
    status = store.status(job_id)
    with tqdm(total=status.records_planned, unit="img", dynamic_ncols=True, desc=f"job {job_id[:8]}") as bar:
        while True:
            status = store.status(job_id)
            bar.update(status.records_done + status.records_failed - bar.n)
            bar.set_postfix(shards=f"{status.shards_done}/{status.shards_total}", state=status.state)
            if status.state in ("done", "failed", "cancelled"):
                break
            time.sleep(1.0)
    for error in status.errors:
        print(f"error: {error}", file=sys.stderr)
    return 0 if status.state == "done" else 1


def cmd_worker(args: argparse.Namespace) -> int:
    from generator_service.app import Settings
    from reidgen.core.settings import WorkerSettings
    from worker.celery_app import app, queue_name, redo_queue_name, use_settings

    # The flags over the environment, installed before the pool forks: every pool process has them.
    settings = WorkerSettings.from_env(device=args.device, torch_threads=args.threads, queue=args.queue,
                                       models_root=args.models_root, data_root=args.data_root,
                                       shards_root=args.shards_root, heartbeat_s=args.heartbeat, lease_s=args.lease)
    Settings.from_env(worker=settings)  # bad timings fail here, in one line, not in every task
    use_settings(settings)

    argv = ["worker", "--loglevel", args.loglevel, "--concurrency", str(args.concurrency), "--pool", "prefork",
            "--queues", f"{queue_name()},{redo_queue_name()}", "--without-gossip", "--without-mingle"]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from worker.shards import ShardReader, contact_sheet, shard_paths, verify

    if args.action == "verify":
        report = verify(args.dir)
        print(report.summary())
        return 0 if report.ok else 1
    paths = shard_paths(args.dir)
    if not paths:
        raise ReidgenError(f"no finished shards under {args.dir}")
    total = 0
    for path in paths:
        m = ShardReader(path).manifest
        total += m.record_count
        print(f"{path.name}: {m.record_count} records, {len(m.failed)} failed, sha256 {m.shard_sha256[:16]}, "
              f"plan {m.plan_hash}")
    m = ShardReader(paths[0]).manifest
    meta, _ = ShardReader(paths[0]).record(0) if m.record_count else ({}, b"")
    print(f"{len(paths)} shard(s), {total} records; kind {m.spec.kind}, encoding {m.spec.encoding}, "
          f"models {', '.join(f'{k} {v.identity}' for k, v in m.models.items())}")
    if meta:
        print(f"first record: {json.dumps(meta)}")
    sheet = Path(args.sheet) if args.sheet else Path(args.dir) / "contact_sheet.png"
    contact_sheet(args.dir, count=args.count).save(sheet)
    print(f"contact sheet: {sheet}")
    return 0


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    from generator_service.checkpoint import convert_checkpoint

    changes = convert_checkpoint(args.old, args.new, trust=args.trust)
    for change in changes[:10]:
        print(f"  {change}")
    if len(changes) > 10:
        print(f"  ... and {len(changes) - 10} more")
    done = f"converted {len(changes)} value(s)" if changes else "nothing needed converting"
    print(f"{done}; {args.new} holds only tensors and plain data and loads safely")
    return 0


def cmd_import_dgnet(args: argparse.Namespace) -> int:
    from reidgen.paths import resolve_data
    from trainer.import_dgnet import import_dgnet

    out = import_dgnet(args.gen, args.id, resolve_data(args.data), args.out, dis=args.dis, teacher=args.teacher,
                       teacher_last_stride=args.teacher_last_stride, ea_last_stride=args.id_stride)
    teacher = f"; teacher {out.with_name(out.stem + '.teacher.pt')}" if args.teacher else ""
    print(f"wrote {out} (DG-Net, paper preset, reference layout{'' if args.dis else ', D not imported'}{teacher})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import time

    from generator_service.checkpoint import resolve_checkpoint
    from generator_service.dgnet import export_inference

    t0 = time.perf_counter()
    out = export_inference(args.run, args.out)
    source = resolve_checkpoint(args.run)
    mb = 1024 * 1024
    print(f"wrote {out}: {out.stat().st_size / mb:.1f} MiB (from {source}, {source.stat().st_size / mb:.1f} MiB) "
          f"in {time.perf_counter() - t0:.1f} s; inference only: E_a, E_s, G, configuration and label map")
    return 0


def cmd_import_reid(args: argparse.Namespace) -> int:
    from reidgen.paths import resolve_data
    from trainer.import_dgnet import import_reid

    out = import_reid(args.file, resolve_data(args.data), args.out, last_stride=args.last_stride)
    print(f"wrote {out} (re-id: ResNet-50, average pooling, last stride {args.last_stride})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reidgen", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-reid", help="train a baseline re-id model (also DG-Net's teacher, CR-GAN's D_id)",
                       description="Train a re-id classifier (backbone → pooling → 512 bottleneck + BN → dropout → "
                                   "classifier) with cross-entropy and SGD (warm-up, step decay). Writes checkpoints "
                                   "that resume exactly, metrics.jsonl, metrics.png and, after training, eval.json.")
    _add_set_option(p, "bottleneck=256")
    _add_reid_training_args(p)
    p.set_defaults(func=cmd_train_reid)

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

    p = sub.add_parser("train-dgnet", help="train DG-Net (E_a, E_s, G, D) jointly with a teacher, online feed",
                       description="Joint discriminative and generative training (DG-Net). Needs a teacher from "
                                   "reidgen train-reid on the same training identities. Writes checkpoints that resume "
                                   "exactly, metrics.jsonl (every loss, every iteration), metrics.png and image grids "
                                   "under grids/ (rows: a, b, reconstruction, positive swap, a on b, b on a). "
                                   "Several GPUs: torchrun --nproc_per_node N -m reidgen train-dgnet ...")
    _add_set_option(p, "id_cross=1.0")
    p.add_argument("--data", help="training data: a Market-style folder or a data set name")
    p.add_argument("--teacher", help="baseline checkpoint (reidgen train-reid) giving the soft labels")
    p.add_argument("--init", dest="init_from", metavar="CKPT",
                   help="start from this DG-Net checkpoint's weights: a run, an import-dgnet file or an export "
                        "(same identities; its model configuration wins over the preset's)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", default="small", choices=["paper", "small"],
                   help="paper: ResNet-50, 256×128, the appendix's shapes, 100K iterations; small (default): "
                        "EfficientNet-Lite0, 128×64, narrower networks, 2K iterations")
    p.add_argument("--resume", metavar="CKPT", help="resume exactly from a checkpoint (its configuration wins)")
    g = p.add_argument_group("overrides of the preset")
    g.add_argument("--backbone", choices=["resnet50", "efficientnet_lite0", "small_cnn"])
    g.add_argument("--pretrained", help="none | imagenet | imagenet-download | PATH (backbone weights)")
    g.add_argument("--iterations", type=int, help="run length; warm-up, ramp and lr steps scale with it")
    g.add_argument("--batch-size", type=int, help="images per loader (two loaders)")
    g.add_argument("--lr-ea", type=float, help="SGD learning rate of E_a")
    g.add_argument("--lr-gen", type=float, help="Adam learning rate of E_s, G, D")
    g.add_argument("--milestones", type=float, nargs="*",
                   help="fractions of the run at which every lr is multiplied by 0.1 (0.6 0.9; none: constant)")
    g.add_argument("--no-feed", dest="feed", action="store_false", default=None,
                   help="do not feed generated images to E_a (the paper's 'w/o feed' ablation)")
    g.add_argument("--feed-start", type=float, help="fraction of the run before L_prim/L_fine start (0.3)")
    g.add_argument("--ramp", type=float, help="fraction of the run for λ_prim to ramp 0→2 (0.04)")
    g.add_argument("--ramp-id-cross", dest="ramp_id_cross", action=argparse.BooleanOptionalAction, default=None,
                   help="ramp L_id^c (identity of generated images) in from --feed-start (small preset: on, so G "
                        "learns to reconstruct first; paper preset: off, on from the start)")
    g.add_argument("--ramp-code-loss", action="store_true", default=None,
                   help="reference code: ramp L_code in from --feed-start too")
    g.add_argument("--no-detach-appearance", dest="detach_appearance_code", action="store_false", default=None,
                   help="let generative losses reach E_a through the appearance code (paper); default detaches "
                        "it (reference code)")
    g.add_argument("--cycle-max", type=float, help="weight of the reference code's cycle loss after the ramp (0)")
    g.add_argument("--adv", type=float, help="weight of G's adversarial loss per D scale (paper preset: 2, the "
                                             "reference code's; small: 1)")
    g.add_argument("--id-cross", type=float, metavar="LAMBDA",
                   help="λ_id, weight of L_id^c (identity of cross-identity swaps; paper and both presets: 0.5)")
    g.add_argument("--ea-from-teacher", action=argparse.BooleanOptionalAction, default=None,
                   help="start E_a's backbone from the teacher's (small preset: on; paper: off, ImageNet)")
    g.add_argument("--cpu-bf16", action="store_true", default=None,
                   help="bf16 autocast on the CPU too (pays on CPUs with native bf16; bench/dgnet_speed.py)")
    g.add_argument("--quality-every", type=int, metavar="ITERS",
                   help="log cheap generation-quality figures every N iterations (quality.png; 0 = off)")
    r = p.add_argument_group("which network learns from which loss (defaults: the reference code; the "
                             "flags read the paper literally)")
    r.add_argument("--id-cross-trains-ea", action=argparse.BooleanOptionalAction, default=None,
                   help="L_id^c also trains E_a (default: a frozen copy of E_a judges G's image; only G, E_s learn)")
    r.add_argument("--feed-trains-generator", action=argparse.BooleanOptionalAction, default=None,
                   help="L_prim/L_fine also reach G and E_s (default: computed on the detached image; only E_a "
                        "learns)")
    r.add_argument("--structure-target-grad", action=argparse.BooleanOptionalAction, default=None,
                   help="L_code's structure target keeps its gradient (default: detached)")
    r.add_argument("--encode-again-p", type=float,
                   help="probability that the live E_s re-encodes the detached generated image rather than a "
                        "frozen E_s the live one (0.5)")
    r.add_argument("--fine-on-real", action=argparse.BooleanOptionalAction, default=None,
                   help="the fine-grained head also learns CE on real images, weight λ_fine (default: on)")
    r.add_argument("--sum-over-loaders", action=argparse.BooleanOptionalAction, default=None,
                   help="sum every loss over loaders a and b, as the reference (paper preset: on; small: off, the "
                        "mean)")
    r.add_argument("--weight-init", dest="init", choices=["reference", "pytorch"],
                   help="initial weights of E_s, G, D: reference (Kaiming / N(0, 0.02)) or PyTorch's defaults")
    _add_gan_run_options(g)
    g.add_argument("--strict-images", action="store_true", default=None,
                   help="stop at the first unreadable image instead of skipping it")
    p.set_defaults(func=cmd_train_dgnet)

    p = sub.add_parser("train-crgan", help="train CR-GAN: render source persons into target-domain contexts",
                       description="Instance-guided context rendering (CR-GAN). Pre-trains the camera classifier "
                                   "D_cam on the target's camera labels, then alternates the domain discriminator "
                                   "and the dual-conditional generator. Person masks are computed once and cached "
                                   "(RUN/masks by default). Grids under grids/: source, target, masked target, "
                                   "context mask, rendering.")
    _add_set_option(p, "lambda_con=2")
    p.add_argument("--source", help="labelled source data set (Market-style)")
    p.add_argument("--target", help="target data set (its train split; only camera ids are used)")
    p.add_argument("--id-model", help="D_id: baseline re-id checkpoint trained on the source (train-reid)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", default="small", choices=["paper", "small"],
                   help="paper: 256×128, 64-channel pathways, batch 32; small (default): 128×64, 32 channels, batch 8")
    p.add_argument("--resume", metavar="CKPT", help="resume exactly from a checkpoint")
    g = p.add_argument_group("overrides of the preset")
    g.add_argument("--masks", choices=["pose", "selfie", "geometric"], help="person-mask provider (default pose)")
    g.add_argument("--mask-model", help=".tflite model file for pose/selfie masks")
    g.add_argument("--mask-cache", help="where to cache masks (default RUN/masks)")
    g.add_argument("--iterations", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="Adam lr (constant for half the run, then linear to 0)")
    g.add_argument("--cam-epochs", type=int, help="epochs of D_cam pre-training")
    g.add_argument("--no-dual-condition", dest="dual_condition", action="store_false", default=None,
                   help="the paper's 'w/o dual condition' ablation: the generator sees only the source")
    g.add_argument("--con-loss", choices=["mean_square", "l2", "rms"],
                   help="form of the context loss L_con: l2 (default; the paper's Eq. 6 literally: Euclidean "
                        "norms of the masked differences per image), mean_square (mean of the masked squared errors "
                        "over all pixels, the form before issue 14), rms (the l2 norms / sqrt(C·H·W))")
    g.add_argument("--binary-masks", action="store_true", default=None,
                   help="threshold the person masks at 0.5 (the paper's binary parsing masks) instead of soft masks")
    _add_gan_run_options(g)
    p.set_defaults(func=cmd_train_crgan)

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
    p.add_argument("--n", type=int,
                   help="images: DG-Net swaps and each real set (default 2000); CR-GAN renderings = n/k sources × k "
                        "targets, and each real target set (default 100·k). FID is biased at small n: compare at "
                        "equal n")
    p.add_argument("--seed", type=int, default=0, help="seed of the image sample and the pairs")
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

    p = sub.add_parser("serve", help="HTTP service: swap, render, interpolate (FastAPI, dynamic batching)",
                       description="Serve the DG-Net and CR-GAN checkpoints of a models folder (NAME.pt files or run "
                                   "folders) over HTTP: /v1/swap, /v1/render, /v1/interpolate, /v1/models, "
                                   "/v1/healthz, /v1/readyz, /v1/metrics; OpenAPI at /docs. Binds 127.0.0.1 unless "
                                   "--host says otherwise. With an API key (--api-key-file or $REIDGEN_API_KEY) every "
                                   "endpoint but health and readiness requires it (X-API-Key or Authorization: "
                                   "Bearer).")
    p.add_argument("--models", "--models-root", dest="models", required=True,
                   help="folder of checkpoints or run folders: the models served, and the models root a job's "
                        "checkpoint and teacher are named under")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", help="file whose first line is the API key")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-batch", type=int, default=16, help="most images per model call")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--queue-size", type=int, default=256,
                   help="images waiting for the device before 503 + Retry-After (checked before a body is read)")
    p.add_argument("--no-batching", action="store_true", help="run every request alone (for comparison)")
    p.add_argument("--max-images", type=int, default=16, help="images per request")
    p.add_argument("--max-pixels", type=int, default=1024 * 1024, help="pixels per input image")
    p.add_argument("--timeout", type=float,
                   help="per-request deadline in seconds (default $REIDGEN_REQUEST_TIMEOUT_S or 30)")
    p.add_argument("--masks", choices=["pose", "selfie", "geometric"],
                   help="person masks of /v1/render's target images (default: what the CR-GAN was trained with)")
    p.add_argument("--jobs", action=argparse.BooleanOptionalAction, default=None,
                   help="serve /v1/jobs, queueing batch generation on the Celery workers at $REDIS_URL "
                        "(default: on when REDIS_URL is set)")
    _add_root_args(p, models=False)
    g = p.add_argument_group("job bounds")
    g.add_argument("--max-job-records", type=int, help="records per job (default 2000000)")
    g.add_argument("--max-job-tasks", type=int, help="shards (tasks) per job (default 10000)")
    g.add_argument("--min-shard-size", type=int, help="records per shard of a job of several shards (default 64)")
    g.add_argument("--max-active-jobs", type=int, help="jobs queued or running at once; more get 429 (default 16)")
    g = p.add_argument_group("connections")
    g.add_argument("--header-timeout", type=float, help="seconds for a request's head to arrive (default 10)")
    g.add_argument("--body-timeout", type=float, help="seconds for its body to arrive after the head (default 60)")
    g.add_argument("--keep-alive", type=float, help="seconds an idle kept-alive connection stays open (default 5)")
    g.add_argument("--max-connections", type=int, help="open connections at once; more are closed (default 256)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="batch generation into LMDB shards (in-process, or --submit to Celery)",
                       description="Run a batch generation job: the job spec (JSON; see api_schemas/jobs.py JobSpec) "
                                   "names the checkpoint, the data, the kind of generation, the seed, the shard size "
                                   "and the encoding. By default every shard is made in this process, no broker "
                                   "needed; finished shards are skipped, so an interrupted run continues where it "
                                   "stopped. --submit sends the job to the Celery workers ($REDIS_URL) instead.")
    p.add_argument("spec", help="job spec JSON file")
    p.add_argument("--out", required=True, help="output folder (job.json and shard-NNNNN/ folders)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--submit", action="store_true", help="queue one Celery task per shard and return the job id")
    p.add_argument("--follow", action="store_true", help="with --submit: show the job's progress until it ends")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("worker", help="a Celery worker making shards of queued jobs (Redis at $REDIS_URL)",
                       description="Run a Celery worker for batch generation jobs. Each pool process loads its "
                                   "model once, on its first shard. Run one worker per GPU (e.g. "
                                   "CUDA_VISIBLE_DEVICES=1 reidgen worker). Broker: $REDIS_URL (default "
                                   "redis://127.0.0.1:6379/0); keys are prefixed with $REIDGEN_REDIS_PREFIX.")
    p.add_argument("--concurrency", type=int, default=1, help="pool processes (1 per GPU)")
    p.add_argument("--queue", help="queue name (default $REIDGEN_QUEUE or reidgen-shards)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, help="torch threads per pool process")
    p.add_argument("--hostname", help="Celery node name (default celery@HOST)")
    _add_root_args(p, models=True)
    p.add_argument("--heartbeat", type=float,
                   help="seconds between a running shard's lease renewals (default $REIDGEN_HEARTBEAT_S or 10)")
    p.add_argument("--lease", type=float,
                   help="seconds without a renewal after which a shard's worker counts as lost and the shard is "
                        "queued again (default $REIDGEN_LEASE_S or 30)")
    p.add_argument("--loglevel", default="info")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("shards", help="verify or inspect generated shards",
                       description="verify: check every record against the manifests' checksums and job.json "
                                   "(missing shards, duplicates, corruption; exit 1 if anything is wrong). "
                                   "inspect: per-shard counts and checksums, the first record's labels, and a "
                                   "contact sheet PNG of records.")
    p.add_argument("action", choices=["verify", "inspect"])
    p.add_argument("dir", help="a job's output folder or one shard folder")
    p.add_argument("--sheet", help="contact sheet PNG (default DIR/contact_sheet.png)")
    p.add_argument("--count", type=int, default=32, help="records on the contact sheet")
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser("convert-checkpoint",
                       help="one-time: rewrite an old checkpoint of your own as tensors and plain data",
                       description="reidgen reads checkpoints with torch.load(weights_only=True): tensors, numbers, "
                                   "strings, lists, tuples and dicts only, so loading a file someone hands you cannot "
                                   "run code. A checkpoint written by an older reidgen may hold other objects (e.g. "
                                   "numpy arrays) and is refused. This command unpickles OLD fully - which runs "
                                   "whatever code the file contains - converts what it holds (numpy arrays to "
                                   "tensors, numpy scalars to numbers, ...), checks that the result loads with "
                                   "weights_only=True and writes it to NEW. Use it only on checkpoints you made "
                                   "yourself; --trust says you did.")
    p.add_argument("old", metavar="OLD", help="the old checkpoint file, or a run folder (uses checkpoints/last.pt)")
    p.add_argument("new", metavar="NEW", help="where to write the converted checkpoint (a new file)")
    p.add_argument("--trust", action="store_true",
                   help="confirm that OLD is your own file: converting it runs any code it contains")
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

    p = sub.add_parser("demo", help="the main job, small and end to end on CPU (writes RUN/report.html)",
                       description="The main job on the embedded default (no Redis, no Docker), about 15 minutes on "
                                   "2 CPU cores with market1501_mini: train a teacher, train DG-Net, write a swap "
                                   "grid, generate a shard job in-process, train a re-id model on real + synthetic "
                                   "images, evaluate all three and write a self-contained HTML report. Finished "
                                   "stages are reused when run again.")
    p.add_argument("--data", default="market1501_mini", help="data set folder or name (default market1501_mini)")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the two re-id models (default 4)")
    p.add_argument("--dgnet-iterations", type=int, default=200, help="DG-Net iterations (default 200)")
    p.add_argument("--dgnet", metavar="RUN",
                   help="reuse a longer DG-Net run (and its teacher) trained on --data instead of training one")
    p.add_argument("--records", type=int, default=512, help="synthetic images in the shard job (default 512)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ReidgenError as exc:
        print(f"reidgen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reidgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
