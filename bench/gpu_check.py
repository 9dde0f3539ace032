"""The prepared device check (issue 24): everything the project wants to know from a CUDA GPU, in
one command of at most 8 minutes, written to ``bench/results/gpu_check.json``.

1. ``pytest -m cuda``: the tests that need CUDA (tests/test_cuda_paths.py, tests/test_gpu_path.py);
2. one DG-Net iteration (paper preset) and one CR-GAN iteration in fp32, bf16 and fp16 autocast
   (fp16 with the loop's GradScaler over every optimiser), from the same weights and batch: finite
   losses, and each loss within ``LOSS_RTOL`` × |fp32| + ``LOSS_ATOL`` of fp32's;
3. speed: seconds per iteration and peak memory (``torch.cuda.max_memory_allocated``) for each
   precision, batch 8 per loader, ``--iterations`` measured after ``--warmup``;
4. a checkpoint written on CUDA resumes on the CPU, and one written on the CPU resumes on CUDA;
5. the engine: swap (DG-Net) and render (CR-GAN) on CUDA, and out-of-memory splitting forced by a
   memory cap (``torch.cuda.set_per_process_memory_fraction``);
6. ``bench/serve.py`` (1, 8, 32 clients, batched and unbatched, against the offline engine) and
   ``bench/generate.py`` (a batch job against the raw forward) on CUDA.

The GPU machine has no network and only a base Python: what the check needs besides torch comes
as wheels in ``gpu_bundle/wheels`` with a few dozen images in ``gpu_bundle/data`` (``make
gpu-bundle``, ignored by git); the script unpacks the wheels into ``gpu_bundle/site`` and puts it
on the path, so it runs from a plain ``python3``. Without CUDA it says so in one line and exits 0.

The script writes no environment variable: its child processes (pytest, bench/serve.py,
bench/generate.py) get the bundle's ``PYTHONPATH`` and ``REIDGEN_DATA`` in an explicit ``env``.

``--dry-run`` runs every code path once on the CPU with tiny presets and 2 iterations (the engine's
out-of-memory path by a simulated error), fails if any breaks, and writes nothing to
bench/results (tests/test_gpu_check.py runs it, so that the script cannot rot).

    python3 bench/gpu_check.py [--dry-run] [--out bench/results/gpu_check.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "gpu_bundle"
OUT = REPO / "bench" / "results" / "gpu_check.json"
PRECISIONS = ("fp32", "bf16", "fp16")
LOSS_RTOL, LOSS_ATOL = 0.1, 0.05  # one iteration from the same weights and batch, against fp32


# -- the bundle ------------------------------------------------------------------------------------
def use_bundle(bundle: Path = BUNDLE) -> tuple[list[str], dict[str, str]]:
    """Unpack the bundle's wheels (once) into ``site`` and put it first on this process's path.
    Returns the wheels' names (empty without a bundle: the environment must have everything) and
    the variables the check's child processes get besides those they inherit: ``PYTHONPATH``
    naming the unpacked wheels and the repository, and ``REIDGEN_DATA`` naming the bundle's data
    unless REIDGEN_DATA is set (`find_data` looks there too)."""
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    names = [w.name for w in wheels]
    child: dict[str, str] = {}
    if wheels:
        site = bundle / "site"
        stamp = site / ".unpacked"
        if not stamp.is_file() or stamp.read_text().split() != names:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as zf:
                    zf.extractall(site)
            stamp.write_text("\n".join(names))
        sys.path.insert(0, str(site))
        child["PYTHONPATH"] = os.pathsep.join((str(site), str(REPO)))
    from reidgen.core.settings import CommonSettings  # pydantic: from the wheels just unpacked

    if (bundle / "data").is_dir() and "data_root" not in CommonSettings.from_env().model_fields_set:
        child["REIDGEN_DATA"] = str(bundle / "data")
    return names, child


def find_data(name: str, bundle_root: str | None = None) -> Path:
    """``--data``: a folder, or a data set's name under ``bundle_root`` (the bundle's data, when
    `use_bundle` chose it), else under the data root (`resolve_data`)."""
    from reidgen.core.paths import resolve_data

    if bundle_root is not None and not Path(name).expanduser().exists() and (Path(bundle_root) / name).is_dir():
        return Path(bundle_root) / name
    return resolve_data(name)


def bundle_data(src: Path, dst: Path, ids: int = 8, per_id: int = 6) -> int:
    """A few dozen images of a Market-style data set copied into ``dst`` (the bundle's data; never
    committed): the first ``per_id`` images of the first ``ids`` identities of each split (half
    as many identities of query and test). Returns the number of images."""
    import shutil

    count = 0
    for folder, n in (("bounding_box_train", ids), ("query", ids // 2), ("bounding_box_test", ids // 2)):
        files = sorted(f for f in (src / folder).iterdir() if not f.name.startswith("-1"))
        keep = sorted({f.name.split("_")[0] for f in files})[:n]
        (dst / folder).mkdir(parents=True, exist_ok=True)
        for pid in keep:
            for f in [f for f in files if f.name.split("_")[0] == pid][:per_id]:
                shutil.copyfile(f, dst / folder / f.name)
                count += 1
    return count


if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # runnable as a plain script from any directory


# -- what is checked -------------------------------------------------------------------------------
class Setup:
    """A small Market-style data set (symlinks), a re-id teacher (also CR-GAN's D_id), one DG-Net
    and one CR-GAN checkpoint, all made in a few steps: the runs' costs matter, not their quality."""

    def __init__(self, root: Path, data: Path, device: str, dry: bool):
        from reidgen.core.market import link_subset
        from trainer.tasks.reid import preset_config, train_reid

        self.root, self.device, self.dry = root, device, dry
        self.source = link_subset(data, root / "source", ids=4)
        self.target = link_subset(data, root / "target_all", ids=8)
        self.teacher = train_reid(preset_config("tiny", data=str(self.source), max_steps=1, workers=0, evaluate=False,
                                                device=device), root / "teacher", progress=False)

    def dgnet_config(self, **kw):
        from trainer.tasks.dgnet import dgnet_preset_config

        base = dict(data=str(self.source), teacher=str(self.teacher), pretrained="none", workers=0,
                    batch_size=2 if self.dry else 8, grid_every=0, checkpoint_every=10**9, quality_every=0,
                    device=self.device, iterations=2)
        if self.dry:
            base["backbone"] = "small_cnn"
        base.update(kw)
        return dgnet_preset_config("small" if self.dry else "paper", **base)

    def crgan_config(self, **kw):
        from dataclasses import replace

        from generator_service.models.crgan_nets import CRGAN_PRESETS
        from trainer.tasks.crgan import crgan_preset_config

        model = CRGAN_PRESETS["small"]
        if self.dry:
            model = replace(model, base_channels=12, dis_channels=16, cam_channels=(8, 16, 32, 32))  # test_crgan.py's
        base = dict(source=str(self.source), target=str(self.target), id_model=str(self.teacher), model=model,
                    masks="geometric", batch_size=2 if self.dry else 8, cam_epochs=1, workers=0, grid_every=0,
                    checkpoint_every=10**9, device=self.device, iterations=2)
        base.update(kw)
        return crgan_preset_config("small", **base)


def build_task(kind: str, cfg, out: Path, precision: str = "auto", resume: Path | None = None):
    """A DG-Net or CR-GAN task ready for ``train_step`` (precision forced, device layout applied,
    the work before the first step done) and its batch stream."""
    task = make_task(kind, cfg, out, resume)
    task.loop.set_precision(precision)
    task.loop.prepare(task)
    task.before_training()
    return task, task.batches()


def make_task(kind: str, cfg, out: Path, resume: Path | None = None):
    from trainer.tasks.crgan import CRGANTrainer
    from trainer.tasks.dgnet import DGNetTrainer

    return (DGNetTrainer if kind == "dgnet" else CRGANTrainer)(cfg, out, resume, progress=False)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def precision_run(kind: str, cfg, root: Path, precision: str, warmup: int, iterations: int) -> dict:
    """One iteration's losses (from the seeded weights and first batch), then seconds per
    iteration and peak memory over ``iterations`` after ``warmup`` more."""
    import torch

    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    task, batches = build_task(kind, cfg, root / f"{kind}-{precision}", precision)
    logs = task.train_step(next(batches))
    for _ in range(warmup):
        task.train_step(next(batches))
    _sync(cfg.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(iterations):
        task.train_step(next(batches))
    _sync(cfg.device)
    seconds = (time.perf_counter() - started) / iterations
    dtype = task.loop.amp_dtype
    result = {"autocast_dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
              "grad_scaler": task.loop.scaler is not None,
              "first_iteration_losses": {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))},
              "seconds_per_iteration": seconds, "iterations": iterations, "warmup": warmup + 1,
              "batch_size": cfg.batch_size,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    del task, batches
    return result


def compare_losses(runs: dict[str, dict]) -> dict:
    """Each precision's first-iteration losses against fp32's: finite, and within tolerance."""
    ref = runs["fp32"]["first_iteration_losses"]
    keys = [k for k in ref if k.startswith(("l_", "d_", "g_", "total")) or "loss" in k]
    out = {"tolerance": f"|x - x_fp32| <= {LOSS_RTOL} * |x_fp32| + {LOSS_ATOL}", "keys": keys}
    for name, run in runs.items():
        losses = run["first_iteration_losses"]
        finite = all(math.isfinite(losses.get(k, math.nan)) for k in keys)
        worst = max((abs(losses[k] - ref[k]) - LOSS_RTOL * abs(ref[k]) - LOSS_ATOL for k in keys if k in losses),
                    default=0.0)
        out[name] = {"finite": finite, "within_tolerance": finite and worst <= 0, "worst_excess": worst}
    return out


def check_precisions(kind: str, cfg, root: Path, precisions=PRECISIONS, warmup: int = 3,
                     iterations: int = 20) -> dict:
    runs = {p: precision_run(kind, cfg, root, p, warmup, iterations) for p in precisions}
    fp32 = runs["fp32"]["seconds_per_iteration"]
    for run in runs.values():
        run["time_over_fp32"] = run["seconds_per_iteration"] / fp32
    return {"runs": runs, "losses_vs_fp32": compare_losses(runs)}


def check_resume(kind: str, make_cfg, root: Path, first: str, second: str) -> dict:
    """One iteration on ``first``, its checkpoint moved to ``second`` (the saved configuration names
    the device, and a resumed run takes its configuration from the checkpoint: the copy's names
    ``second``) and resumed there for one more: both steps logged, losses finite."""
    import torch

    from reidgen.core.checkpoint import run_checkpoint
    from trainer.runlog import read_jsonl

    out = root / f"resume-{kind}-{first}-{second}".replace(":", "")
    make_task(kind, make_cfg(device=first, iterations=1), out).run()
    payload = torch.load(run_checkpoint(out), map_location="cpu", weights_only=True)
    payload["train_config"] = {**payload["train_config"], "device": second, "iterations": 2}
    moved = root / f"{out.name}-moved.pt"
    torch.save(payload, moved)
    make_task(kind, make_cfg(device=second, iterations=2), out, resume=moved).run()
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "event" not in r]
    finite = all(math.isfinite(v) for r in steps for v in r.values() if isinstance(v, float))
    ok = [r["step"] for r in steps] == [1, 2] and finite
    return {"from": first, "to": second, "steps_logged": [r["step"] for r in steps], "finite": finite, "ok": ok}


