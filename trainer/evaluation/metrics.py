"""Market-1501-style ranking metrics (CMC, mAP, mINP), vectorised in torch.

Protocol, for each query against the gallery:

* score = dot product of the (already combined and normalised) features; the gallery is
  ranked by descending score, ties broken by gallery order (stable sort);
* good = same person id and a different camera;
* junk = same id and same camera, or gallery id -1; junk is removed from the ranking before
  any rank is counted (it is neither a hit nor a miss);
* distractors (id 0) are ordinary negatives.

Averaging (a choice, stated here because implementations differ):

* CMC and Rank-k average over *all* queries; a query without any good match is a miss at
  every rank;
* mAP and mINP average over the queries with at least one good match only
  (``num_valid_queries``). On Market-1501 every query has one, so both choices agree there.

AP follows the official Market-1501 evaluation code: for the n good matches at junk-removed
0-based ranks r_1 < ... < r_n,

    AP = sum_i (1/n) * (prec_i + old_prec_i) / 2,
    prec_i = i / (r_i + 1),  old_prec_i = (i - 1) / r_i  (1 if r_i == 0),

i.e. the mean of the precision just before and at each hit (trapezoidal area under the
precision/recall curve). mINP (Ye et al., 2021) is n / (r_n + 1): the precision at the rank of
the hardest good match.

``evaluate_ranking`` is the fast path; ``evaluate_ranking_reference`` is a slow, per-query
numpy transcription of the official code that tests and benchmarks use to check it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "RankingResult",
    "combine_parts",
    "evaluate_ranking",
    "evaluate_ranking_reference",
]

ArrayLike = torch.Tensor | np.ndarray

JUNK_ID = -1


@dataclass(frozen=True, eq=False)
class RankingResult:
    """Ranking metrics of one query set against one gallery (all rates in [0, 1])."""

    cmc: np.ndarray  # cmc[k]: fraction of all queries with a good match within the top k+1
    mAP: float
    mINP: float
    rank1: float
    rank5: float
    rank10: float
    num_queries: int
    num_valid_queries: int  # queries with at least one good match: the mAP/mINP denominator

    def to_dict(self) -> dict[str, Any]:
        """Plain Python numbers (JSON-serialisable)."""
        return {
            "cmc": [float(x) for x in self.cmc],
            "mAP": float(self.mAP),
            "mINP": float(self.mINP),
            "rank1": float(self.rank1),
            "rank5": float(self.rank5),
            "rank10": float(self.rank10),
            "num_queries": int(self.num_queries),
            "num_valid_queries": int(self.num_valid_queries),
        }


def combine_parts(parts: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """L2-normalise each part (N×d_p) row-wise and concatenate them, part p scaled by sqrt(w_p).

    The dot product of two combined rows is then sum_p w_p * cos_p, e.g. DG-Net's
    ``s_prim + beta * s_fine`` with ``weights=[1, beta]``. ``weights`` defaults to all ones.
    """
    if len(parts) == 0:
        raise ValueError("combine_parts needs at least one part")
    if weights is None:
        weights = [1.0] * len(parts)
    if len(weights) != len(parts):
        raise ValueError(f"got {len(parts)} parts but {len(weights)} weights")
    for w in weights:
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weights must be finite and non-negative, got {list(weights)}")
    for p, part in enumerate(parts):
        if part.dim() != 2:
            raise ValueError(f"part {p} must be 2-D (N×d), got shape {tuple(part.shape)}")
        if part.shape[0] != parts[0].shape[0]:
            raise ValueError(f"part {p} has {part.shape[0]} rows, part 0 has {parts[0].shape[0]}")
    return torch.cat(
        [math.sqrt(w) * F.normalize(part, p=2, dim=1) for part, w in zip(parts, weights)], dim=1
    )


def _as_int_vector(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {t.dtype}")
    return t.to(torch.int64)


def _as_features(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N×d), got shape {tuple(t.shape)}")
    # float64 stays float64 (exact comparisons with the reference); everything else is float32.
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def _check_inputs(
    query_feat: ArrayLike,
    gallery_feat: ArrayLike,
    query_ids: ArrayLike,
    gallery_ids: ArrayLike,
    query_cams: ArrayLike,
    gallery_cams: ArrayLike,
    max_rank: int,
) -> tuple[torch.Tensor, ...]:
    qf, gf = _as_features(query_feat, "query_feat"), _as_features(gallery_feat, "gallery_feat")
    ql, gl = _as_int_vector(query_ids, "query_ids"), _as_int_vector(gallery_ids, "gallery_ids")
    qc, gc = _as_int_vector(query_cams, "query_cams"), _as_int_vector(gallery_cams, "gallery_cams")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"feature sizes differ: query {qf.shape[1]}, gallery {gf.shape[1]}")
    if not (len(qf) == len(ql) == len(qc)):
        raise ValueError(f"query sizes differ: {len(qf)} features, {len(ql)} ids, {len(qc)} cams")
    if not (len(gf) == len(gl) == len(gc)):
        raise ValueError(f"gallery sizes differ: {len(gf)} features, {len(gl)} ids, {len(gc)} cams")
    if len(qf) == 0:
        raise ValueError("no queries to evaluate")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if qf.dtype != gf.dtype:
        qf, gf = qf.to(torch.float64), gf.to(torch.float64)
    return qf, gf, ql, gl, qc, gc


def _summarise(
    first_hit: np.ndarray, ap: np.ndarray, inp: np.ndarray, valid: np.ndarray, max_rank: int
) -> RankingResult:
    """Average per-query results (first_hit: 0-based rank of the first good match, -1 if none)."""
    hit = valid[:, None] & (first_hit[:, None] < np.arange(1, max(max_rank, 10) + 1)[None, :])
    cmc_all = hit.mean(axis=0, dtype=np.float64)
    cmc = cmc_all[:max_rank].copy()
    cmc.setflags(write=False)
    n_valid = int(valid.sum())
    # Nothing to average over: report 0 rather than NaN so to_dict() stays valid JSON.
    m_ap = float(ap[valid].mean()) if n_valid else 0.0
    m_inp = float(inp[valid].mean()) if n_valid else 0.0
    return RankingResult(
        cmc=cmc,
        mAP=m_ap,
        mINP=m_inp,
        rank1=float(cmc_all[0]),
        rank5=float(cmc_all[4]),
        rank10=float(cmc_all[9]),
        num_queries=len(first_hit),
        num_valid_queries=n_valid,
    )


# Above this fraction of the gallery, one full sort is cheaper than top-k plus a sort.
_TOPK_MAX_FRACTION = 0.25


def _ranking_head(scores: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    """Gallery indices of each row's ranking (descending score, ties by gallery order), cut
    after the deepest-ranked good match of the chunk; nothing below it affects the metrics.

    A good model puts every good match near the top, so a top-k selection followed by a
    sort of only those k items is much cheaper than sorting the whole gallery.
    """
    lowest_good = torch.where(good, scores, torch.full_like(scores, math.inf)).amin(dim=1)
    # Every item scoring >= a row's lowest good match may rank above it; ties included.
    depth = int((scores >= lowest_good[:, None]).sum(dim=1).max())
    if depth > _TOPK_MAX_FRACTION * scores.shape[1]:
        return torch.sort(scores, dim=1, descending=True, stable=True).indices
    # topk may choose arbitrarily among items tied at the k-th score; in each row these
    # either all fit in the selection or score below the row's lowest good match, so every
    # ranking is exact down to its last good match. topk's output order is not stable
    # either: put the selection back in gallery order, then sort it stably by score.
    top = torch.topk(scores, depth, dim=1, sorted=False).indices.sort(dim=1).values
    by_score = torch.sort(scores.gather(1, top), dim=1, descending=True, stable=True).indices
    return top.gather(1, by_score)


def _per_query_metrics(
    good: torch.Tensor, junk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """First-hit rank (-1 if none), AP, INP and number of good matches of each row.

    ``good`` and ``junk`` are boolean masks in ranking order (column 0 = best score).
    """
    num_rows, device = good.shape[0], good.device
    n = good.sum(dim=1)
    first_hit = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
    ap = torch.zeros(num_rows, dtype=torch.float64, device=device)
    inp = torch.zeros(num_rows, dtype=torch.float64, device=device)

    # Good matches are sparse (a handful per query): work on their coordinates only.
    # nonzero() is row-major, so within a row the hits come in rank order.
    rows, pos = good.nonzero(as_tuple=True)
    if len(rows) == 0:
        return first_hit, ap, inp, n
    rank = pos - junk.cumsum(dim=1)[rows, pos]  # 0-based rank once junk is removed
    row_start = torch.cumsum(n, 0) - n
    hit = torch.arange(len(rows), device=device) - row_start[rows] + 1  # i = 1..n in its row

    r, i, n_f = rank.to(torch.float64), hit.to(torch.float64), n.to(torch.float64)
    prec = i / (r + 1)
    old_prec = torch.where(rank > 0, (i - 1) / r.clamp(min=1), torch.ones_like(r))
    ap.index_add_(0, rows, (prec + old_prec) / 2 / n_f[rows])

    first, last = hit == 1, hit == n[rows]
    first_hit[rows[first]] = rank[first]
    inp[rows[last]] = n_f[rows[last]] / (r[last] + 1)
    return first_hit, ap, inp, n


def evaluate_ranking(
    query_feat: ArrayLike,
    gallery_feat: ArrayLike,
    query_ids: ArrayLike,
    gallery_ids: ArrayLike,
    query_cams: ArrayLike,
    gallery_cams: ArrayLike,
    *,
    chunk_size: int = 256,
    max_rank: int = 50,
) -> RankingResult:
    """Market-protocol CMC / mAP / mINP (see the module docstring), vectorised over queries.

    Features are used as given (score = dot product, higher = more similar); combine and
    normalise them first, e.g. with :func:`combine_parts`. ids and cams are 1-D integer
    tensors or numpy arrays. Queries are processed ``chunk_size`` at a time, so peak memory
    is a few ``chunk_size × len(gallery)`` matrices; each ranking is sorted only as deep as
    its chunk's last good match, which is all the metrics need. Scores are computed in float64 when
    the features are float64, else in float32, on the features' device. ``max_rank`` is the
    length of the returned CMC curve; Rank-1/5/10 do not depend on it.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    qf, gf, ql, gl, qc, gc = _check_inputs(
        query_feat, gallery_feat, query_ids, gallery_ids, query_cams, gallery_cams, max_rank
    )
    device = qf.device
    gf = gf.to(device)
    # Gallery id -1 is junk for every query: dropping it up front is the same as removing it
    # from every ranking (a stable sort keeps the relative order of the rest) and saves work.
    keep = gl != JUNK_ID
    gf, gl, gc = gf[keep.to(device)], gl[keep].to(device), gc[keep].to(device)
    ql, qc = ql.to(device), qc.to(device)
    num_q = len(qf)

    first_hit = torch.full((num_q,), -1, dtype=torch.int64)
    ap = torch.zeros(num_q, dtype=torch.float64)
    inp = torch.zeros(num_q, dtype=torch.float64)
    n_good = torch.zeros(num_q, dtype=torch.int64)

    for start in range(0, num_q, chunk_size):
        stop = min(start + chunk_size, num_q)
        scores = qf[start:stop] @ gf.T
        same_id = ql[start:stop, None] == gl[None, :]
        same_cam = qc[start:stop, None] == gc[None, :]
        good = same_id & ~same_cam
        junk = same_id & same_cam
        del same_id, same_cam

        order = _ranking_head(scores, good)
        del scores
        chunk = _per_query_metrics(good.gather(1, order), junk.gather(1, order))
        for total, part in zip((first_hit, ap, inp, n_good), chunk):
            total[start:stop] = part.cpu()

    return _summarise(first_hit.numpy(), ap.numpy(), inp.numpy(), (n_good > 0).numpy(), max_rank)


