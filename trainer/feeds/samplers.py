"""Batch samplers that are reproducible per epoch and can start mid-epoch (exact resume).

Each batch is a list of ``(index, seed)``: the seed drives that sample's augmentation (see
`trainer.feeds.data.ImageDataset`), so augmentation is a function of (run seed, epoch, position).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np


class EpochBatchSampler:
    """Base: subclasses define the batches of one epoch from a seeded generator."""

    def __init__(self, seed: int):
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _batches(self, rng: np.random.Generator) -> list[list[int]]:
        raise NotImplementedError

    def __iter__(self):
        rng = self._rng()
        batches = self._batches(rng)
        seeds = rng.integers(0, 2**31 - 1, size=(len(batches), max(map(len, batches), default=0)))
        for b in range(self.start_batch, len(batches)):
            yield [(int(i), int(s)) for i, s in zip(batches[b], seeds[b])]

    def __len__(self) -> int:
        raise NotImplementedError


class RandomBatchSampler(EpochBatchSampler):
    """Shuffled batches of a fixed size, the last incomplete batch dropped."""

    def __init__(self, num_items: int, batch_size: int, seed: int = 0):
        super().__init__(seed)
        if num_items < batch_size:
            raise ValueError(f"{num_items} images is fewer than one batch of {batch_size}")
        self.num_items, self.batch_size = num_items, batch_size

    def __len__(self) -> int:
        return self.num_items // self.batch_size

    def _batches(self, rng):
        order = rng.permutation(self.num_items)
        return [order[b * self.batch_size:(b + 1) * self.batch_size].tolist() for b in range(len(self))]


def group_by_identity(pids: list[int]) -> dict[int, np.ndarray]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, pid in enumerate(pids):
        groups[pid].append(i)
    return {pid: np.asarray(ix) for pid, ix in groups.items()}


class PKBatchSampler(EpochBatchSampler):
    """P identities × K images per batch (identity-balanced).

    An epoch has about as many images as the data set. Identities with fewer than K images
    are sampled with replacement.
    """

    def __init__(self, pids: list[int], p: int, k: int, seed: int = 0):
        super().__init__(seed)
        self.groups = group_by_identity(pids)
        if len(self.groups) < p:
            raise ValueError(f"{len(self.groups)} identities is fewer than P={p}")
        self.p, self.k = p, k
        self.ids = sorted(self.groups)
        self.num_batches = max(1, len(pids) // (p * k))

    def __len__(self) -> int:
        return self.num_batches

    def _batches(self, rng):
        batches = []
        for _ in range(self.num_batches):
            chosen = rng.choice(len(self.ids), size=self.p, replace=False)
            batch = []
            for c in chosen:
                members = self.groups[self.ids[c]]
                batch += rng.choice(members, size=self.k, replace=len(members) < self.k).tolist()
            batches.append(batch)
        return batches


class PositiveSampler:
    """Same-identity positives: another image of the person, the image itself only if alone."""

    def __init__(self, pids: list[int]):
        self.pids = list(pids)
        self.groups = group_by_identity(self.pids)

    def sample(self, index: int, rng: np.random.Generator) -> int:
        members = self.groups[self.pids[index]]
        if len(members) == 1:
            return index
        pick = int(members[rng.integers(len(members) - 1)])
        # Skip over the anchor itself without a rejection loop.
        return pick if pick != index else int(members[-1])
