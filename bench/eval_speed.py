"""Benchmark: vectorised Market evaluation vs the per-query reference, on full Market-1501 sizes.

Person ids and cameras come from the real file names of Market-1501 ``query/`` (3,368) and
``bounding_box_test/`` (19,732); no image is decoded. Features are synthetic 512-d vectors
(per identity a random centre plus noise, L2-normalised, seeded), so the rankings have a
realistic structure of hits, junk and distractors without any network. The fast path's time
depends on feature quality (it sorts each ranking only down to its last good match): raise
--noise to mimic a weak model. The reference is run on a query subset and extrapolated
linearly (its cost is the same for every query: one gallery-wide score, sort and set ops).

    python bench/eval_speed.py [--data DIR] [--ref-queries 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from any directory

from bench.common import machine_info, write_results  # noqa: E402
from reidgen.core.market import scan_split  # noqa: E402
from reidgen.core.paths import data_root  # noqa: E402
from trainer.evaluation.metrics import evaluate_ranking, evaluate_ranking_reference  # noqa: E402

DEFAULT_DATA = data_root()
DEFAULT_OUT = REPO / "bench" / "results" / "eval_speed.json"
def read_ids_cams(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Person ids and camera ids from the file names of one split (no image is decoded)."""
    items = scan_split(root, split)
    return (np.array([it.pid for it in items], dtype=np.int64),
            np.array([it.camid for it in items], dtype=np.int64))


def synthetic_features(
    query_ids: np.ndarray, gallery_ids: np.ndarray, dim: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per identity a random unit centre plus Gaussian noise; ids -1 and 0 get no shared centre."""
    rng = np.random.default_rng(seed)
    all_ids = np.concatenate([query_ids, gallery_ids])
    people = np.unique(all_ids[all_ids > 0])
    centres = rng.standard_normal((len(people), dim)) / np.sqrt(dim)
    person = all_ids > 0
    base = np.empty((len(all_ids), dim))
    base[person] = centres[np.searchsorted(people, all_ids[person])]
    # Junk and distractors are unrelated images: each gets its own random direction.
    base[~person] = rng.standard_normal((int((~person).sum()), dim)) / np.sqrt(dim)
    feat = base + noise * rng.standard_normal((len(all_ids), dim)) / np.sqrt(dim)
    feat /= np.linalg.norm(feat, axis=1, keepdims=True)
    feat_t = torch.from_numpy(feat.astype(np.float32))
    return feat_t[: len(query_ids)], feat_t[len(query_ids) :]


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    """Median wall time (s) of ``repeats`` calls, all times, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"folder holding market1501/ (default: {DEFAULT_DATA})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default: {DEFAULT_OUT})")
    parser.add_argument("--dim", type=int, default=512, help="feature size (default: 512)")
    parser.add_argument("--noise", type=float, default=2.0, help="noise / centre norm ratio (default: 2.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the fast path; median reported")
    parser.add_argument("--ref-queries", type=int, default=300,
                        help="queries given to the per-query reference, then extrapolated (default: 300)")
    parser.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args(argv)

    market = args.data / "market1501"
    ql, qc = read_ids_cams(market, "query")
    gl, gc = read_ids_cams(market, "gallery")
    qf, gf = synthetic_features(ql, gl, args.dim, args.noise, args.seed)
    n_q, n_g = len(ql), len(gl)

    fast_s, fast_all, fast = timed(
        lambda: evaluate_ranking(qf, gf, ql, gl, qc, gc, chunk_size=args.chunk_size), args.repeats
    )

    # Reference on a seeded random subset of queries; also check the fast path agrees there.
    n_ref = min(args.ref_queries, n_q)
    sub = np.sort(np.random.default_rng(args.seed + 1).choice(n_q, n_ref, replace=False))
    sub_args = (qf[sub], gf, ql[sub], gl, qc[sub], gc)
    ref_sub_s, _, ref_sub = timed(lambda: evaluate_ranking_reference(*sub_args), 1)
    fast_sub = evaluate_ranking(*sub_args, chunk_size=args.chunk_size)
    max_diff = max(
        float(np.abs(fast_sub.cmc - ref_sub.cmc).max()),
        abs(fast_sub.mAP - ref_sub.mAP),
        abs(fast_sub.mINP - ref_sub.mINP),
    )
    ref_s = ref_sub_s * n_q / n_ref

    print(f"Market-1501 evaluation: {n_q} queries x {n_g} gallery, {args.dim}-d synthetic features")
    print(f"metrics (fast path): Rank-1 {fast.rank1:.4f}  mAP {fast.mAP:.4f}  mINP {fast.mINP:.4f}")
    print()
    rows = [
        (f"evaluate_ranking, median of {args.repeats}", f"{fast_s:.2f}"),
        (f"reference, {n_ref} queries measured", f"{ref_sub_s:.2f}"),
        (f"reference, all {n_q} (linear extrapolation)", f"{ref_s:.2f}"),
        ("speed-up", f"{ref_s / fast_s:.1f}x"),
    ]
    print(f"{'implementation':<46}{'time (s)':>10}")
    for label, value in rows:
        print(f"{label:<46}{value:>10}")
    print(f"max |fast - reference| on the subset (CMC, mAP, mINP): {max_diff:.1e}")
    machine = {**machine_info("cpu"), "numpy_version": np.__version__}
    print(f"{machine['cpus']} CPUs, {machine['torch_threads']} torch threads, "
          f"load average {machine['load_average_1_5_15min'][0]:.2f}")

    write_results("eval_speed", {
        "data": str(market),
        "num_queries": n_q,
        "num_gallery": n_g,
        "dim": args.dim,
        "noise": args.noise,
        "seed": args.seed,
        "chunk_size": args.chunk_size,
        "fast_seconds_median": fast_s,
        "fast_seconds_all": fast_all,
        "reference_queries_measured": n_ref,
        "reference_seconds_measured": ref_sub_s,
        "reference_seconds_extrapolated": ref_s,
        "reference_extrapolation": f"linear: measured time x {n_q}/{n_ref}",
        "speedup": ref_s / fast_s,
        "max_abs_diff_on_subset": max_diff,
        "metrics": {k: v for k, v in fast.to_dict().items() if k != "cmc"},
        "machine": machine,
    }, path=args.out)


if __name__ == "__main__":
    main()
