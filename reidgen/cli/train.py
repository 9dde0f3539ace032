"""`reidgen train-reid | train-dgnet | train-crgan`: the training commands and their shared options."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reidgen.core.config import config_to_dict, parse_settings, setting_names
from reidgen.core.errors import ReidgenError


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
    from reidgen.core.paths import resolve_data
    from reidgen.core.settings import TorchrunSettings
    from trainer.evaluation.evaluate import evaluate_checkpoint
    from trainer.tasks.reid import REID_PRESETS, preset_config, train_reid

    if args.resume:
        last = train_reid(None, args.out, resume=args.resume)  # type: ignore[arg-type]
        saved = None  # read from the run folder below, on rank 0 (another machine may not have it)
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
    if saved is None:
        saved = json.loads((Path(args.out) / "config.json").read_text())
    eval_data = saved["eval_data"] or (saved["target"] if saved["online_render"] else saved["data"])
    if saved["evaluate"] and (Path(eval_data) / "query").is_dir():
        report = evaluate_checkpoint(last, eval_data)
        (Path(args.out) / "eval.json").write_text(report.model_dump_json(indent=2))
        print(report.table())
    return 0


def cmd_train_dgnet(args: argparse.Namespace) -> int:
    from reidgen.core.paths import resolve_data
    from trainer.tasks.dgnet import DGNET_TRAIN_PRESETS, dgnet_preset_config, train_dgnet

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
    from reidgen.core.paths import resolve_data
    from trainer.tasks.crgan import CRGAN_TRAIN_PRESETS, crgan_preset_config, train_crgan

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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-reid", help="train a baseline re-id model (also DG-Net's teacher, CR-GAN's D_id)",
                       description="Train a re-id classifier (backbone → pooling → 512 bottleneck + BN → dropout → "
                                   "classifier) with cross-entropy and SGD (warm-up, step decay). Writes checkpoints "
                                   "that resume exactly, metrics.jsonl, metrics.png and, after training, eval.json.")
    _add_set_option(p, "bottleneck=256")
    _add_reid_training_args(p)
    p.set_defaults(func=cmd_train_reid)

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
    p.add_argument("--preset", default="small", choices=["paper", "small", "fast"],
                   help="paper: ResNet-50, 256×128, the appendix's shapes, 100K iterations; small (default): "
                        "EfficientNet-Lite0, 128×64, narrower networks, 2K iterations; fast: small with the levers "
                        "that converge fast on a CPU (README, DG-Net in one CPU hour)")
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
    g.add_argument("--cpu-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on the CPU too, where it has native bf16 (AVX512-BF16 or AMX; elsewhere "
                        "fp32). Paper preset: on (1.6x faster there); small and fast: off (no gain at 128x64)")
    g.add_argument("--quality-every", type=int, metavar="ITERS",
                   help="log cheap generation-quality figures every N iterations (quality.png; 0 = off)")
    f = p.add_argument_group("levers for fast convergence (off in the paper preset; on in the fast preset; "
                             "README, DG-Net in one CPU hour)")
    f.add_argument("--discriminator", choices=["multiscale", "projected"],
                   help="D: multiscale (the paper's PatchGAN on pixels) or projected (small heads on frozen, randomly "
                        "projected ImageNet EfficientNet-Lite0 features, hinge loss)")
    f.add_argument("--diffaugment", metavar="POLICY",
                   help="DiffAugment on every image D sees, e.g. color,translation,cutout ('' = off)")
    f.add_argument("--perc", type=float, metavar="W",
                   help="weight of the perceptual loss (L1 on frozen ImageNet features) of the reconstructions (0)")
    f.add_argument("--id-recon", type=float, metavar="W",
                   help="weight of 1 − cos of the teacher's embeddings of each reconstruction and its real image (0)")
    f.add_argument("--style", type=float, metavar="W",
                   help="weight of the banded style loss: channel means and deviations (pixels and frozen ImageNet "
                        "features) in horizontal bands of each cross-identity image against its appearance "
                        "source (0)")
    f.add_argument("--lr-mlp-mult", type=float, metavar="M", help="the AdaIN MLPs learn at --lr-gen × M (1)")
    f.add_argument("--judge", metavar="CKPT",
                   help="an independent re-id model (same identities, another seed) that also judges identity in "
                        "the logged quality figures; training never uses it")
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
