"""The documentation's results, generated from bench/results/*.json.

    python bench/results_pages.py            # writes docs/results/*.md and the marked blocks
    python bench/results_pages.py --check    # writes nothing; exit 1 naming what differs

Two kinds of output:

- one page per results file, docs/results/NAME.md, and docs/results/index.md listing them: the
  conditions of the measurement (cores, threads, load, device, data, seed), the command that
  produced the file, and its tables;
- marked blocks inside hand-written pages (README.md and docs/**/*.md): the text between
  ``<!-- results: BLOCK -->`` and ``<!-- /results -->`` is replaced by the block BLOCK of this
  script, so that the figures a page quotes in a table come from the JSON too.

Nothing here is typed by hand but labels and the commands of results files that do not record
their own. tests/test_results_pages.py fails when a committed page differs from its JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs"
OUT = DOCS / "results"
GENERATOR = "python bench/results_pages.py"

# The commands that wrote the results files that do not record their own (as the README gave them).
COMMANDS: dict[str, list[str]] = {
    "eval_speed": ["python bench/eval_speed.py"],
    "dgnet_speed": ["python bench/dgnet_speed.py --threads 2"],
    "dgnet_speed_arms": [
        "python bench/dgnet_speed.py --arms --threads 1 --precisions fp32 --iters 6 --warmup 2 "
        "--results dgnet_speed_arms"
    ],
    "dgnet_cpu_run": [
        "reidgen train-reid --data market1501 --out runs/teacher_full --epochs 6 --milestones 5",
        "OMP_NUM_THREADS=1 taskset -c 0 reidgen train-dgnet --data market1501 "
        "--teacher runs/teacher_full/checkpoints/last.pt --out runs/dgnet_cpu_lr --iterations 1450 "
        "--checkpoint-every 145 --keep-checkpoints --grid-every 145 --quality-every 50 --workers 0",
        "reidgen train-reid --data market1501 --init runs/teacher_full/checkpoints/last.pt "
        "--out runs/teacher_control --epochs 2 --lr 0.02 --backbone-lr-mult 0.1 --warmup-epochs 0 --milestones 1.8",
        "python bench/dgnet_cpu_run.py --run runs/dgnet_cpu_lr --n 500 --control runs/teacher_control",
    ],
    "dgnet_cpu_run_id_cross_1": [
        "OMP_NUM_THREADS=1 taskset -c 0 reidgen train-dgnet --data market1501 "
        "--teacher runs/teacher_full/checkpoints/last.pt --out runs/dgnet_cpu_id1 --iterations 1450 --id-cross 1.0 "
        "--checkpoint-every 145 --keep-checkpoints --grid-every 145 --quality-every 50 --workers 0",
        "python bench/dgnet_cpu_run.py --run runs/dgnet_cpu_id1 --n 500 --control runs/teacher_control "
        "--results dgnet_cpu_run_id_cross_1",
    ],
    # Run A, as its train_config records it (milestones 0.6 0.9, the small preset's default then);
    # the results file was kept under this name when run B became dgnet_cpu_run.json.
    "dgnet_cpu_run_milestones_0.6_0.9": [
        "OMP_NUM_THREADS=1 reidgen train-dgnet --data market1501 --teacher runs/teacher_full/checkpoints/last.pt "
        "--out runs/dgnet_cpu --iterations 1450 --milestones 0.6 0.9 --checkpoint-every 145 --keep-checkpoints "
        "--grid-every 145 --quality-every 50 --workers 0",
        "python bench/dgnet_cpu_run.py --run runs/dgnet_cpu --n 500",
    ],
    "dgnet_fast": [
        "reidgen train-reid --data market1501 --out runs/teacher_full --epochs 6 --milestones 5 --workers 0",
        "reidgen train-reid --data market1501 --out runs/judge_full --epochs 6 --milestones 5 --seed 7 "
        "--workers 0 --no-eval",
        "T=runs/teacher_full/checkpoints/last.pt J=runs/judge_full/checkpoints/last.pt",
        "OMP_NUM_THREADS=1 taskset -c 1 reidgen train-dgnet --data market1501 --teacher $T --judge $J "
        "--out runs/arms/small --iterations 300 --checkpoint-every 150 --keep-checkpoints --grid-every 75 "
        "--quality-every 30 --workers 0",
        "OMP_NUM_THREADS=1 taskset -c 0 reidgen train-dgnet --preset fast --data market1501 --teacher $T "
        "--judge $J --out runs/dgnet_fast --iterations 500 --checkpoint-every 100 --keep-checkpoints "
        "--grid-every 50 --quality-every 25 --workers 0",
        "python bench/dgnet_fast.py --arms runs/arms --speed bench/results/dgnet_speed_arms.json --judge $J "
        "--long runs/dgnet_fast --n 500",
    ],
    "dgnet_id_ramp": ["python bench/dgnet_id_ramp.py"],
    "export_size": ["python bench/export_size.py"],
    "generate": ["python bench/generate.py"],
    "loader": ["python bench/loader.py"],
    "masks_speed": ["python bench/masks_speed.py"],
    "crgan_speed": ["python bench/crgan_speed.py"],
    "serve": ["python bench/serve.py"],
}

TITLES = {
    "eval_speed": "Evaluation speed: ranking and metrics of full Market-1501",
    "dgnet_speed": "DG-Net training speed, both presets, fp32 and bf16",
    "dgnet_speed_arms": "DG-Net: each lever's cost per iteration",
    "dgnet_speed_layout": "DG-Net on the CPU: channels_last against contiguous NCHW, small and fast settings",
    "dgnet_speed_fast": "DG-Net fast preset on two threads: images per loader, fp32 and bf16",
    "load_head": "Load on the head: job submissions, status polls and Redis memory with 16 workers",
    "dgnet_cpu_run": "DG-Net small preset, 1,450 iterations on one core (run B)",
    "dgnet_cpu_run_id_cross_1": "DG-Net small preset with λ_id = 1.0 (run C)",
    "dgnet_cpu_run_milestones_0.6_0.9": "DG-Net small preset with the reference's lr drops (run A)",
    "dgnet_fast": "DG-Net in one CPU hour: the arms and the fast preset",
    "dgnet_fast_mini": "DG-Net levers, second round: style, MLP and G/D learning rates (market1501_mini)",
    "dgnet_fast_mini_round3": "DG-Net levers, third round: how the appearance code reaches G (market1501_mini)",
    "dgnet_profile_paper_fp32": "DG-Net paper preset: one CPU iteration profiled, fp32",
    "dgnet_profile_paper_bf16": "DG-Net paper preset: one CPU iteration profiled, bf16 autocast",
    "dgnet_profile_fast_fp32": "DG-Net fast preset, 6 per loader, small-preset teacher: one CPU iteration profiled",
    "appearance_colour_probe": "How much of each body stripe's colour the appearance code holds (ridge probe)",
    "dgnet_vs_reference": "DG-Net paper preset against the reference code, side by side on the CPU, fp32",
    "dgnet_vs_reference_bf16": "DG-Net paper preset in bf16 autocast against the reference code (fp32), side by side",
    "dgnet_id_ramp": "DG-Net: L_id^c from the start against ramped in",
    "export_size": "DG-Net checkpoints: full against the inference export",
    "generate": "Batch generation: shard jobs against the raw generator",
    "loader": "Training on shards: loader speed and data wait",
    "masks_speed": "Person masks: speed of each provider",
    "crgan_speed": "CR-GAN training speed",
    "crgan_quality": "CR-GAN on the full sets: quality and re-id over seeds",
    "serve": "The generator service: throughput and latency",
}

# Row labels of quality figures, in the order tables show them.
FIGURES = [
    ("identity_consistency", "identity consistency (teacher)"),
    ("identity_consistency_judge", "identity consistency (judge)"),
    ("structure_identity_share", "structure provider's share (teacher)"),
    ("structure_identity_share_judge", "structure provider's share (judge)"),
    ("reconstruction_identity", "reconstruction identity (teacher)"),
    ("reconstruction_identity_judge", "reconstruction identity (judge)"),
    ("real_identity", "real images named (teacher)"),
    ("real_identity_judge", "real images named (judge)"),
    ("reconstruction_ssim", "reconstruction SSIM"),
    ("reconstruction_l1", "reconstruction L1"),
    ("fid", "FID"),
    ("fid_real", "FID floor (real vs real)"),
    ("kid", "KID"),
    ("kid_real", "KID floor"),
    ("diversity_ssim", "diversity SSIM (lower = more diverse)"),
    ("diversity_ssim_real", "diversity SSIM of real images"),
    ("teacher_fd", "teacher-feature Fréchet distance"),
    ("own_target_match", "own-target match"),
    ("own_target_match_chance", "own-target match by chance"),
    ("diversity_inception", "diversity across one source's targets (Inception)"),
    ("diversity_inception_real", "the same for the targets"),
    ("diversity_inception_set", "diversity over pairs of different sources"),
    ("diversity_inception_set_real", "the same for the targets"),
    ("identity_preservation", "identity preservation (D_id)"),
    ("identity_real", "D_id on the real sources"),
    ("foreground_l1", "foreground L1"),
    ("background_l1_own", "background L1 to its own target"),
    ("background_l1_other", "background L1 to the other targets"),
    ("background_l1_source", "background L1 to the source's background"),
    ("spread_l1", "spread off the person, L1"),
    ("spread_l1_targets", "the same for the targets"),
    ("context_mask_person", "context mask on the person"),
    ("context_mask_background", "context mask off the person"),
    ("step", "iteration"),
    ("n", "images measured (n)"),
    ("cpu_minutes", "CPU-minutes"),
]

LABELS = dict(FIGURES)


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def fmt(value, digits: int = 3) -> str:
    """A figure as the tables print it: '—' for a missing one, thousands separated."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.1f}"
        if abs(value) >= 10:
            return f"{value:.2f}"
        if 0 < abs(value) < 0.001:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def figures_table(columns: list[tuple[str, dict]]) -> str:
    """Rows: the quality figures any column has; columns: labelled measurements."""
    rows = []
    for key, label in FIGURES:
        if any(isinstance(col.get(key), (int, float)) for _, col in columns):
            rows.append([label] + [col.get(key) for _, col in columns])
    return table(["figure"] + [name for name, _ in columns], rows)