def check_engine(setup: Setup, dgnet_ckpt: Path, crgan_ckpt: Path, simulate_oom: bool) -> dict:
    """swap and render on the device; then an out-of-memory error on big device batches, which the
    engine must survive by halving them (a memory cap on CUDA; a simulated error with --dry-run)."""
    import torch

    from generator_service.inference import engine as engine_mod
    from generator_service.inference.engine import Engine

    device = setup.device
    swap_engine = Engine.from_checkpoint(dgnet_ckpt, device)
    model = swap_engine.model_for("swap")
    h, w = model.image_size
    x = torch.randn(4, 3, h, w)
    swapped = swap_engine.swap_batch(x, x.flip(0))
    render_engine = Engine.from_checkpoint(crgan_ckpt, device)
    rh, rw = render_engine.model_for("render").image_size
    rendered, context = render_engine.render_batch(torch.randn(4, 3, rh, rw), torch.randn(4, 3, rh, rw),
                                                   torch.rand(4, 1, rh, rw))
    result = {"swap_shape": list(swapped.shape), "swap_finite": bool(torch.isfinite(swapped).all()),
              "render_shape": list(rendered.shape), "render_finite": bool(torch.isfinite(rendered).all())}

    n = 8 if simulate_oom else 1024
    big = torch.randn(n, 3, h, w)
    warnings: list[str] = []
    handler = _ListHandler(warnings)
    engine_mod.log.addHandler(handler)
    ops = engine_mod.KINDS[model.kind].ops
    original = ops["swap"]
    try:
        if simulate_oom:
            def failing(net, items, dev, chunk):
                if chunk > 2:
                    raise torch.cuda.OutOfMemoryError("simulated out of memory")
                return original(net, items, dev, chunk)
            ops["swap"] = failing
        else:
            torch.cuda.synchronize()
            total = torch.cuda.get_device_properties(0).total_memory
            cap = (torch.cuda.memory_reserved() + 256 * 2**20) / total  # what it holds and 256 MiB more
            torch.cuda.set_per_process_memory_fraction(cap)
            result["memory_cap_gib"] = cap * total / 2**30
        swap_engine.max_batch = n
        out = swap_engine.swap_batch(big, big.flip(0))
        result["oom_split"] = {"images": n, "answered": list(out.shape) == [n, 3, h, w],
                               "halvings_logged": sum("halving" in m or "splitting" in m for m in warnings),
                               "simulated": simulate_oom}
    finally:
        ops["swap"] = original
        engine_mod.log.removeHandler(handler)
        if not simulate_oom:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    result["ok"] = (result["swap_finite"] and result["render_finite"] and result["oom_split"]["answered"]
                    and result["oom_split"]["halvings_logged"] > 0)
    return result


