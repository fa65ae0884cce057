"""CIFAR-10 and CIFAR-100 as uint8 tensors in memory: a safe reader, synthetic data, sharding, augmentation.

Nothing here knows about torch.distributed: rank and world size come in as numbers. Randomness is a
pure function of (seed, epoch, step, rank), so resuming needs only those counters.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-100's are within 0.02: one normalisation serves both
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Dataset:
    """Where a CIFAR set lives in its official python layout, and how to fetch it."""

    num_classes: int
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    labels_key: str
    url: str
    md5: str


DATASETS = {
    "cifar10": Dataset(10, "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                       "labels", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "c58f30108f718f92721af3b95e74349a"),
    "cifar100": Dataset(100, "cifar-100-python", ("train",), ("test",), "fine_labels",
                        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
DATASET_CHOICES = [*DATASETS, "synthetic"]
TRAIN_SIZE = 50_000  # of both CIFAR sets
GET_DATA_HINT = "get the data with --download, or train on --dataset synthetic"


def num_classes(dataset: str) -> int:
    """Classes of a --dataset choice (synthetic data has CIFAR-10's 10)."""
    return DATASETS[dataset].num_classes if dataset in DATASETS else 10


class DataError(RuntimeError):
    """A data file is missing or not in the CIFAR python layout."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch format and nothing else: numpy arrays, lists, dicts, strings.

    A plain pickle.load would import and call any global the file names, so a crafted batch file
    could run code. Only the globals that numpy array reconstruction needs are allowed.
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        # numpy 2 moved numpy.core to numpy._core; old pickles name the old path.
        module = module.replace("numpy.core", "numpy._core") if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_batch_file(path: Path, labels_key: str = "labels", num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR batch file into (uint8 images N x 3 x 32 x 32, int64 labels N)."""
    if not path.is_file():
        raise DataError(f"CIFAR file {path} not found; {GET_DATA_HINT}")
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 -- any failure to unpickle means a bad file
        raise DataError(f"{path} is not a CIFAR batch file ({e}); {GET_DATA_HINT}") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, not a CIFAR batch dict")
    # Python 2 pickles give str keys under latin1; Python 3 ones written with bytes keys stay bytes.
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get(labels_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape N x 3072; {GET_DATA_HINT}")
    if labels is None or len(labels) != len(data):
        raise DataError(f"{path}: {labels_key!r} missing or not one per image; {GET_DATA_HINT}")
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in 0..{num_classes - 1}")
    return torch.from_numpy(data.copy()).view(-1, 3, 32, 32), labels


def load_cifar(dataset: str, data_dir: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The train or test split of "cifar10" or "cifar100" from its folder in `data_dir`, as uint8 tensors."""
    spec = DATASETS[dataset]
    root = Path(data_dir) / spec.folder
    if not root.is_dir():
        raise DataError(f"{dataset} directory {root} not found; {GET_DATA_HINT}")
    parts = [read_batch_file(root / name, spec.labels_key, spec.num_classes)
             for name in (spec.train_files if train else spec.test_files)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def download(dataset: str, data_dir: str | Path) -> None:
    """Fetch and unpack the official archive, checked against its MD5 (torchvision's downloader)."""
    from torchvision.datasets.utils import download_and_extract_archive

    spec = DATASETS[dataset]
    if (Path(data_dir) / spec.folder).is_dir():
        return
    archive = Path(data_dir) / spec.url.rsplit("/", 1)[1]
    try:
        download_and_extract_archive(spec.url, str(data_dir), md5=spec.md5)
    except RuntimeError as e:  # torchvision's words for a checksum mismatch
        raise DataError(f"{archive} from {spec.url} does not have MD5 {spec.md5} ({e}); delete it and run "
                        "again with --download") from None
    except OSError as e:
        raise DataError(f"could not download {spec.url} ({e}); fetch it another way and unpack it into "
                        f"{data_dir}/, or train on --dataset synthetic") from None


def synthetic_cifar10(n: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic, learnable stand-in: each class is a fixed smooth pattern plus noise.

    The class patterns are the same for both splits; the samples differ between them.
    """
    templates = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    templates = F.interpolate(templates, size=32, mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(1 if train else 2)
    labels = torch.randint(0, 10, (n,), generator=g)
    noise = torch.randn(n, 3, 32, 32, generator=g) * 0.25
    images = (templates[labels] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
    return images, labels


def load_split(dataset: str, data_dir: str | Path, synthetic_size: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of `--dataset` as (uint8 images, int64 labels); the synthetic test set is a fifth as large."""
    if dataset == "synthetic":
        return synthetic_cifar10(synthetic_size if train else max(synthetic_size // 5, 1), train=train)
    return load_cifar(dataset, data_dir, train=train)


def make_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, *keys), so that streams never overlap."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def shard_epoch(
    n: int, global_batch: int, world_size: int, rank: int, seed: int, epoch: int
) -> torch.Tensor:
    """This rank's sample indices for one epoch, shape (steps, global_batch // world_size).

    The epoch's permutation depends only on (seed, epoch), like DistributedSampler.set_epoch. Step s
    uses the global batch perm[s*B:(s+1)*B] and rank r takes its r-th slice, so the ranks are
    disjoint, together cover every full batch, and the global batch of a step does not depend on the
    world size (which lets a run resume at another world size). The last partial batch is dropped,
    so every rank takes the same number of steps.
    """
    steps = n // global_batch
    perm = torch.randperm(n, generator=make_generator(seed, epoch))[: steps * global_batch]
    return perm.view(steps, world_size, global_batch // world_size)[:, rank]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float, normalised by CIFAR-10's channel statistics, channels_last."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1) * 255
    x = (images.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


def epoch_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Which of the n training images to mirror in this epoch: a random half in epoch 0, then each alternates.

    Alternating (from airbench) shows every image both ways in any two consecutive epochs, where coin
    flips would repeat a view a quarter of the time.
    """
    return torch.rand(n, generator=make_generator(seed, "flips")).lt(0.5) ^ bool(epoch % 2)


def augment(images: torch.Tensor, generator: torch.Generator, flip: torch.Tensor | None = None,
            pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` pixels (reflection padding) and horizontal flip of a uint8 batch.

    Random numbers come from a CPU generator (a few per image), so CPU and GPU runs see the same
    augmentation; the pixel work happens on the images' device. `flip` (bool per image) overrides
    random flips.
    """
    n, c, h, w = images.shape
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(images.device)
    if flip is None:
        flip = torch.rand(n, generator=generator).lt(0.5)
    flip = flip.to(images.device)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    rows = dy + torch.arange(h, device=images.device)  # n x h: the crop's rows in the padded image
    cols = torch.arange(w, device=images.device).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx  # a flip is a reversed column order
    # One gather over each padded image's flattened pixels (7x faster than 4-way advanced indexing).
    pixel = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, pixel).view(n, c, h, w)


def jitter(x: torch.Tensor, generator: torch.Generator, brightness: float, contrast: float) -> torch.Tensor:
    """Per image of a normalised batch: add a shift drawn from [-brightness, brightness], then scale by a
    factor drawn from [1 - contrast, 1 + contrast] (hiverge's colour jitter). Random numbers as in `augment`."""
    n = len(x)
    shift = (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * brightness
    scale = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * contrast
    return (x + shift.to(x.device)) * scale.to(x.device)
