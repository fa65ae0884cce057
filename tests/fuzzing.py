"""Structure-aware mutations of real checkpoints of every layout, for the fuzz test and benchmarks/fuzz.py.

A seeded random.Random picks a real checkpoint (tests/craft.py writes one of each layout) and one to three
mutations that know its structure:

    pickle   data.pkl of a torch zip, the main pickle of a legacy file, a DCP .metadata: an opcode deleted,
             duplicated or swapped, an int made huge/negative/zero, a string made hostile, or a fragment
             inserted that calls an allowlisted callable with crafted arguments (forged numpy arrays,
             huge bytearrays, set(range(huge)), nested slices, codecs, tensors with crafted sizes/strides)
    zip      central directory fields (method, flags, sizes, offsets, name length), record names,
             duplicated records, records dropped, compressed records
    json     safetensors headers (dtype, shape, offsets, metadata: MODULE:NAME, huge num_classes, escapes)
             and shard indexes (weight_map values naming itself, other indexes, ../, many spellings)
    files    a shard or storage file replaced by a symlink outside or a FIFO, a file truncated
    bytes    flips and truncations anywhere

Every mutant is written to a directory of its own, with a secret planted beside it (never to come back).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import random
import shutil
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

import craft
import hostile
from craft import Pickle

INTS = [0, 1, -1, 2, 255, 256, 2**31 - 1, 2**31, -(2**31), 2**32, 2**40, 2**62, 2**63 - 1, -(2**63), 2**64, 10**30]
STRINGS = ["", "..", "../secret.safetensors", "x1/../x", "\x1b[2J\x1b[H", "meta", "cuda:7", "os", "system",
           "colorsys:net", f"{hostile.MARKER_MODULE}:net", "model.safetensors.index.json", "A" * 5000, "\udcff",
           "storage", "ddp-cifar/1", "ddp-cifar-weights/1", "fastnet_small", "num_classes"]


def _fragments() -> list[bytes]:
    """Opcode fragments that each leave one object on the stack."""
    out = [
        craft.forged_object_array().body(),
        Pickle().g("builtins", "bytearray").i(1 << 33).tuple(1).reduce().body(),
        Pickle().g("builtins", "set").g("builtins", "range").i(1 << 33).tuple(1).reduce().tuple(1).reduce().body(),
        Pickle().g("_codecs", "encode").s("x").s("rot13").tuple(2).reduce().body(),
        Pickle().g("builtins", "slice").none().tuple(1).reduce().body(),
        Pickle().g("hostile_lib", "Thing").tuple(0).reduce().body(),
        Pickle().g("os", "system").s("true").tuple(1).reduce().body(),
        Pickle().g("numpy", "dtype").s("O8").false().true().tuple(3).reduce().body(),
        Pickle().g("collections", "OrderedDict").tuple(0).reduce().body(),
        Pickle().g("torch", "Size").ints(1 << 40).tuple(1).reduce().body(),
        Pickle().tensor("0", 1, (1 << 40,), (0,)).body(),
        Pickle().tensor("0", 4, (2, 2), (-1, 1)).body(),
        Pickle().tensor("0", 1 << 40, (4,), (1,)).body(),
        Pickle().tensor("0", 4, (4,), (1,), location="meta").body(),
        Pickle().tensor("missing", 4, (4,), (1,)).body(),
        Pickle().g("torch._utils", "_rebuild_sparse_tensor").g("torch", "sparse_coo").mark()
        .tensor("0", 2, (1, 2), (2, 1), storage="LongStorage").tensor("0", 2, (2,), (1,))
        .ints(4).tuple().tuple(2).reduce().body(),
    ]
    deep = Pickle()
    for _ in range(20_000):
        deep.mark()
    out.append(deep.none().raw(b"t" * 20_000).body())
    return out


FRAGMENTS = _fragments()


def mutate_pickle(data: bytes, rng: random.Random) -> bytes:
    """One opcode-level change to a protocol-2 pickle (no frames: positions can shift freely)."""
    ops = list(pickletools.genops(data))
    k = rng.randrange(len(ops))
    op, _, pos = ops[k]
    end = ops[k + 1][2] if k + 1 < len(ops) else len(data)
    choice = rng.random()
    if choice < 0.25 and op.name in ("BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT"):
        new = Pickle().i(rng.choice(INTS)) if op.name != "BINFLOAT" else Pickle().f(
            rng.choice([float("inf"), float("nan"), -1e308, 1e308]))
        return data[:pos] + new.body() + data[end:]
    if choice < 0.45 and op.name in ("BINUNICODE", "SHORT_BINSTRING"):
        return data[:pos] + Pickle().s(rng.choice(STRINGS)).body() + data[end:]
    if choice < 0.7:
        return data[:pos] + rng.choice(FRAGMENTS) + data[pos:]  # pushes one more object
    if choice < 0.8:
        return data[:pos] + data[end:]  # drop the opcode
    if choice < 0.9:
        return data[:pos] + data[pos:end] * rng.choice([2, 3, 1000]) + data[end:]
    k2 = rng.randrange(len(ops))
    a, b = sorted((k, k2))
    if a == b:
        return data
    a_end = ops[a + 1][2]
    b_end = ops[b + 1][2] if b + 1 < len(ops) else len(data)
    return data[:ops[a][2]] + data[ops[b][2]:b_end] + data[a_end:ops[b][2]] + data[ops[a][2]:a_end] + data[b_end:]


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    if not data:
        return bytes(data)
    if rng.random() < 0.3:
        return bytes(data[:rng.randrange(len(data))])
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def _records(path: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(info, z.read(info.filename)) for info in z.infolist()]


def mutate_zip(path: Path, rng: random.Random) -> None:
    records = _records(path)
    choice = rng.random()
    if choice < 0.55:  # the pickle inside, then a valid zip again (CRCs right: the reader must judge the pickle)
        records = [(i, mutate_pickle(d, rng) if i.filename.endswith("data.pkl") else d) for i, d in records]
    elif choice < 0.65:  # a storage record changed in length
        k = rng.randrange(len(records))
        info, data = records[k]
        records[k] = (info, data[: len(data) // 2] if rng.random() < 0.5 else data * 3)
    elif choice < 0.75:
        k = rng.randrange(len(records))
        info, data = records[k]
        info.filename = rng.choice(["../evil", "archive/data/../data.pkl", "", "\x1b[2J", "archive/data/0",
                                    records[0][0].filename, "other/data.pkl"])
        records[k] = (info, data)
    elif choice < 0.85:
        records = records + [rng.choice(records)] * rng.choice([1, 50])
    else:
        del records[rng.randrange(len(records))]
    method = zipfile.ZIP_DEFLATED if rng.random() < 0.1 else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": that is the point
        for info, data in records:
            info.compress_type = method
            z.writestr(info, data)
    if rng.random() < 0.3:  # and maybe a field of the central directory
        data = bytearray(path.read_bytes())
        at = data.rfind(b"PK\x01\x02")
        field, width = rng.choice([(8, 2), (10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (42, 4)])
        data[at + field:at + field + width] = rng.randrange(256 ** width).to_bytes(width, "little")
        path.write_bytes(bytes(data))


def mutate_legacy(path: Path, rng: random.Random) -> None:
    data = path.read_bytes()
    f = io.BytesIO(data)
    for _ in range(3):  # magic, protocol version, sys_info
        pickle.load(f)
    start = f.tell()
    end = start + max(pos for _, _, pos in pickletools.genops(data[start:])) + 1
    path.write_bytes(data[:start] + mutate_pickle(data[start:end - 1], rng) + b"." + data[end:]
                     if rng.random() < 0.8 else flip_bytes(data, rng))


def mutate_safetensors(path: Path, rng: random.Random) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    keys = [k for k in header if k != "__metadata__"]
    choice = rng.random()
    if choice < 0.4 and keys:
        entry = header[rng.choice(keys)]
        field = rng.choice(["dtype", "shape", "data_offsets"])
        entry[field] = {"dtype": lambda: rng.choice(["F64", "BOOL", "F8_E4M3", "X", 7, None]),
                        "shape": lambda: rng.choice([[rng.choice(INTS)], [], [-1], [0], [2**31, 2**31], "4"]),
                        "data_offsets": lambda: rng.choice([[0, 2**62], [10, 0], [-4, 4], [0, len(body) + 8],
                                                            [0, 0], [1.5, 2]])}[field]()
    elif choice < 0.75:
        meta = header.setdefault("__metadata__", {})
        key = rng.choice(["model_name", "num_classes", "dataset", "format"])
        meta[key] = rng.choice(STRINGS + [str(rng.choice(INTS)), "[1, 2]", "null", "1e999"])
    elif choice < 0.85:
        header.update({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                       for i in range(rng.choice([10, 5000]))})
    else:
        blob = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", rng.choice([len(blob) + 1, 2**63, 0])) + blob + body)
        return
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def mutate_sharded(directory: Path, rng: random.Random) -> None:
    index = next(directory.glob("*.index.json"))
    shards = sorted(p for p in directory.iterdir() if p.name.endswith(".safetensors"))
    choice = rng.random()
    if choice < 0.45:
        doc = json.loads(index.read_text())
        keys = list(doc["weight_map"])
        k = rng.choice(keys)
        doc["weight_map"][k] = rng.choice([index.name, "../secret.safetensors", 5, None, ["a"],
                                           f"x/../{shards[0].name}", "missing.safetensors", "\x1b[2J"])
        if rng.random() < 0.2:
            doc["weight_map"].update({f"extra{i}": f"x{i}/../{shards[0].name}" for i in range(200)})
        if rng.random() < 0.1:
            doc["weight_map"] = rng.choice([[], "x", 3, None])
        index.write_text(json.dumps(doc))
    elif choice < 0.7:
        mutate_safetensors(rng.choice(shards), rng)
    elif choice < 0.8:
        shard = rng.choice(shards)
        shard.unlink()
        shard.symlink_to(directory.parent / "secret.safetensors")
    elif choice < 0.85:
        shard = rng.choice(shards)
        shard.unlink()
        os.mkfifo(shard)
    else:
        shard = rng.choice(shards)
        if shard.is_file() and not shard.is_symlink():  # an earlier round may have made it a FIFO: never read that
            shard.write_bytes(flip_bytes(shard.read_bytes(), rng))


def mutate_dcp(directory: Path, rng: random.Random) -> None:
    meta_path = directory / ".metadata"
    choice = rng.random()
    if choice < 0.5:  # the Metadata as objects (we wrote it: unpickling it here is safe), then re-pickled
        meta = pickle.loads(meta_path.read_bytes())
        entries = list(meta.state_dict_metadata.values())
        infos = list(meta.storage_data.values())
        what = rng.randrange(5)
        if what == 0 and infos:
            info = rng.choice(infos)
            info.offset, info.length = rng.choice([(0, 10**12), (-5, 5), (float("inf"), 1), (2**63, 1), (0, -1)])
        elif what == 1 and infos:
            rng.choice(infos).relative_path = rng.choice(["../secret.safetensors", "x/../__0_0.distcp",
                                                          ".metadata", "/etc/passwd", "__1_0.distcp"])
        elif what == 2 and entries:
            entry = rng.choice([e for e in entries if hasattr(e, "size")] or entries)
            if hasattr(entry, "size"):
                entry.size = torch.Size([rng.choice([0, 1, 2**40, 2**62])])
        elif what == 3 and entries:
            entry = rng.choice([e for e in entries if hasattr(e, "chunks")] or entries)
            for chunk in getattr(entry, "chunks", []):
                chunk.offsets = torch.Size([rng.choice([-3, 1, 2**40]) for _ in chunk.offsets])
        else:
            meta.planner_data = {k: rng.choice([("a", 0), ("a", 2**40), (), ("model", "x", "y")])
                                 for k in meta.state_dict_metadata}
        data = pickle.dumps(meta, protocol=2)
        meta_path.write_bytes(mutate_pickle(data, rng) if rng.random() < 0.3 else data)
    elif choice < 0.75:
        meta_path.write_bytes(mutate_pickle(pickle.dumps(pickle.loads(meta_path.read_bytes()), protocol=2), rng))
    elif choice < 0.85:
        storage = next(directory.glob("*.distcp"))
        if storage.is_file() and not storage.is_symlink():  # not a FIFO an earlier round made
            storage.write_bytes(flip_bytes(storage.read_bytes(), rng))
    elif choice < 0.9:
        storage = next(directory.glob("*.distcp"))
        storage.unlink()
        os.mkfifo(storage)
    else:
        meta_path.unlink()
        meta_path.symlink_to(directory.parent / "secret.safetensors")


def mutate_file(path: Path, rng: random.Random) -> None:
    if zipfile.is_zipfile(path) and rng.random() < 0.85:
        mutate_zip(path, rng)
    elif path.suffix == ".safetensors" and rng.random() < 0.85:
        mutate_safetensors(path, rng)
    elif path.name.startswith("legacy") and rng.random() < 0.85:
        mutate_legacy(path, rng)
    else:
        path.write_bytes(flip_bytes(path.read_bytes(), rng))


MUTATORS: dict[str, Callable[[Path, random.Random], None]] = {"sharded": mutate_sharded, "dcp": mutate_dcp}


def seeds(directory: Path) -> dict[str, Path]:
    """The real checkpoints mutants start from: every layout, with fastnet_small's weights."""
    return craft.real_checkpoints(directory)