def evaluate_ranking_reference(
    query_feat: ArrayLike,
    gallery_feat: ArrayLike,
    query_ids: ArrayLike,
    gallery_ids: ArrayLike,
    query_cams: ArrayLike,
    gallery_cams: ArrayLike,
    *,
    max_rank: int = 50,
) -> RankingResult:
    """Slow, obviously-correct reference: numpy, one query at a time, official Market logic.

    Same protocol and result as :func:`evaluate_ranking` (which tests and benchmarks check
    against this). Deliberately written independently of the fast path: no chunking, no
    up-front junk removal, set operations on gallery indices as in the official code. One
    difference from the official script: it ranks with ``argsort(-score, kind="stable")``
    so that ties go by gallery order, where the official ``argsort(score)[::-1]`` reverses
    them.
    """
    qf_t, gf_t, ql_t, gl_t, qc_t, gc_t = _check_inputs(
        query_feat, gallery_feat, query_ids, gallery_ids, query_cams, gallery_cams, max_rank
    )
    qf, gf = qf_t.cpu().numpy(), gf_t.cpu().numpy()
    ql, gl, qc, gc = (t.cpu().numpy() for t in (ql_t, gl_t, qc_t, gc_t))
    num_q = len(qf)

    first_hit = np.full(num_q, -1, dtype=np.int64)
    ap = np.zeros(num_q)
    inp = np.zeros(num_q)
    valid = np.zeros(num_q, dtype=bool)
    for q in range(num_q):
        distance = -(gf @ qf[q])
        index = np.argsort(distance, kind="stable")

        query_index = np.flatnonzero(gl == ql[q])
        camera_index = np.flatnonzero(gc == qc[q])
        junk_index = np.union1d(
            np.intersect1d(query_index, camera_index), np.flatnonzero(gl == JUNK_ID)
        )
        good_index = np.setdiff1d(np.setdiff1d(query_index, camera_index), junk_index)
        if good_index.size == 0:
            continue  # a miss at every rank; left out of mAP / mINP

        index = index[np.isin(index, junk_index, invert=True)]
        rows_good = np.flatnonzero(np.isin(index, good_index))
        ngood = len(good_index)
        for i in range(ngood):
            precision = (i + 1) / (rows_good[i] + 1)
            old_precision = i / rows_good[i] if rows_good[i] != 0 else 1.0
            ap[q] += (1.0 / ngood) * (old_precision + precision) / 2
        first_hit[q] = rows_good[0]
        inp[q] = ngood / (rows_good[-1] + 1)
        valid[q] = True

    return _summarise(first_hit, ap, inp, valid, max_rank)
