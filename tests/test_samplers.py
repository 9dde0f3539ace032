"""Batch samplers: identity balance, per-epoch determinism, mid-epoch start, positives."""
from __future__ import annotations

from collections import Counter

import numpy as np

from reidgen.core.market import scan_split
from trainer.feeds.samplers import PKBatchSampler, PositiveSampler, RandomBatchSampler


def test_pk_batches_are_identity_balanced(market_mini):
    pids = [it.pid for it in scan_split(market_mini, "train")]
    sampler = PKBatchSampler(pids, p=8, k=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(pids) // 32
    for batch in batches:
        counts = Counter(pids[i] for i, _ in batch)
        assert len(counts) == 8 and set(counts.values()) == {4}


def test_epochs_are_reproducible_and_differ(market_mini):
    n = len(scan_split(market_mini, "train"))
    a, b = RandomBatchSampler(n, 32, seed=3), RandomBatchSampler(n, 32, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    first = list(a)
    assert first == list(b)
    b.set_epoch(3)
    assert first != list(b)
    # Starting mid-epoch yields exactly the tail: what a resumed run needs.
    a.set_epoch(2, start_batch=5)
    assert list(a) == first[5:]
    assert sorted(i for batch in first for i, _ in batch) == sorted(set(i for batch in first for i, _ in batch))


def test_positive_is_same_identity_other_image(market_mini):
    pids = [it.pid for it in scan_split(market_mini, "train")]
    pos = PositiveSampler(pids)
    rng = np.random.default_rng(0)
    for i in range(0, len(pids), 7):
        j = pos.sample(i, rng)
        assert pids[j] == pids[i] and j != i
    alone = PositiveSampler([5, 6, 6])
    assert alone.sample(0, rng) == 0
