"""Profile: where one DG-Net training iteration spends its time, by network and by pass.

One iteration of a preset (paper by default) is run under ``torch.profiler`` after warm-up, with
every loss on (feeding from the first step). Each operator is charged to the network that ran it:
a forward operator to the network whose ``forward`` encloses it, a backward operator (the
autograd engine's ``evaluate_function`` events) to the network whose forward operator created its
autograd node (same sequence number), so double backward (R1) is charged to D. The iteration's
phases (the shared generator forward, D's losses and step, E_a/E_s/G's losses and step) are
timed the same way. Prints two tables and writes ``bench/results/<--results>.json``.

    python bench/dgnet_profile.py [--preset paper] [--data market1501_mini] [--iters 1] [--warmup 2]
                                  [--precision fp32|bf16] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_results  # noqa: E402

BACKWARD = "autograd::engine::evaluate_function: "
PHASES = ("generate", "d_losses", "g_losses", "update")


def networks(trainer) -> dict[str, object]:
    """The networks one iteration runs, by the name the tables use."""
    nets = {"E_a": trainer.net.ea, "E_s": trainer.net.es, "G": trainer.net.dec, "D": trainer.net.dis,
            "teacher": trainer.teacher.net}
    if trainer.perceptual is not None or trainer.style is not None:
        nets["frozen pyramid"] = (trainer.perceptual or trainer.style).features
    return nets


def label_forwards(trainer) -> list:
    """Forward hooks that open a profiler range named ``net:<name>`` around each network's forward."""
    import torch

    handles = []
    for name, module in networks(trainer).items():
        ranges: list = []

        def enter(_module, _args, name=name, ranges=ranges):
            ranges.append(torch.profiler.record_function(f"net:{name}").__enter__())

        def leave(_module, _args, _out, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def label_phases(trainer) -> None:
    """Wrap the iteration's phases (methods of the trainer and its loop) in profiler ranges."""
    import torch

    def wrapped(owner, method: str, label: str) -> None:
        inner = getattr(owner, method)

        def run(*args, **kwargs):
            with torch.profiler.record_function(f"phase:{label}"):
                return inner(*args, **kwargs)
        setattr(owner, method, run)

    for method in ("generate", "d_losses", "g_losses"):
        wrapped(trainer, method, method)
    wrapped(trainer.loop, "update", "update")


def attribute(events) -> tuple[dict, dict]:
    """(milliseconds by (network, pass), milliseconds by phase) from the profiler's events.

    Events are visited in start order, so a range is known before the operators inside it. An
    operator takes the innermost ``net:`` range above it, else the network of the backward
    event above it (operators of a backward pass, e.g. those a double backward differentiates)."""
    owner: dict[int, str] = {}  # event id -> network
    by_seq: dict[int, str] = {}  # autograd sequence number -> network of the forward operator
    table: dict[tuple[str, str], float] = defaultdict(float)
    phases: dict[str, float] = defaultdict(float)
    for ev in sorted(events, key=lambda e: e.time_range.start):
        parent = ev.cpu_parent
        inherited = owner.get(id(parent)) if parent is not None else None
        if ev.name.startswith("net:"):
            owner[id(ev)] = ev.name[4:]
            if inherited is None:  # a network's forward inside another's is already counted there
                table[ev.name[4:], "forward"] += ev.cpu_time_total / 1e3
            continue
        if ev.name.startswith("phase:"):
            if not any(p.name.startswith("phase:") for p in ancestors(ev)):
                phases[ev.name[6:]] += ev.cpu_time_total / 1e3
            continue
        if ev.name.startswith(BACKWARD):
            net = by_seq.get(ev.sequence_nr, "other")
            owner[id(ev)] = net
            if not any(p.name.startswith(BACKWARD) for p in ancestors(ev)):
                table[net, "backward"] += ev.cpu_time_total / 1e3
            continue
        if inherited is not None:
            owner[id(ev)] = inherited
            if ev.sequence_nr >= 0:
                by_seq.setdefault(ev.sequence_nr, inherited)
    return dict(table), dict(phases)


def ancestors(ev):
    parent = ev.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--data", default="market1501_mini")
    ap.add_argument("--iters", type=int, default=1, help="profiled iterations (the tables are per iteration)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--batch-size", type=int, default=0, help="images per loader (0: the preset's)")
    ap.add_argument("--teacher-preset", default="tiny",
                    help="re-id preset of the teacher (its architecture is what costs: the demo's is small)")
    ap.add_argument("--results", default="", help="name of the JSON under bench/results/ "
                                                  "(default dgnet_profile_<preset>_<precision>)")
    args = ap.parse_args()

    import time

    import torch

    from reidgen.core.paths import resolve_data
    from trainer.tasks.dgnet import DGNetTrainer, dgnet_preset_config
    from trainer.tasks.reid import preset_config, train_reid

    if args.threads:
        torch.set_num_threads(args.threads)
    data = str(resolve_data(args.data))
    bf16 = args.precision == "bf16"
    with tempfile.TemporaryDirectory() as tmp:
        # A teacher trained one step: its weights do not change the cost of an iteration, only its
        # architecture does (the demo's and the presets' teachers are the small preset).
        teacher = train_reid(preset_config(args.teacher_preset, data=data, max_steps=1, workers=0, evaluate=False),
                             Path(tmp) / "teacher", progress=False)
        cfg = dgnet_preset_config(args.preset, data=data, teacher=str(teacher), pretrained="none", workers=0,
                                  feed_start=0.0, ramp=0.01, grid_every=0, quality_every=0, ea_from_teacher=False,
                                  iterations=10**6, amp=bf16, cpu_bf16=bf16,
                                  **({"batch_size": args.batch_size} if args.batch_size else {}))
        trainer = DGNetTrainer(cfg, Path(tmp) / "run", progress=False)
        trainer.loop.prepare(trainer)  # the layout training runs in (channels_last on the CPU)
        batches = trainer.batches()
        for _ in range(args.warmup):
            trainer.train_step(next(batches))
            trainer.step += 1
        handles = label_forwards(trainer)
        label_phases(trainer)
        feed = [next(batches) for _ in range(args.iters)]
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for batch in feed:
                trainer.train_step(batch)
                trainer.step += 1
        wall = (time.perf_counter() - start) / args.iters
        for h in handles:
            h.remove()
        table, phases = attribute(prof.events())

    per_it = {f"{net}/{kind}": ms / args.iters for (net, kind), ms in sorted(table.items())}
    phases = {k: v / args.iters for k, v in phases.items()}
    iteration_ms = sum(phases.values())
    print(f"one {args.preset}-preset iteration, {args.precision}, {torch.get_num_threads()} thread(s), batch "
          f"{cfg.batch_size} per loader: {iteration_ms:.0f} ms in the phases (profiled wall {wall * 1e3:.0f} ms)")
    print(f"{'network':<16} {'forward ms':>11} {'backward ms':>12} {'share':>7}")
    for net in sorted({n for n, _ in table}, key=lambda n: -sum(v for (m, _), v in table.items() if m == n)):
        fwd, bwd = table.get((net, "forward"), 0.0) / args.iters, table.get((net, "backward"), 0.0) / args.iters
        print(f"{net:<16} {fwd:11.0f} {bwd:12.0f} {100 * (fwd + bwd) / iteration_ms:6.1f}%")
    print(f"{'phase':<16} {'ms':>11} {'share':>20}")
    for phase in PHASES:
        ms = phases.get(phase, 0.0)
        print(f"{phase:<16} {ms:11.0f} {100 * ms / iteration_ms:19.1f}%")
    write_results(args.results or f"dgnet_profile_{args.preset}_{args.precision}", {
        "device": "cpu", "data": args.data, "preset": args.preset, "precision": args.precision,
        "batch_per_loader": cfg.batch_size, "teacher_preset": args.teacher_preset,
        "iterations_profiled": args.iters, "warmup": args.warmup,
        "iteration_ms": iteration_ms, "profiled_wall_ms": wall * 1e3, "ms_by_network_and_pass": per_it,
        "ms_by_phase": phases,
        "command": f"python bench/dgnet_profile.py --preset {args.preset} --data {args.data} --precision "
                   f"{args.precision} --threads {args.threads} --iters {args.iters} --batch-size {cfg.batch_size} "
                   f"--teacher-preset {args.teacher_preset}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