def cores(doc: dict) -> int | None:
    machine = doc.get("machine") or {}
    return machine.get("cpus", machine.get("cpu_count"))


def conditions(doc: dict) -> str:
    """The conditions of a measurement: cores, threads, load, device, data, seed."""
    machine = doc.get("machine") or {}
    parts = []
    if cores(doc) is not None:
        parts.append(f"{cores(doc)} CPU cores")
    threads = machine.get("torch_threads", doc.get("torch_threads"))
    if threads is not None:
        parts.append(f"{threads} torch thread{'s' if threads != 1 else ''}")
    load_avg = machine.get("load_average_1_5_15min")
    if load_avg:
        parts.append("load average " + " / ".join(f"{x:.2f}" for x in load_avg) + " (1, 5, 15 min)")
    elif doc.get("load_average_1min") is not None:
        parts.append(f"load average {doc['load_average_1min']:.2f} (1 min)")
    gpu = machine.get("gpu")
    parts.append(f"GPU {gpu}" if gpu else "no GPU")
    if machine.get("torch_version"):
        parts.append(f"torch {machine['torch_version']}")
    data = doc.get("data") or doc.get("source")
    if data:
        parts.append(f"data `{data}`" + (f" → `{doc['target']}`" if doc.get("target") else ""))
    seed = doc.get("seed", (doc.get("train_config") or {}).get("seed"))
    if seed is not None:
        parts.append(f"seed {seed}")
    return "; ".join(parts)


