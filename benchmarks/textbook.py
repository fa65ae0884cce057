"""The textbook CIFAR-10 input pipeline, our baseline: torchvision's CIFAR10 dataset, PIL transforms, a DataLoader.

The dataset is torchvision's own `CIFAR10` class (its `__getitem__`: numpy HWC uint8 -> PIL image ->
transforms), filled from the same uint8 arrays our loader uses; torchvision's constructor is skipped
only because it insists on the official files' MD5 sums, which the shared JPEG-decoded copy lacks.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms
from torchvision.datasets import CIFAR10

from ddp.data import CIFAR10_MEAN, CIFAR10_STD


class InMemoryCIFAR10(CIFAR10):
    """torchvision's CIFAR10 (same __getitem__, same storage layout) over images already in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: transforms.Compose):
        # what CIFAR10.__init__ leaves behind: data as N x 32 x 32 x 3 uint8 numpy, targets as a list of int
        self.root, self.train = "(in memory)", True
        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = labels.tolist()
        self.transform, self.target_transform, self.transforms = transform, None, None


def train_transform() -> transforms.Compose:
    """The pytorch/examples way (crop, flip, normalise) with our trainer's augmentation: 2-pixel reflect padding.

    The tutorials pad 4 pixels with zeros; the cost is the same, and so both sides of a comparison do
    the same work.
    """
    return transforms.Compose([
        transforms.RandomCrop(32, padding=2, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
    ])


def train_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, workers: int,
                 sampler: Sampler | None = None) -> DataLoader:
    """DataLoader over the textbook dataset: shuffled (or by `sampler`), drop_last, `workers` worker processes."""
    dataset = InMemoryCIFAR10(images, labels, train_transform())
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                      num_workers=workers, drop_last=True)
