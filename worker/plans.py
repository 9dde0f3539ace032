"""Pair plans: the records a job spec asks for, as a pure function of the spec and the data.

Every process that touches a job (the submitter, each worker, `reidgen generate`) computes the
plan itself from the spec; the plan's hash goes into every shard manifest, so shards made from
different data (a folder changed between two workers) are refused instead of mixed.

Random choices are seeded from the spec's seed and the position they concern (a subset draw,
one appearance image's structures), never from process state.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from api_schemas.jobs import JobSpec
from reidgen.errors import about
from reidgen.market import Item, scan_split
from reidgen.paths import resolve_data


@dataclass(frozen=True)
class Plan:
    spec: JobSpec
    sources: tuple[Item, ...]       # appearance providers (CR-GAN: the people rendered)
    structures: tuple[Item, ...]    # structure providers (DG-Net: the same list; CR-GAN: target contexts)
    source_root: Path
    structure_root: Path
    pairs: np.ndarray               # R×2 int64: (index into sources, index into structures)
    hash: str

    @property
    def records(self) -> int:
        return len(self.pairs)

    @property
    def shards(self) -> int:
        return max(1, math.ceil(self.records / self.spec.shard_size))

    def shard_range(self, shard: int) -> range:
        size = self.spec.shard_size
        return range(shard * size, min(self.records, (shard + 1) * size))

    def domain(self, root: Path) -> str:
        return root.name


def _subset(items: list[Item], n: int | None, seed: int, stream: int) -> list[Item]:
    if n is None or n >= len(items):
        return items
    pick = np.random.default_rng([seed, stream]).choice(len(items), size=n, replace=False)
    return [items[i] for i in sorted(pick.tolist())]


def _dgnet_pairs(spec: JobSpec, pids: np.ndarray) -> np.ndarray:
    n = len(pids)
    allowed = pids[:, None] != pids[None, :] if spec.cross_identity else ~np.eye(n, dtype=bool)
    if spec.kind == "dgnet_all_pairs":
        if not spec.cross_identity:
            allowed = np.ones((n, n), dtype=bool)  # N×N includes each image's own reconstruction
        a, s = np.nonzero(allowed)
        return np.stack([a, s], 1)
    rows = []
    for i in range(n):
        candidates = np.flatnonzero(allowed[i])
        k = min(spec.structures_per_image, len(candidates))
        chosen = np.random.default_rng([spec.seed, 1, i]).choice(candidates, size=k, replace=False)
        rows.extend((i, int(j)) for j in chosen)
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _render_pairs(spec: JobSpec, n_sources: int, n_targets: int) -> np.ndarray:
    if spec.targets_per_source is None:
        a, t = np.meshgrid(np.arange(n_sources), np.arange(n_targets), indexing="ij")
        return np.stack([a.ravel(), t.ravel()], 1)
    rows = []
    k = min(spec.targets_per_source, n_targets)
    for i in range(n_sources):
        chosen = np.random.default_rng([spec.seed, 2, i]).choice(n_targets, size=k, replace=False)
        rows.extend((i, int(j)) for j in chosen)
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _hash(spec: JobSpec, sources, structures, source_root: Path, structure_root: Path, pairs) -> str:
    h = hashlib.sha256()
    h.update(spec.model_dump_json().encode())
    for root, items in ((source_root, sources), (structure_root, structures)):
        listing = [[str(Path(it.path).relative_to(root)), it.pid, it.camid] for it in items]
        h.update(json.dumps(listing).encode())
    h.update(np.ascontiguousarray(pairs, dtype="<i8").tobytes())
    return h.hexdigest()[:16]


def _data_set(field: str, name: str, split: str) -> tuple[Path, list[Item]]:
    """The root and images of one split of a data set. A remote client learns only that its name
    was not found: neither the data root it was looked up in nor what was wrong with the folder."""
    with about(field, "unknown_data", f"data set {name!r} not found (give the name of a Market-1501 style "
                                      f"data set on this server, with its {split} split)"):
        root = resolve_data(name)
        return root, scan_split(root, split)


def make_plan(spec: JobSpec) -> Plan:
    """The plan of ``spec`` (cached per process: every shard of a job needs it)."""
    return _cached_plan(spec.model_dump_json())


@lru_cache(maxsize=8)
def _cached_plan(spec_json: str) -> Plan:
    spec = JobSpec.model_validate_json(spec_json)
    source_root, sources = _data_set("data", spec.data, spec.split)
    sources = _subset(sources, spec.subset, spec.seed, 0)
    if spec.kind == "crgan_render":
        structure_root, structures = _data_set("target", spec.target, spec.target_split)
        pairs = _render_pairs(spec, len(sources), len(structures))
    else:
        structure_root, structures = source_root, sources
        pairs = _dgnet_pairs(spec, np.asarray([it.pid for it in sources]))
    digest = _hash(spec, sources, structures, source_root, structure_root, pairs)
    return Plan(spec, tuple(sources), tuple(structures), source_root, structure_root, pairs, digest)
