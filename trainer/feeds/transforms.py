"""The standard re-id training transforms, for any image size (256×128 paper, 128×64 CPU).

The inference transform is `reidgen.core.images.eval_transform`: the service uses it too.
"""
from __future__ import annotations

from torchvision import transforms as T

from reidgen.core.images import IMAGENET_MEAN, IMAGENET_STD


def train_transform(size: tuple[int, int], *, flip: bool = True, pad: int = 10,
                    erasing_p: float = 0.5) -> T.Compose:
    """Resize (bicubic), flip, edge-pad + random crop back to size, normalise, random erasing."""
    steps = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    if pad > 0:
        steps += [T.Pad(pad, padding_mode="edge"), T.RandomCrop(size)]
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if erasing_p > 0:
        # Erase with zeros of the normalised space, i.e. the data set's mean colour.
        steps.append(T.RandomErasing(p=erasing_p, value=0))
    return T.Compose(steps)