class _ListHandler:
    """A logging handler collecting messages (no import of logging's Handler machinery needed)."""

    level = 0

    def __init__(self, sink: list[str]):
        self.sink = sink

    def handle(self, record) -> None:
        self.sink.append(record.getMessage())


def run_child(cmd: list[str], timeout: float, env: dict[str, str], out_json: Path | None = None) -> dict:
    """``cmd`` in the repository with the environment ``env`` (whole: nothing else is inherited)."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    result = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "seconds": time.perf_counter() - started,
              "output_tail": (proc.stdout + proc.stderr)[-3000:], "ok": proc.returncode == 0}
    if out_json is not None and out_json.is_file():
        result["results"] = json.loads(out_json.read_text())
    return result


# -- the run ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every code path once on the CPU, tiny presets")
    ap.add_argument("--out", type=Path, help=f"the JSON (default: {OUT.relative_to(REPO)}; --dry-run: none)")
    ap.add_argument("--data", default="market1501_mini")
    ap.add_argument("--iterations", type=int, help="measured iterations per precision (default 20; dry run 2)")
    ap.add_argument("--warmup", type=int, help="iterations before measuring (default 3; dry run 0)")
    ap.add_argument("--serve-seconds", type=float, default=8.0, help="bench/serve.py's --seconds per load level")
    ap.add_argument("--bundle-data", type=Path, metavar="SRC", help="copy a few dozen images of SRC into "
                    "gpu_bundle/data/<its name> and exit (make gpu-bundle)")
    args = ap.parse_args(argv)
    if args.bundle_data:
        dst = BUNDLE / "data" / args.bundle_data.name
        print(f"{bundle_data(args.bundle_data, dst)} images copied to {dst}")
        return 0
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine, nothing to check (bench/gpu_check.py --dry-run "
              "exercises it on the CPU)")
        return 0
    # The dry run: this environment's own packages and data. The children get this process's
    # environment and the bundle's variables, in an explicit env (this process's is left alone).
    wheels, bundle_vars = ([], {}) if dry else use_bundle()
    child_env = {**os.environ, **bundle_vars}
    from bench.common import machine_info, write_results

    device = "cpu" if dry else "cuda"
    iterations = args.iterations or (2 if dry else 20)
    warmup = args.warmup if args.warmup is not None else (0 if dry else 3)
    t0 = time.perf_counter()
    report: dict = {"dry_run": dry, "device": device,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "bf16_supported": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
                    "bundle_wheels": wheels, "checks": {}}
    failed: list[str] = []

    def limit(seconds: float) -> float:
        """A child's time limit: the GPU run's share of its 8 minutes; the dry run may meet a slow,
        shared CPU (the CI's, a developer's under load): an hour, only against a hang."""
        return 3600.0 if dry else seconds

    def section(name: str, fn):
        started = time.perf_counter()
        print(f"gpu-check: {name}...", flush=True)
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - recorded, and the run goes on to the next check
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            print(result["traceback"], file=sys.stderr)
        result["seconds"] = time.perf_counter() - started
        report["checks"][name] = result
        if result.get("ok") is False:
            failed.append(name)
        return result

    with tempfile.TemporaryDirectory(prefix="reidgen-gpu-check-") as tmp:
        root = Path(tmp)
        data = find_data(args.data, bundle_vars.get("REIDGEN_DATA"))
        setup = Setup(root, data, device, dry)
        dgnet_ckpt = build_and_run(setup, "dgnet", root / "models" / "dgnet")
        crgan_ckpt = build_and_run(setup, "crgan", root / "crgan")

        pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                      "tests/test_cuda_paths.py", "tests/test_gpu_path.py"] + (["--collect-only"] if dry else [])
        section("pytest_cuda", lambda: run_child(pytest_cmd, limit(240), child_env))
        for kind in ("dgnet", "crgan"):
            make = setup.dgnet_config if kind == "dgnet" else setup.crgan_config
            section(f"{kind}_precisions", lambda: _with_ok(check_precisions(kind, make(), root, PRECISIONS, warmup,
                                                                            iterations)))
        cpu = "cpu"
        section("resume_across_devices", lambda: _all_ok({
            f"{kind}_{a}_to_{b}": check_resume(kind, setup.dgnet_config if kind == "dgnet" else setup.crgan_config,
                                               root, a, b)
            for kind in ("dgnet", "crgan") for a, b in ((device, cpu), (cpu, device))}))
        section("engine", lambda: check_engine(setup, dgnet_ckpt, crgan_ckpt, simulate_oom=dry))
        serve_json = root / "serve.json"
        serve_cmd = [sys.executable, "bench/serve.py", "--models", str(root / "models"), "--data", str(setup.source),
                     "--device", device, "--out", str(serve_json)]
        serve_cmd += (["--clients", "1", "--seconds", "0.3", "--max-requests", "2", "--offline-seconds", "0.1",
                       "--batch-sizes", "1", "--threads", "1", "--ready-seconds", str(limit(120))] if dry
                      else ["--seconds", str(args.serve_seconds), "--offline-seconds", "2"])
        section("serve", lambda: run_child(serve_cmd, limit(300), child_env, serve_json))
        generate_json = root / "generate.json"
        generate_cmd = [sys.executable, "bench/generate.py", "--checkpoint", str(dgnet_ckpt), "--data",
                        str(setup.source), "--device", device, "--out", str(generate_json)]
        generate_cmd += (["--records", "8", "--shard-size", "8", "--batch", "4", "--raw-seconds", "0.1",
                          "--rounds", "1", "--threads", "1"] if dry
                         else ["--records", "320", "--raw-seconds", "5", "--rounds", "1"])
        section("generate", lambda: run_child(generate_cmd, limit(240), child_env, generate_json))

    report["total_seconds"] = time.perf_counter() - t0
    report["failed"] = failed
    if dry:
        if args.out:
            args.out.write_text(json.dumps(report, indent=2, default=str))
    else:
        report["machine"] = machine_info(device)
        write_results("gpu_check", report, path=args.out or OUT)
    for line in summary(report):
        print(line)
    print(f"gpu-check: {'dry run ' if dry else ''}done in {report['total_seconds']:.0f} s; "
          f"{'failed: ' + ', '.join(failed) if failed else 'every check passed'}")
    return 1 if failed else 0


def summary(report: dict) -> list[str]:
    """The figures to read at a glance (the device tool returns only the output's tail)."""
    checks, lines = report["checks"], []
    for kind in ("dgnet", "crgan"):
        for name, run in checks.get(f"{kind}_precisions", {}).get("runs", {}).items():
            ok = checks[f"{kind}_precisions"]["losses_vs_fp32"].get(name, {})
            peak = run["peak_memory_gib"]
            lines.append(f"  {kind} {name}: {run['seconds_per_iteration']:.4f} s/it ({run['time_over_fp32']:.2f}x fp32)"
                         f", peak {'-' if peak is None else f'{peak:.2f} GiB'}, batch {run['batch_size']}, losses "
                         f"finite {ok.get('finite')}, within tolerance of fp32 {ok.get('within_tolerance')}")
    targets = checks.get("serve", {}).get("results", {}).get("targets")
    if targets:
        lines.append(f"  serve at {targets['clients']} clients: {targets['batched_over_offline']:.2f}x offline "
                     f"(>= 0.8), {targets['batched_over_unbatched']:.2f}x unbatched (>= 3)")
    for name, r in checks.get("generate", {}).get("results", {}).get("results", {}).items():
        lines.append(f"  generate {name}: job {r['job_images_per_s']:.1f} img/s = {r['job_over_raw']:.3f}x raw "
                     "(>= 0.85)")
    for name, check in checks.items():
        lines.append(f"  {name}: {'ok' if check.get('ok', True) else 'FAILED'} in {check['seconds']:.0f} s")
    return lines


def build_and_run(setup: Setup, kind: str, out: Path) -> Path:
    """A two-iteration run on the device: the checkpoint the engine, service and job benchmarks load."""
    from reidgen.core.checkpoint import run_checkpoint

    cfg = setup.dgnet_config() if kind == "dgnet" else setup.crgan_config()
    make_task(kind, cfg, out).run()
    return run_checkpoint(out)


def _with_ok(result: dict) -> dict:
    losses = result["losses_vs_fp32"]
    result["ok"] = all(losses[p]["finite"] for p in PRECISIONS if p in losses)
    return result


def _all_ok(results: dict) -> dict:
    return {**results, "ok": all(r["ok"] for r in results.values())}


if __name__ == "__main__":
    sys.exit(main())