def commands(name: str, doc: dict) -> list[str]:
    recorded = doc.get("commands", [doc["command"]] if isinstance(doc.get("command"), str) else None)
    lines = [c for c in recorded if not c.startswith("#")] if isinstance(recorded, list) else []
    if not lines or any(c.startswith("see ") for c in lines):
        lines = COMMANDS.get(name, [])
    return lines


def page(name: str, body: str) -> str:
    doc = load(name)
    cmd = "\n".join(commands(name, doc))
    head = [
        f"# {TITLES.get(name, name)}",
        "",
        f"<!-- Generated by `{GENERATOR}` from bench/results/{name}.json: edit the JSON or the script, "
        "not this page. -->",
        "",
        f"Results file `bench/results/{name}.json`, written {doc.get('timestamp', '—')}.",
        "",
        f"**Conditions:** {conditions(doc)}.",
        "",
        "**Command:**",
        "",
        "```bash",
        cmd or "# not recorded",
        "```",
        "",
        "",
    ]
    return "\n".join(head) + body.rstrip() + "\n"


# -- the pages ----------------------------------------------------------------------------------
def eval_speed(d: dict) -> str:
    return table(
        ["queries × gallery", "vectorised (median s)", "per-query reference (s, extrapolated)", "speed-up",
         "max difference on the subset"],
        [[f"{d['num_queries']:,} × {d['num_gallery']:,}", d["fast_seconds_median"],
          d["reference_seconds_extrapolated"], f"{d['speedup']:.1f}×", d["max_abs_diff_on_subset"]]],
    ) + f"\n\nThe reference was timed on {d['reference_queries_measured']} queries ({d['reference_extrapolation']}).\n"


def dgnet_speed(d: dict) -> str:
    rows = []
    for r in d["results"]:
        rows.append([r.get("arm") or r["preset"], r["precision"], r.get("layout", "contiguous"),
                     r["batch_per_loader"], "×".join(map(str, r["image_size"])), r["backbone"], r["torch_threads"],
                     f"{r['seconds_per_iteration']:.2f}", f"{r['peak_rss_mb'] / 1024:.1f}",
                     f"{r['cost_over_small']:.2f}×" if "cost_over_small" in r else "—"])
    out = table(["preset / arm", "precision", "layout", "batch", "image", "E_a", "threads", "s/it", "peak RSS GB",
                 "cost over small"], rows)
    if d.get("bf16_over_fp32_speed"):
        out += "\n\nbf16 autocast speed-up over fp32: " + ", ".join(
            f"{k} {v:.2f}×" for k, v in d["bf16_over_fp32_speed"].items()) + ".\n"
    if d.get("default_layout_over_contiguous_speed"):
        out += "\n\nchannels_last (the default layout on the CPU) over contiguous NCHW: " + ", ".join(
            f"{k} {v:.2f}×" for k, v in d["default_layout_over_contiguous_speed"].items()) + ".\n"
    if d.get("note"):
        out += f"\n{d['note']}\n"
    return out


