from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import pickle
import tarfile
import threading

import pytest
import torch

from conftest import write_cifar_dir
from ddp import data


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_reads_official_layout_with_str_or_bytes_keys(tmp_path, bytes_keys):
    root = write_cifar_dir(tmp_path, per_batch=7, bytes_keys=bytes_keys)
    x, y = data.load_cifar("cifar10", root, train=True)
    assert x.shape == (35, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (35,) and y.dtype == torch.int64
    with open(root / data.DATASETS["cifar10"].folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    first = raw[b"data" if bytes_keys else "data"][0]
    # Row layout is channel-major: 1024 red, then green, then blue values of a 32x32 image.
    assert torch.equal(x[0], torch.from_numpy(first).view(3, 32, 32))
    test_x, _ = data.load_cifar("cifar10", root, train=False)
    assert test_x.shape == (7, 3, 32, 32)


class Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_batch_file_is_refused_and_its_payload_never_runs(tmp_path):
    root = write_cifar_dir(tmp_path)
    marker = tmp_path / "pwned"
    with open(root / data.DATASETS["cifar10"].folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": Payload(str(marker)), "labels": [0]}, f, protocol=2)
    with pytest.raises(data.DataError, match=r"data_batch_3 is not a CIFAR batch file \(refusing to load global io.open\)"):
        data.load_cifar("cifar10", root, train=True)
    assert not marker.exists()
    with open(root / data.DATASETS["cifar10"].folder / "data_batch_3", "rb") as f:  # the file really is armed
        pickle.load(f)
    assert marker.exists()


def test_missing_and_malformed_files_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(data.DataError, match="cifar-10-batches-py not found.*--download.*synthetic"):
        data.load_cifar("cifar10", tmp_path, train=True)
    root = write_cifar_dir(tmp_path)
    (root / data.DATASETS["cifar10"].folder / "test_batch").unlink()
    with pytest.raises(data.DataError, match="test_batch not found; get the data with --download"):
        data.load_cifar("cifar10", root, train=False)
    (root / data.DATASETS["cifar10"].folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="test_batch is not a CIFAR batch file"):
        data.load_cifar("cifar10", root, train=False)
    with open(root / data.DATASETS["cifar10"].folder / "test_batch", "wb") as f:
        pickle.dump({"data": [1, 2, 3], "labels": [0]}, f)
    with pytest.raises(data.DataError, match="test_batch: 'data' must be a uint8 array"):
        data.load_cifar("cifar10", root, train=False)


def test_cifar100_reads_fine_labels_and_refuses_labels_out_of_range(tmp_path):
    root = write_cifar_dir(tmp_path, per_batch=8, dataset="cifar100")
    x, y = data.load_cifar("cifar100", root, train=True)
    with open(root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert x.shape == (40, 3, 32, 32) and y.tolist() == raw["fine_labels"]  # the 100 classes, not the 20 coarse ones
    assert data.num_classes("cifar100") == 100 and data.load_cifar("cifar100", root, train=False)[0].shape[0] == 8
    raw["fine_labels"][0] = 100
    with open(root / "cifar-100-python" / "train", "wb") as f:
        pickle.dump(raw, f, protocol=2)
    with pytest.raises(data.DataError, match=r"train: labels must lie in 0\.\.99"):
        data.load_cifar("cifar100", root, train=True)
    with pytest.raises(data.DataError, match="cifar10 directory .* not found"):  # the other set is not there
        data.load_cifar("cifar10", root, train=True)


def test_download_fetches_over_http_checks_the_md5_and_unpacks(tmp_path, monkeypatch):
    """The real downloader against a local HTTP server holding a tiny archive in the official layout."""
    write_cifar_dir(tmp_path / "src", per_batch=4, dataset="cifar100")
    archive = tmp_path / "serve" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-100-python", arcname="cifar-100-python")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
        md5 = hashlib.md5(archive.read_bytes()).hexdigest()
        monkeypatch.setitem(data.DATASETS, "cifar100", dataclasses.replace(data.DATASETS["cifar100"], url=url, md5="0" * 32))
        with pytest.raises(data.DataError, match="does not have MD5 0+ .*delete it and run again"):  # a wrong checksum stops it
            data.download("cifar100", tmp_path / "bad")
        assert not (tmp_path / "bad" / "cifar-100-python").exists()
        monkeypatch.setitem(data.DATASETS, "cifar100", dataclasses.replace(data.DATASETS["cifar100"], url=url, md5=md5))
        data.download("cifar100", tmp_path / "good")
        server.shutdown()
    assert data.load_cifar("cifar100", tmp_path / "good", train=True)[0].shape == (20, 3, 32, 32)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_every_full_batch(world_size):
    n, batch = 1000, 96
    shards = [data.shard_epoch(n, batch, world_size, r, seed=5, epoch=2) for r in range(world_size)]
    steps = n // batch
    assert all(s.shape == (steps, batch // world_size) for s in shards)
    everything = torch.cat([s.flatten() for s in shards])
    assert len(everything.unique()) == len(everything) == steps * batch  # disjoint, no repeats
    # The global batch of a step is the same whatever the world size.
    one = data.shard_epoch(n, batch, 1, 0, seed=5, epoch=2)
    for step in range(steps):
        assert torch.equal(torch.cat([s[step] for s in shards]), one[step])


def test_shuffle_depends_only_on_seed_and_epoch():
    a = data.shard_epoch(100, 10, 1, 0, seed=1, epoch=0)
    assert torch.equal(a, data.shard_epoch(100, 10, 1, 0, seed=1, epoch=0))
    assert not torch.equal(a, data.shard_epoch(100, 10, 1, 0, seed=1, epoch=1))
    assert not torch.equal(a, data.shard_epoch(100, 10, 1, 0, seed=2, epoch=0))
    # seed and epoch are hashed together, so (0, 1) and (1, 0) are different streams
    assert not torch.equal(data.shard_epoch(100, 10, 1, 0, seed=0, epoch=1),
                           data.shard_epoch(100, 10, 1, 0, seed=1, epoch=0))


def test_augment_is_a_crop_of_the_reflection_padded_image_maybe_flipped():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = data.augment(images, data.make_generator(0, 1, 2, 3))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, data.augment(images, data.make_generator(0, 1, 2, 3)))
    padded = torch.nn.functional.pad(images.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    flips = 0
    for i in range(len(images)):
        crops = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(out[i], c) for c in crops)
        flipped = any(torch.equal(out[i], c.flip(2)) for c in crops)
        assert plain or flipped
        flips += flipped and not plain
    assert 10 < flips < 54  # about half are flipped


def test_given_flips_override_random_ones():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    flip = torch.arange(16) % 2 == 0
    out = data.augment(images, data.make_generator(0), flip, pad=0)
    assert torch.equal(out, torch.where(flip[:, None, None, None], images.flip(3), images))


def test_jitter_shifts_then_scales_each_image_within_its_ranges():
    # Two known values per image recover its shift s and scale c from (a + s) * c and (b + s) * c.
    x = torch.zeros(256, 3, 32, 32)
    x[:, :, :, 16:] = 1.0
    out = data.jitter(x, data.make_generator(0, 5), brightness=0.14, contrast=0.13)
    assert torch.equal(out, data.jitter(x, data.make_generator(0, 5), 0.14, 0.13))
    low, high = out[:, 0, 0, 0], out[:, 0, 0, 31]
    assert torch.equal(out[:, :, :, :16], low.view(-1, 1, 1, 1).expand(-1, 3, 32, 16))  # one shift and scale per image
    scale = high - low
    shift = low / scale
    assert scale.min() >= 0.87 and scale.max() <= 1.13 and scale.max() - scale.min() > 0.2
    assert shift.abs().max() <= 0.14 + 1e-6 and shift.max() - shift.min() > 0.2
    assert torch.equal(data.jitter(x, data.make_generator(0, 5), 0.0, 0.0), x)


def test_epoch_flips_alternate_each_image_from_a_random_half():
    first, second, third = (data.epoch_flips(1000, seed=0, epoch=e) for e in range(3))
    assert 400 < int(first.sum()) < 600
    assert torch.equal(second, ~first) and torch.equal(third, first)
    assert not torch.equal(first, data.epoch_flips(1000, seed=1, epoch=0))


def test_normalize_gives_float_channels_last_with_cifar_statistics():
    images = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    x = data.normalize(images)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    expected = (128 / 255 - data.CIFAR10_MEAN[0]) / data.CIFAR10_STD[0]
    assert x[0, 0, 0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_synthetic_data_is_deterministic_and_shares_classes_across_splits():
    x1, y1 = data.synthetic_cifar10(1000, train=True)
    x2, y2 = data.synthetic_cifar10(1000, train=True)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (1000, 3, 32, 32) and x1.dtype == torch.uint8
    tx, ty = data.synthetic_cifar10(1000, train=False)
    assert not torch.equal(tx[:100], x1[:100])

    def class_mean(x, y, c):
        return x[y == c].float().mean(0)

    # A class looks alike in both splits, and unlike other classes: the test set is learnable.
    for c in range(10):
        same = (class_mean(x1, y1, c) - class_mean(tx, ty, c)).abs().mean()
        other = (class_mean(x1, y1, c) - class_mean(tx, ty, (c + 1) % 10)).abs().mean()
        assert same < other / 2