def mutant(seed_paths: dict[str, Path], out: Path, rng: random.Random) -> tuple[str, Path]:
    """Write one mutant into `out` (a new directory): (what it started from, the path to give the readers)."""
    layout = rng.choice(sorted(seed_paths))
    source = seed_paths[layout]
    out.mkdir(parents=True)
    hostile._secret_safetensors(out / "secret.safetensors")
    target = out / "ckpt" / source.name if source.is_dir() else out / source.name
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
    rounds = 1 if layout == "dcp" else rng.choice([1, 1, 1, 2, 3])  # DCP's Metadata is unpickled: only pristine
    for _ in range(rounds):
        try:
            MUTATORS.get(layout, mutate_file)(target, rng)
        except Exception:  # noqa: BLE001 -- an earlier mutation left nothing this one can parse: keep what we have
            break
    return layout, target


# ----------------------------------------------------------------------------- a campaign


def _copy(src: Path, dst: Path) -> None:
    """Copy a reproducer as it is: symlinks as symlinks, FIFOs as FIFOs (never opened)."""
    import stat

    def copy(s: str, d: str) -> None:
        if stat.S_ISFIFO(os.lstat(s).st_mode):
            os.mkfifo(d)
        else:
            shutil.copy2(s, d, follow_symlinks=False)

    shutil.copytree(src, dst, symlinks=True, copy_function=copy)