def dgnet_profile(d: dict) -> str:
    """One profiled iteration: milliseconds by network and pass, then by phase."""
    by = d["ms_by_network_and_pass"]
    total = d["iteration_ms"]
    def ms(net: str, kind: str) -> float:
        return by.get(f"{net}/{kind}", 0.0)

    nets = sorted({k.split("/")[0] for k in by}, key=lambda n: -(ms(n, "forward") + ms(n, "backward")))
    rows = [[n, f"{ms(n, 'forward'):.0f}", f"{ms(n, 'backward'):.0f}",
             f"{100 * (ms(n, 'forward') + ms(n, 'backward')) / total:.1f} %"] for n in nets]
    out = (f"{d['preset']} preset, {d['precision']}, batch {d['batch_per_loader']} per loader, "
           f"{d['iterations_profiled']} iteration(s) profiled after {d['warmup']} of warm-up: "
           f"{total:.0f} ms per iteration in its phases.\n\n")
    out += table(["network", "forward ms", "backward ms", "share"], rows) + "\n\n"
    out += table(["phase", "ms", "share"], [[k, f"{v:.0f}", f"{100 * v / total:.1f} %"]
                                           for k, v in d["ms_by_phase"].items()])
    return out + "\n"


def dgnet_vs_reference(d: dict) -> str:
    """Seconds per iteration of the reference code and of the paper preset, on the same batches."""
    source = d["reference_source"]
    return table(["implementation", "precision", "s/it", "threads"], [
        [f"reference ({source['repository']}@{source['commit'][:8]})", "fp32",
         f"{d['reference_seconds_per_iteration']:.2f}", d["torch_threads"]],
        ["reidgen, paper preset", d["project"].get("precision", "fp32"), f"{d['project_seconds_per_iteration']:.2f}",
         d["torch_threads"]],
    ]) + (f"\n\nreidgen / reference: **{d['project_over_reference']:.3f}×** ({d['iterations']} measured iterations "
          f"after {d['warmup']} of warm-up, batch {d['batch_per_loader']} per loader, "
          f"{'with' if d['reference_cycle'] else 'without'} the reference's cycle loss).\n")


def dgnet_cpu_run(d: dict) -> str:
    cols = [(f"{part} ({d[part]['step']:,})", d[part]) for part in ("start", "middle", "final") if part in d]
    out = f"{d['iterations']:,} iterations, {d['train_hours']:.2f} h of training; quality at n = {d['quality_n']}.\n\n"
    out += figures_table(cols) + "\n\n"
    reid = d.get("reid") or {}
    if reid:
        out += "Re-id on the full query/gallery, flip-averaged features:\n\n" + table(
            ["model", "Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"],
            [[k, pct(v.get("rank1")), pct(v.get("rank5")), pct(v.get("rank10")), pct(v.get("mAP")),
              pct(v.get("mINP"))] for k, v in reid.items()]) + "\n\n"
    out += targets(d.get("targets_met"))
    return out


def targets(met: dict | None) -> str:
    if not met:
        return ""
    return "Targets:\n\n" + "\n".join(f"- `{k}`: {'met' if v else '**missed**'}" for k, v in met.items()) + "\n"


def fast_columns(d: dict) -> list[tuple[str, dict]]:
    cols = []
    for arm, a in d.get("arms", {}).items():
        for s in a.get("snapshots", []):
            cols.append((f"{arm}, {s['step']} it", s))
    long = d.get("long") or {}
    for s in long.get("snapshots", []):
        cols.append((f"fast, {s['step']} it", s))
    return cols


def dgnet_fast(d: dict) -> str:
    out = f"Judge: `{d.get('judge')}`.\n\n" + figures_table(fast_columns(d)) + "\n\n"
    long = d.get("long") or {}
    if long.get("reid"):
        out += "Re-id of the long run's E_a (full query/gallery):\n\n" + table(
            ["model", "Rank-1", "mAP", "mINP"],
            [[k, pct(v.get("rank1")), pct(v.get("mAP")), pct(v.get("mINP"))] for k, v in long["reid"].items()]
        ) + "\n\n"
    out += targets(long.get("targets_met"))
    curves = [(arm, a.get("curve", [])) for arm, a in d.get("arms", {}).items()] + [("fast (long run)",
                                                                                    long.get("curve", []))]
    for arm, curve in curves:
        if curve:
            keys = [k for k in curve[0] if k != "step"]
            out += f"\nCurve of {arm} (the 64 images logged in training):\n\n" + table(
                ["iteration"] + [LABELS.get(k, k) for k in keys],
                [[p["step"]] + [p.get(k) for k in keys] for p in curve]) + "\n"
    return out


