"""Image data sets for training and evaluation.

Augmentation randomness is keyed by the sample, not by the process: the batch samplers hand
each index out together with a seed, so a resumed run sees exactly the same augmented images
as an uninterrupted one, whatever the number of loader workers.

An unreadable image never crashes a run mid-epoch: the data set returns a blank tensor with
``ok = False`` and the consumer drops it and reports it
(`reidgen.core.images.UnreadableImages`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from reidgen.core.images import UnreadableImage, decode_image
from reidgen.core.market import Item, LabelMap


class ImageDataset(Dataset):
    """Items of a Market split as tensors: ``image, label, index, ok``.

    Index with an int, or with ``(index, seed)`` to make the random transform reproducible.
    ``label`` is the class index from ``label_map`` (``-1`` without one).
    """

    def __init__(self, items: list[Item], transform: Callable, label_map: LabelMap | None = None,
                 image_size: tuple[int, int] = (128, 64)):
        self.items = items
        self.transform = transform
        self.image_size = image_size
        self.labels = [label_map.index(it.pid) if label_map else -1 for it in items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        item = self.items[index]
        try:
            image = decode_image(item.path)
        except UnreadableImage:
            blank = torch.zeros(3, *self.image_size)
            return blank, self.labels[index], index, False
        if seed is None:
            tensor = self.transform(image)
        else:
            # fork_rng keeps the caller's RNG (dropout, sampling) untouched by augmentation.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                tensor = self.transform(image)
        return tensor, self.labels[index], index, True


class MaskedImageDataset(Dataset):
    """Images with their person masks (from a `MaskCache`), flipped together: ``image, mask,
    label, camera, ok``. Index with ``(index, seed)`` like `ImageDataset`."""

    def __init__(self, items: list[Item], cache, image_size: tuple[int, int], labels: list[int],
                 cameras: list[int], flip: bool = True):
        from reidgen.core.images import eval_transform

        self.items, self.cache, self.image_size = items, cache, image_size
        self.labels, self.cameras, self.flip = labels, cameras, flip
        self.transform = eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        item = self.items[index]
        h, w = self.image_size
        try:
            image = self.transform(decode_image(item.path))
            mask = torch.from_numpy(self.cache.load(item.path))[None, None]
        except (UnreadableImage, OSError):
            return torch.zeros(3, h, w), torch.zeros(1, h, w), self.labels[index], self.cameras[index], False
        mask = torch.nn.functional.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)[0]
        if self.flip and seed is not None and seed % 2 == 1:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask, self.labels[index], self.cameras[index], True


def epoch_loader(dataset: Dataset, batch_sampler, workers: int, device: torch.device) -> DataLoader:
    """A DataLoader over one epoch of a seeded batch sampler.

    It gets a private generator: a loader must not draw from the global RNG that dropout uses,
    or a resumed run would diverge from an uninterrupted one.
    """
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                      generator=torch.Generator().manual_seed(0), pin_memory=device.type == "cuda")


def endless_batches(make_loader, samplers: list, start_step: int):
    """Batches from several seeded batch samplers, zipped, forever, from ``start_step`` on.

    Each sampler is its own stream (epochs of different lengths are fine): batch k of a sampler
    with n batches per epoch is batch k mod n of epoch k // n, so a resumed run continues
    exactly. ``make_loader(sampler)`` builds the DataLoader of one epoch.
    """
    def stream(sampler):
        k = start_step
        while True:
            sampler.set_epoch(k // len(sampler), k % len(sampler))
            for batch in make_loader(sampler):
                k += 1
                yield batch

    return zip(*(stream(s) for s in samplers))
