"""Synthetic training samples for the re-id trainer: from LMDB shards, or generated on the fly.

Both sources give the same sample: ``image, soft label (dense K vector), structure label,
appearance label, ok`` — the targets of DG-Net's discriminative losses on generated images
(L_prim: KL to the teacher's soft label; L_fine: CE to the structure provider's identity).

`ShardDataset` reads shards through `worker.shards.ShardReader` (the one home of the format):
each DataLoader worker opens the LMDB environments itself, lazily, read-only and without
locks, and every record is checked against its manifest checksum. A corrupt record is an
``ok = False`` sample that the trainer drops and reports (or, ``strict``, an error).
"""
from __future__ import annotations

import bisect
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from reidgen.core.errors import ReidgenError
from reidgen.core.market import LabelMap
from worker.shards import CorruptRecord, ShardReader, decode_record, shard_paths


class ShardDataset(Dataset):
    """Every record of the shards under ``roots`` (job folders or shard folders)."""

    def __init__(self, roots: list[str | Path], transform: Callable, label_map: LabelMap,
                 image_size: tuple[int, int], strict: bool = False):
        self.readers = [ShardReader(p) for root in roots for p in shard_paths(root)]
        if not self.readers:
            raise ReidgenError(f"no finished shards under {', '.join(map(str, roots))} (make some with "
                               f"reidgen generate)")
        for r in self.readers:
            LabelMap(tuple(r.manifest.label_map)).require_same(label_map, f"shard {r.path} vs the real data")
        self.transform, self.num_classes, self.strict = transform, len(label_map), strict
        self.image_size = tuple(image_size)
        self.offsets = [0]
        for r in self.readers:
            self.offsets.append(self.offsets[-1] + len(r))
        if self.offsets[-1] == 0:
            raise ReidgenError(f"the shards under {', '.join(map(str, roots))} hold no records")

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[ShardReader, int]:
        s = bisect.bisect_right(self.offsets, index) - 1
        return self.readers[s], index - self.offsets[s]

    def name(self, index: int) -> str:
        reader, i = self.locate(index)
        return f"{reader.path}#{reader.manifest.records[i].index}"

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        reader, i = self.locate(index)
        soft = torch.zeros(self.num_classes)
        try:
            meta, data = reader.record(i)
            # A record is input: its pixels are bounded before decoding and its labels checked (a
            # crafted shard with a 20000² image or a soft label of the wrong length is dropped).
            picture = decode_record(meta, data, self.num_classes)
        except CorruptRecord as exc:
            if self.strict:
                raise CorruptRecord(f"{self.name(index)}: {exc}") from None
            return torch.zeros(3, *self.image_size), soft, -1, -1, False, index
        if seed is None:
            image = self.transform(picture)
        else:  # augmentation keyed by the sample, as in trainer.feeds.data.ImageDataset
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.transform(picture)
        if meta.get("soft_label"):
            soft[torch.tensor(meta["soft_label"]["classes"])] = torch.tensor(meta["soft_label"]["probs"])
        return image, soft, meta["structure_label"], meta["appearance"]["label"], True, index