def dgnet_id_ramp(d: dict) -> str:
    series = d["l_img1_by_sixth"]
    n = len(next(iter(series.values())))
    return f"L_img1 (reconstruction L1), mean over each sixth of a {d['iterations']}-iteration run:\n\n" + table(
        ["L_id^c"] + [f"sixth {i + 1}" for i in range(n)], [[k] + v for k, v in series.items()]) + "\n"


def export_size(d: dict) -> str:
    rows = [[preset, f"{r['size_MiB']['full']:.1f} MiB", f"{r['size_MiB']['export']:.1f} MiB",
             f"{r['load_s_median']['full']:.2f} s", f"{r['load_s_median']['export']:.2f} s"]
            for preset, r in d["results"].items()]
    return (f"{d['classes']} classes; load = `DGNet.from_checkpoint`, median of {d['repeats']}.\n\n"
            + table(["preset", "full checkpoint", "export", "load, full", "load, export"], rows) + "\n")


def generate(d: dict) -> str:
    rows = []
    for name, r in d["results"].items():
        rows.append([name.replace("_", " "), f"{r['raw_images_per_s']:.1f}", f"{r['job_images_per_s']:.1f}",
                     f"{r['job_over_raw']:.2f}", f"{r['overlapped_job_images_per_s']:.1f}",
                     f"{r['overlapped_job_over_raw']:.2f}"])
    return (f"Preset {d['preset']}, batch {d['batch_size']}, {d['encoding']} records, median of {d['rounds']} "
            f"rounds; target job/raw ≥ {d['target_job_over_raw']}.\n\n"
            + table(["job", "raw img/s", "job img/s (in turn)", "job / raw", "job img/s (threads)",
                     "job / raw (threads)"], rows) + "\n")


def loader(d: dict) -> str:
    li, t = d["loader_images_per_s"], d["training"]
    return (f"{d['records']} records of {d['ids']} identities, batch {d['batch_size']}, {d['workers']} DataLoader "
            "workers.\n\n" + table(["what", "figure"], [
                ["shard data set, img/s", f"{li['shards']:.0f}"],
                ["the same images as JPEG files, img/s", f"{li['jpeg_files']:.0f}"],
                ["shards / files", f"{li['shards_over_files']:.2f}"],
                [f"`train-reid --shards` ({t['preset']} preset): seconds a step", f"{t['seconds_per_step']:.2f}"],
                ["share of a step waiting for data", f"{100 * t['data_wait_share']:.1f} % (target ≤ "
                 f"{100 * t['target_data_wait_share']:.0f} %)"],
            ]) + "\n")


def masks_speed(d: dict) -> str:
    rows = [[r["provider"], "—" if r["threads"] is None else str(r["threads"]), f"{r['masks_per_second']:,.1f}",
             f"{r['mean_person_share']:.2f}"] for r in d["results"]]
    return f"{d['results'][0]['images']} crops.\n\n" + table(
        ["provider", "threads", "masks / s", "mean person share of a crop"], rows) + "\n"


def crgan_speed(d: dict) -> str:
    rows = [[r["preset"], "×".join(map(str, r["image_size"])), r["batch_size"], r["torch_threads"],
             f"{r['iterations_per_second_first_half']:.3f}", f"{r['iterations_per_second_second_half']:.3f}",
             f"{r['peak_rss_mb'] / 1024:.1f}"] for r in d["results"]]
    return table(["preset", "image", "batch", "threads", "it/s, first half (G once)", "it/s, second half (G twice)",
                  "peak RSS GB"], rows) + "\n"


def crgan_quality(d: dict) -> str:
    cols = [(f"long run, {d['long_run']['step']} it", d["long_run"])]
    cols += [(f"{c.get('con_loss', '')} {c['step']} it", c) for c in d.get("intermediate", []) + d.get("compared", [])]
    ab = d.get("ablation") or {}
    if "dual_same_budget" in ab:
        cols.append((f"dual, {ab['dual_same_budget']['step']} it", ab["dual_same_budget"]))
    if "no_dual_condition" in ab:
        cols.append((f"no dual condition, {ab['no_dual_condition']['step']} it", ab["no_dual_condition"]))
    out = figures_table(cols) + "\n\n"
    if ab.get("carried_over_from"):
        out += f"The ablation's columns are carried over from {ab['carried_over_from']}.\n\n"
    out += f"{d.get('diversity_note', '')}\n\n"
    return out + crgan_reid(d)