def campaign(root: Path, *, seed: int = 0, cases: int | None = None, seconds: float | None = None,
             entries_per_case: int = 3, timeout: float = 10.0, out: Path | None = None, batch: int = 16,
             log: Callable[[str], None] = lambda _: None) -> dict:
    """Mutants until `cases` or `seconds` run out, each through `entries_per_case` random entry points.

    Returns {"cases", "runs", "outcomes" (signature -> count), "findings" [(case, Outcome)], "longest_clean"}.
    Reproducers of findings are copied under `out` (a directory per mutant, with outcome.json).
    """
    import time
    from dataclasses import asdict

    from sandbox_run import ENTRIES, Job, Sandbox

    rng, start = random.Random(seed), time.monotonic()
    box = Sandbox(root, timeout=timeout)
    seed_paths = seeds(root / "seeds")
    box.warm_up(list(seed_paths.values()))
    entries = [e for e in ENTRIES if e != "evaluate"]  # evaluate costs a process group per run: see test_hostile
    stats: dict = {"cases": 0, "runs": 0, "outcomes": {}, "findings": [], "longest_clean": 0}
    clean = 0
    while (cases is None or stats["cases"] < cases) and (seconds is None or time.monotonic() - start < seconds):
        n = batch if cases is None else min(batch, cases - stats["cases"])
        made = []
        for _ in range(n):
            name = f"m{stats['cases'] + len(made):06d}"
            layout, path = mutant(seed_paths, root / "mutants" / name, rng)
            made.append((name, layout, path, rng.sample(entries, entries_per_case)))
        jobs = [Job(name, e, path, root / "mutants" / name, secret=hostile.SECRET)
                for name, _, path, chosen in made for e in chosen]
        results: dict[str, list] = {}
        for o in box.run(jobs, skip_after_timeout=True):
            results.setdefault(o.case, []).append(o)
        for name, layout, path, _ in made:
            stats["cases"] += 1
            bad = [o for o in results.get(name, []) if not o.ok]
            for o in results.get(name, []):
                stats["runs"] += 1
                sig = f"{layout}|{o.signature}"
                stats["outcomes"][sig] = stats["outcomes"].get(sig, 0) + 1
            clean = 0 if bad else clean + 1
            stats["longest_clean"] = max(stats["longest_clean"], clean)
            for o in bad:
                if o.finding == "skipped":  # after another entry point's timeout: that one is the finding
                    continue
                stats["findings"].append((name, o))
                log(f"finding {name} ({layout}): {o.entry}: {o.finding}: {o.detail[:160]}")
            if bad and out is not None:
                dest = out / f"{name}-{layout}-{bad[0].entry}-{bad[0].finding}"
                _copy(root / "mutants" / name, dest)
                given = path.relative_to(root / "mutants" / name)  # what to pass: python tests/sandbox_run.py DEST/GIVEN
                (dest / "outcome.json").write_text(json.dumps({"path": str(given), "layout": layout,
                                                               "outcomes": [asdict(o) for o in bad]}, indent=1))
            shutil.rmtree(root / "mutants" / name, ignore_errors=True)
        shutil.rmtree(root / "runs", ignore_errors=True)
    return stats