def crgan_reid(d: dict) -> str:
    out = ""
    reid = d.get("reid") or {}
    if reid:
        def spread(mean, std):
            return f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")
        out += "Re-id on the target, Rank-1 and mAP in percent, mean ± sample standard deviation over seeds:\n\n"
        out += table(["model", "seeds", "Rank-1", "mAP", "per seed (Rank-1 / mAP)"], [
            [k, r["seeds"], spread(r["rank1_mean"], r["rank1_std"]), spread(r["map_mean"], r["map_std"]),
             ", ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(r["rank1"], r["map"]))] for k, r in reid.items()]) + "\n"
    return out


def serve(d: dict) -> str:
    rows = []
    batched, unbatched = d["service"]["batched"], {r["clients"]: r for r in d["service"]["unbatched"]}
    for r in batched:
        u = unbatched.get(r["clients"], {})
        rows.append([r["clients"], f"{r['images_per_second']:.1f}",
                     f"{r['latency_ms_p50']:.0f} / {r['latency_ms_p99']:.0f}",
                     f"{u.get('images_per_second', 0):.1f}",
                     f"{u.get('latency_ms_p50', 0):.0f} / {u.get('latency_ms_p99', 0):.0f}"])
    off, t = d["offline"], d["targets"]
    out = f"{d['request']}; {d['models']}.\n\n" + table(
        ["clients", "batched img/s", "p50 / p99 ms", "unbatched img/s", "p50 / p99 ms"], rows) + "\n\n"
    out += "The engine offline, images per second by batch:\n\n" + table(
        ["batch"] + list(off["images_per_second_by_batch"]),
        [["img/s"] + [f"{v:.1f}" for v in off["images_per_second_by_batch"].values()]]) + "\n\n"
    out += table(["at clients = " + str(t["clients"]), "measured", "target"], [
        ["batched service / offline engine", f"{t['batched_over_offline']:.2f}",
         f"≥ {t['batched_over_offline_target']}"],
        ["batched / unbatched service", f"{t['batched_over_unbatched']:.2f}",
         f"≥ {t['batched_over_unbatched_target']}"],
    ]) + f"\n\nTargets {'met' if t['met'] else '**missed**'}.\n"
    return out


PAGES: dict[str, Callable[[dict], str]] = {
    "dgnet_fast": dgnet_fast,
    "dgnet_fast_mini": dgnet_fast,
    "dgnet_fast_mini_round3": dgnet_fast,
    "dgnet_profile_paper_fp32": dgnet_profile,
    "dgnet_vs_reference": dgnet_vs_reference,
    "dgnet_vs_reference_bf16": dgnet_vs_reference,
    "dgnet_profile_paper_bf16": dgnet_profile,
    "dgnet_profile_fast_fp32": dgnet_profile,
    "dgnet_cpu_run": dgnet_cpu_run,
    "dgnet_cpu_run_id_cross_1": dgnet_cpu_run,
    "dgnet_cpu_run_milestones_0.6_0.9": dgnet_cpu_run,
    "dgnet_speed": dgnet_speed,
    "dgnet_speed_arms": dgnet_speed,
    "dgnet_speed_layout": dgnet_speed,
    "dgnet_speed_fast": dgnet_speed,
    "dgnet_id_ramp": dgnet_id_ramp,
    "export_size": export_size,
    "crgan_quality": crgan_quality,
    "crgan_speed": crgan_speed,
    "masks_speed": masks_speed,
    "generate": generate,
    "loader": loader,
    "serve": serve,
    "eval_speed": eval_speed,
}


def generic(d: dict) -> str:
    """A results file this script has no page for: every scalar figure, by its path in the JSON."""
    rows = []

    def walk(value, path):
        if isinstance(value, dict):
            for key, v in value.items():
                if key not in ("machine", "train_config", "commands", "benchmark", "timestamp"):
                    walk(v, f"{path}.{key}" if path else str(key))
        elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        else:
            rows.append([f"`{path}`", fmt(value) if not isinstance(value, list) else ", ".join(map(fmt, value))])
    walk(d, "")
    return table(["figure", "value"], rows) + "\n"


def renderer(name: str) -> Callable[[dict], str]:
    if name in PAGES:
        return PAGES[name]
    doc = load(name)
    if isinstance(doc.get("results"), list) and all("seconds_per_iteration" in r for r in doc["results"]):
        return dgnet_speed
    return generic


def mini_fid(arm: str) -> float:
    """An arm's FID in the second round of levers (dgnet_fast_mini)."""
    return load("dgnet_fast_mini")["arms"][arm]["final"]["fid"]


def block_dgnet_profile() -> str:
    """The paper preset's profiled iteration, fp32 beside bf16, by network and pass."""
    runs = {p: load(f"dgnet_profile_paper_{p}") for p in ("fp32", "bf16")
            if (RESULTS / f"dgnet_profile_paper_{p}.json").is_file()}
    nets = sorted({k.split("/")[0] for d in runs.values() for k in d["ms_by_network_and_pass"]},
                  key=lambda n: -sum(v for k, v in runs["fp32"]["ms_by_network_and_pass"].items()
                                     if k.startswith(n + "/")))
    header = ["network"] + [f"{p} {kind} s" for p in runs for kind in ("forward", "backward")]
    rows = [[n] + [f"{d['ms_by_network_and_pass'].get(f'{n}/{kind}', 0) / 1e3:.1f}"
                   for d in runs.values() for kind in ("forward", "backward")] for n in nets]
    rows.append(["**iteration**"] + [x for d in runs.values() for x in (f"**{d['iteration_ms'] / 1e3:.1f}**", "")])
    return table(header, rows)


def round3(arm: str, figure: str) -> float:
    """An arm's final figure in the third round of levers (dgnet_fast_mini_round3)."""
    return load("dgnet_fast_mini_round3")["arms"][arm]["final"][figure]


def names() -> list[str]:
    """Every results file, by name."""
    return sorted(p.stem for p in RESULTS.glob("*.json"))


# -- blocks inside hand-written pages -----------------------------------------------------------
def block_fast_arms(name: str = "dgnet_fast") -> str:
    d = load(name)
    cols = [c for c in fast_columns(d) if c[1].get("n") == d.get("quality_n")]
    return figures_table(cols)


def block_fast_long() -> str:
    d, b = load("dgnet_fast"), load("dgnet_cpu_run")
    final = (d.get("long") or {}).get("final") or d["final"]
    return figures_table([(f"run B, small, {b['final']['step']:,} it", b["final"]),
                          (f"fast, {final['step']} it", final)])


def block_fast_reid() -> str:
    long = load("dgnet_fast").get("long") or {}
    return table(["model", "Rank-1", "mAP", "mINP"],
                 [[k, pct(v.get("rank1")), pct(v.get("mAP")), pct(v.get("mINP"))]
                  for k, v in (long.get("reid") or {}).items()]) + "\n\n" + targets(long.get("targets_met"))


def block_lever_costs() -> str:
    d = load("dgnet_speed_arms")
    return table(["arm", "s/it (one thread)", "cost over small"],
                 [[r["arm"], f"{r['seconds_per_iteration']:.2f}", f"{r['cost_over_small']:.2f}×"]
                  for r in d["results"]])


DGNET_RUNS = (("A", "dgnet_cpu_run_milestones_0.6_0.9"), ("B", "dgnet_cpu_run"), ("C", "dgnet_cpu_run_id_cross_1"))


def block_dgnet_runs(runs: str) -> str:
    """Quality of the long DG-Net runs named in ``runs`` (A, B, C): B's start, then each run's
    middle and final snapshots."""
    docs = {run: load(name) for run, name in DGNET_RUNS if run in runs}
    cols = [("start (B)", docs["B"]["start"])] if "B" in docs else []
    for part in ("middle", "final"):
        cols += [(f"{part} {run} ({d[part]['step']:,})", d[part]) for run, d in docs.items()]
    return figures_table(cols)


def block_dgnet_runs_reid() -> str:
    rows = []
    for run, name in DGNET_RUNS:
        for model, r in (load(name).get("reid") or {}).items():
            rows.append([run, model, pct(r.get("rank1")), pct(r.get("mAP"))])
    return table(["run", "model", "Rank-1", "mAP"], rows)


def block_readme_capabilities() -> str:
    fast, runb, srv, gen, cq = (load(n) for n in ("dgnet_fast", "dgnet_cpu_run", "serve", "generate", "crgan_quality"))
    ff = (fast.get("long") or {}).get("final") or fast["final"]
    sp, ex = load("dgnet_speed"), load("export_size")
    paper = {r["precision"]: r["seconds_per_iteration"] for r in sp["results"] if r["preset"] == "paper"}
    rows = [
        ["DG-Net training, small preset", "[DG-Net training](docs/dgnet/training.md)",
         f"E_a mAP {pct(runb['reid']['dgnet']['mAP'])} against its teacher's "
         f"{pct(runb['reid']['teacher']['mAP'])} after {runb['iterations']:,} iterations on "
         f"{runb['machine']['torch_threads']} CPU thread(s); "
         f"reconstruction SSIM {runb['final']['reconstruction_ssim']:.3f}"],
        ["DG-Net fast preset", "[DG-Net in one CPU hour](docs/dgnet/fast.md)",
         f"on Market-1501 after {ff['step']} iterations ({ff['cpu_minutes']:.0f} CPU-minutes): FID {ff['fid']:.1f} "
         f"against run B's {runb['final']['fid']:.1f} after {runb['iterations']:,}, identity consistency by the "
         f"judge {ff['identity_consistency_judge']:.3f} (target 0.30); on market1501_mini at equal compute, "
         f"Adam at 4e-4 took FID {mini_fid('perc_idf'):.1f} → {mini_fid('perc_idf_lr4'):.1f}, and banded AdaIN "
         f"with the modulated RGB head identity consistency by the judge "
         f"{round3('perc_idf_lr4', 'identity_consistency_judge'):.3f} → "
         f"{round3('lr4_bands_rgb', 'identity_consistency_judge'):.3f} (the swaps take the row's colours)"],
        ["DG-Net paper preset speed", "[DG-Net training](docs/dgnet/training.md#speed)",
         f"{paper.get('fp32', 0):.1f} s/it fp32, {paper.get('bf16', 0):.1f} s/it bf16 on "
         f"{cores(sp)} CPU cores"],
        ["Inference export", "[Public models](docs/dgnet/public-models.md)",
         f"{ex['results']['paper']['size_MiB']['full']:.0f} → {ex['results']['paper']['size_MiB']['export']:.0f} MiB "
         "at paper size"],
        ["CR-GAN cross-domain", "[CR-GAN](docs/crgan/index.md)",
         f"own-target match {cq['long_run']['own_target_match']:.3f} "
         f"(chance {cq['long_run']['own_target_match_chance']:.3f}); re-id Rank-1 "
         f"{cq['reid']['crgan']['rank1_mean']:.2f} against the control's {cq['reid']['control']['rank1_mean']:.2f} "
         f"({cq['reid']['crgan']['seeds']} seeds)"],
        ["Shard jobs", "[Jobs and shards](docs/jobs.md)",
         f"{gen['results']['with_soft_labels']['job_over_raw']:.2f} of the raw generator's speed with soft labels"],
        ["HTTP service", "[HTTP API](docs/service/http.md)",
         f"{srv['targets']['batched_over_unbatched']:.2f}× the unbatched service at {srv['targets']['clients']} "
         f"clients on {cores(srv)} CPU cores (target {srv['targets']['batched_over_unbatched_target']:g}×: "
         "needs a GPU)"],
    ]
    return table(["capability", "docs", "headline (generated from bench/results)"], rows)


BLOCKS: dict[str, Callable[[], str]] = {
    "dgnet_fast.arms": block_fast_arms,
    "dgnet_fast_mini.arms": lambda: block_fast_arms("dgnet_fast_mini"),
    "dgnet_fast_mini_round3.arms": lambda: block_fast_arms("dgnet_fast_mini_round3"),
    "dgnet_profile.paper": block_dgnet_profile,
    "dgnet_fast.long": block_fast_long,
    "dgnet_fast.reid": block_fast_reid,
    "crgan_quality.reid": lambda: crgan_reid(load("crgan_quality")),
    "dgnet_speed_arms.costs": block_lever_costs,
    "dgnet_cpu_run.ab": lambda: block_dgnet_runs("AB"),
    "dgnet_cpu_run.bc": lambda: block_dgnet_runs("BC"),
    "dgnet_cpu_run.reid": block_dgnet_runs_reid,
    "readme.capabilities": block_readme_capabilities,
}

# Every results page's tables are a block too (NAME.tables), for the pages that discuss them.
BLOCKS.update({f"{name}.tables": (lambda name=name: PAGES[name](load(name))) for name in PAGES})

_BLOCK = re.compile(r"(<!-- results: (?P<name>[\w.]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def fill_blocks(text: str, where: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise SystemExit(f"{where}: unknown results block {name!r} (known: {', '.join(sorted(BLOCKS))})")
        return m.group(1) + BLOCKS[name]().rstrip() + "\n" + m.group(4)
    return _BLOCK.sub(sub, text)


def index_page() -> str:
    lines = [
        "# Results",
        "",
        f"<!-- Generated by `{GENERATOR}`: edit the JSON or the script, not this page. -->",
        "",
        "Every page here is generated from one file of `bench/results/` by `" + GENERATOR + "`;",
        "`tests/test_results_pages.py` fails when a page differs from its file. Each page states the",
        "conditions of the measurement (cores, threads, load, data, seed) and the command that made it.",
        "The benchmarks run with `make bench` (one target per file: `make bench-dgnet`, ...).",
        "",
        table(["results file", "what", "written"],
              [[f"[`{n}.json`]({n}.md)", TITLES.get(n, n), load(n).get("timestamp", "—")[:10]] for n in names()]),
        "",
    ]
    return "\n".join(lines)


def outputs() -> dict[Path, str]:
    """Every file this script writes, with its text."""
    out = {OUT / "index.md": index_page()}
    for name in names():
        out[OUT / f"{name}.md"] = page(name, renderer(name)(load(name)))
    for path in [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]:
        if path.parent == OUT or not path.exists():
            continue
        text = path.read_text()
        if "<!-- results: " in text:
            out[path] = fill_blocks(text, str(path.relative_to(REPO)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a page differs")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if not path.exists() or path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    extra = sorted(set(OUT.glob("*.md")) - {OUT / "index.md"} - {OUT / f"{n}.md" for n in names()})
    for path in stale:
        print(f"{'differs from its JSON' if args.check else 'written'}: {path.relative_to(REPO)}")
    for path in extra:
        print(f"not made from any results file: {path.relative_to(REPO)}")
    if args.check and (stale or extra):
        print(f"run `{GENERATOR}` and commit the pages", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
