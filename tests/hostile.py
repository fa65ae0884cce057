"""Hand-made hostile checkpoints, one small generator per case, for every class of issue 17.

Each generator gets an empty directory of its own and returns the path to give the entry points. A case may
plant a secret outside that path (it must never come back), ask that every loaded tensor hold one value
(anything else is memory the file never wrote), or be run as if from the directory holding the file
(`python -m` puts the cwd on sys.path: what a file beside the checkpoint could then be imported as).
"""

from __future__ import annotations

import json
import os
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from craft import (
    FORGED,
    Pickle,
    dcp_dir,
    forged_object_array,
    legacy_file,
    ours,
    safetensors_file,
    saved_with,
    small_state,
    torch_zip,
    write_zip,
)

SECRET = "OUTSIDE_SECRET_7f3a"  # planted outside the given path; seeing it come back is a finding
MARKER_MODULE = "hostile_marker_mod"  # a module beside the checkpoint that writes a file when imported


@dataclass
class Case:
    name: str
    cls: str  # the class of issue 17 it belongs to
    make: Callable[[Path], Path]
    secret: bool = False
    fill: float | None = None
    beside: bool = False  # run as if from the directory of the file

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        return self.make(directory)


CASES: list[Case] = []


def case(cls: str, **kw):
    def register(make: Callable[[Path], Path]) -> Callable[[Path], Path]:
        CASES.append(Case(make.__name__, cls, make, **kw))
        return make

    return register


def forged_state(d: Path, where: str) -> Path:
    """{"format": <object array of forged pointers>, "model": {...}}: the comparison with our format names
    dereferences the pointers, from every entry point."""
    obj = {"format": FORGED, "model": small_state()}
    fragment = forged_object_array().body()
    if where == "inert":  # a class beyond the allowlist sends the zip to the inert unpickler
        obj["config"] = "@@CLASS@@"
        cls = Pickle().g("hostile_lib", "Config").tuple(0).reduce().body()
        return saved_with(d / "ckpt.pt", obj, {FORGED: fragment, "@@CLASS@@": cls})
    return saved_with(d / "ckpt.pt", obj, {FORGED: fragment}, legacy=where == "legacy")


# ----------------------------------------------------------------------------- memory corruption


@case("memory corruption")
def numpy_forged_dtype_allowlist(d: Path) -> Path:
    return forged_state(d, "allowlist")


@case("memory corruption")
def numpy_forged_dtype_inert(d: Path) -> Path:
    return forged_state(d, "inert")


@case("memory corruption")
def numpy_forged_dtype_legacy(d: Path) -> Path:
    return forged_state(d, "legacy")


@case("memory corruption")
def numpy_forged_dtype_dcp(d: Path) -> Path:
    def edit(meta) -> None:
        meta.state_dict_metadata["w"].size = FORGED  # tuple(md["size"]) reads the forged pointers

    return dcp_dir(d / "ckpt", {"w": ([4], [([0], torch.ones(4))])}, edit, {FORGED: forged_object_array().body()})


@case("memory corruption")
def numpy_forged_itemsize(d: Path) -> Path:
    """A V8 array built from 8 bytes, then its dtype's itemsize set to 2**40 (the array's dtype is memoised):
    [array, dtype] in a list, as the weights-only unpickler has no POP."""
    p = Pickle().list()
    p.g("numpy", "dtype").s("V8").false().true().tuple(3).reduce().put(200).append()
    p.g("numpy.core.multiarray", "_reconstruct").g("numpy", "ndarray").ints(0).by(b"b").tuple(3).reduce()
    p.mark().i(1).ints(1).get(200).false().by(b"A" * 8).tuple().build().append()
    p.get(200).mark().i(3).s("|").none().none().none().i(1 << 40).i(1).i(0).tuple().build().append()
    return saved_with(d / "ckpt.pt", {"format": FORGED, "model": small_state()}, {FORGED: p.body()})


@case("memory corruption", fill=1.0)
def ndarray_setstate_twice(d: Path) -> Path:
    """ndarray.__setstate__ run twice on one array: the buffer of the first state is released under the second."""
    p = Pickle().list()
    p.g("numpy.core.multiarray", "_reconstruct").g("numpy", "ndarray").ints(0).by(b"b").tuple(3).reduce().put(200)
    p.mark().i(1).ints(512).g("numpy", "dtype").s("f4").false().true().tuple(3).reduce()
    p.false().by(b"\x00\x00\x80?" * 512).tuple().build().append()
    p.get(200).mark().i(1).ints(1 << 20).g("numpy", "dtype").s("f4").false().true().tuple(3).reduce()
    p.false().by(b"\x00\x00\x80?" * 4).tuple().build().append()
    return saved_with(d / "ckpt.pt", {"model": small_state(), "extra": FORGED}, {FORGED: p.body()})


def _sparse_out_of_range(d: Path, inert: bool) -> Path:
    """A sparse COO tensor of size 4 whose second index is 2**40; with a foreign class, read by the inert path."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse invariant checks are implicitly disabled"
        sparse = torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.ones(2), (4,))
    obj = {"w": sparse, **({"config": FORGED} if inert else {})}
    cls = Pickle().g("hostile_lib", "Config").tuple(0).reduce().body()
    path = saved_with(d / "ckpt.pt", obj, {FORGED: cls} if inert else {})
    with zipfile.ZipFile(path) as z:
        records = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
    index = torch.frombuffer(bytearray(records["data/0"]), dtype=torch.int64).clone()
    index[1] = 1 << 40  # the second index: far outside a tensor of 4
    records["data/0"] = index.numpy().tobytes()
    return write_zip(path, records)


@case("memory corruption")
def numpy_scalar_forged_object(d: Path) -> Path:
    """numpy.core.multiarray.scalar(<object dtype with its flags cleared>, 8 raw bytes): a forged pointer."""
    p = Pickle().g("numpy.core.multiarray", "scalar")
    p.g("numpy", "dtype").s("O8").false().true().tuple(3).reduce()
    p.mark().i(3).s("|").none().none().none().i(-1).i(-1).i(0).tuple().build()
    p.by(b"\x41" * 8).tuple(2).reduce()
    return saved_with(d / "ckpt.pt", {"format": FORGED, "model": small_state()}, {FORGED: p.body()})


@case("memory corruption")
def sparse_coo_out_of_range(d: Path) -> Path:
    return _sparse_out_of_range(d, inert=False)


@case("memory corruption")
def sparse_coo_out_of_range_inert(d: Path) -> Path:
    return _sparse_out_of_range(d, inert=True)


def _deep(d: Path, opener: Callable[[Pickle, int], None], closer: bytes, depth: int, inert: bool = False) -> Path:
    """A structure `depth` levels deep under "extra"; with inert, a foreign class first sends the zip to the
    inert unpickler (torch's weights-only one takes ~80 us per REDUCE: a flood of its own)."""
    p = Pickle()
    for level in range(depth):
        opener(p, level)
    p.none().raw(closer * depth)
    obj = {**({"config": "@@CLASS@@"} if inert else {}), "model": small_state(), "extra": FORGED}
    cls = Pickle().g("hostile_lib", "Config").tuple(0).reduce().body()
    return saved_with(d / "ckpt.pt", obj, {FORGED: p.body(), **({"@@CLASS@@": cls} if inert else {})})


def _slices(p: Pickle, level: int) -> None:
    (p.get(200) if level else p.g("builtins", "slice").put(200)).mark()


@case("memory corruption")
def deep_slice(d: Path) -> Path:
    """slice(slice(slice(...))) 400,000 deep (2 MB): freed recursively in C, without the trashcan."""
    return _deep(d, _slices, b"tR", 400_000, inert=True)


@case("memory corruption")
def deep_slice_allowlist(d: Path) -> Path:
    return _deep(d, _slices, b"tR", 60_000)


@case("memory corruption")
def deep_tuple(d: Path) -> Path:
    return _deep(d, lambda p, _: p.mark(), b"t", 100_000, inert=True)


@case("memory corruption")
def deep_list(d: Path) -> Path:
    return _deep(d, lambda p, _: p.list(), b"a", 50_000)


@case("memory corruption")
def deep_dict(d: Path) -> Path:
    return _deep(d, lambda p, _: p.dict().s("k"), b"s", 600_000)  # 3.6 MB: ~140 MB of dicts


# ----------------------------------------------------------------------------- code execution


def _marker_module(d: Path) -> None:
    (d / f"{MARKER_MODULE}.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('the file chose an import')\n"
        "from ddp import models\nmodels.register('net')(models.MODELS['fastnet_small'])\n")


@case("code execution", beside=True)
def model_name_in_ours(d: Path) -> Path:
    _marker_module(d)
    return ours(d / "ckpt.pt", cfg={"model": f"{MARKER_MODULE}:net", "num_classes": 10, "dataset": "cifar10"})


@case("code execution", beside=True)
def model_name_in_weights_export(d: Path) -> Path:
    from craft import fastnet_state

    _marker_module(d)
    torch.save({"format": "ddp-cifar-weights/1", "model": fastnet_state(), "model_name": f"{MARKER_MODULE}:net",
                "num_classes": 10}, d / "export.pt")
    return d / "export.pt"


@case("code execution", beside=True)
def model_name_in_safetensors(d: Path) -> Path:
    from safetensors.torch import save_file

    from craft import fastnet_state

    _marker_module(d)
    save_file(fastnet_state(), d / "model.safetensors", metadata={"format": "ddp-cifar-weights/1",
                                                                  "model_name": f"{MARKER_MODULE}:net",
                                                                  "num_classes": "10"})
    return d / "model.safetensors"


@case("code execution")
def model_name_stdlib_module(d: Path) -> Path:
    from safetensors.torch import save_file

    from craft import fastnet_state

    save_file(fastnet_state(), d / "model.safetensors", metadata={"model_name": "tabnanny:net", "num_classes": "10"})
    return d / "model.safetensors"


@case("code execution")
def codecs_encode_imports_codec(d: Path) -> Path:
    p = Pickle().g("_codecs", "encode").s("abc").s("rot13").tuple(2).reduce()
    return saved_with(d / "ckpt.pt", {"model": small_state(), "extra": FORGED}, {FORGED: p.body()})


# ----------------------------------------------------------------------------- resource exhaustion


def _extra(d: Path, p: Pickle, legacy: bool = False) -> Path:
    return saved_with(d / "ckpt.pt", {"model": small_state(), "extra": FORGED}, {FORGED: p.body()}, legacy)


@case("resource exhaustion")
def bytearray_huge(d: Path) -> Path:
    return _extra(d, Pickle().g("builtins", "bytearray").i(1 << 34).tuple(1).reduce())


@case("resource exhaustion")
def numpy_object_array_huge(d: Path) -> Path:
    p = Pickle()
    p.g("numpy.core.multiarray", "_reconstruct").g("numpy", "ndarray").ints(0).by(b"b").tuple(3).reduce()
    p.mark().i(1).ints(1 << 34).g("numpy", "dtype").s("O8").false().true().tuple(3).reduce()
    return _extra(d, p.false().list().tuple().build())


@case("resource exhaustion")
def set_of_huge_range(d: Path) -> Path:
    return _extra(d, Pickle().g("builtins", "set").g("builtins", "range").i(1 << 40).tuple(1).reduce()
                  .tuple(1).reduce())


@case("resource exhaustion")
def legacy_storage_huge(d: Path) -> Path:
    p = Pickle().dict().s("w").g("torch._utils", "_rebuild_tensor_v2").mark()
    p.mark().s("storage").g("torch", "FloatStorage").s("0").s("cpu").i(1 << 40).none().tuple().raw(b"Q")
    p.i(0).ints(4).ints(1).false().ordered_dict().tuple().reduce().setitem()
    return legacy_file(d / "ckpt.pt", p.done(), [("0", b"\x00" * 16)])


@case("resource exhaustion")
def legacy_storage_4eib(d: Path) -> Path:
    p = Pickle().dict().s("w").g("torch._utils", "_rebuild_tensor_v2").mark()
    p.mark().s("storage").g("torch", "FloatStorage").s("0").s("cpu").i(1 << 60).none().tuple().raw(b"Q")
    p.i(0).ints(4).ints(1).false().ordered_dict().tuple().reduce().setitem()
    return legacy_file(d / "ckpt.pt", p.done(), [("0", b"\x00" * 16)])


@case("resource exhaustion")
def zip_storage_numel_above_record(d: Path) -> Path:
    p = Pickle().dict().s("w").tensor("0", 1 << 31, (1 << 31,), (1,)).setitem()
    return torch_zip(d / "ckpt.pt", p.done(), {"0": b"\x00" * 16})


@case("resource exhaustion")
def tensor_huge_size_stride0(d: Path) -> Path:
    """A 4-byte storage seen as 2**62 elements with stride 0: anything that copies it asks for 16 EiB."""
    p = Pickle().dict().s("w").tensor("0", 1, (1 << 62,), (0,)).setitem()
    return torch_zip(d / "ckpt.pt", p.done(), {"0": b"\x00" * 4})


@case("resource exhaustion")
def dcp_chunk_stride0_huge(d: Path) -> Path:
    big = torch.ones(1).expand(1 << 31)  # saved as one element; read back as 2**31 of them
    return dcp_dir(d / "ckpt", {"w": ([1 << 31], [([0], big)])})


@case("resource exhaustion")
def export_num_classes_huge(d: Path) -> Path:
    from safetensors.torch import save_file

    from craft import fastnet_state

    save_file(fastnet_state(), d / "model.safetensors", metadata={"model_name": "fastnet_small",
                                                                  "num_classes": str(1 << 40)})
    return d / "model.safetensors"


# ----------------------------------------------------------------------------- hangs


@case("hang")
def deflate_bomb_inert(d: Path) -> Path:
    """A zip whose storage record inflates to 256 MiB (1 MiB on disk), beside a class that needs the inert path."""
    path = saved_with(d / "ckpt.pt", {"model": small_state(), "config": FORGED},
                      {FORGED: Pickle().g("hostile_lib", "Config").tuple(0).reduce().body()})
    records = {n.split("/", 1)[1]: zipfile.ZipFile(path).read(n) for n in zipfile.ZipFile(path).namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, data in records.items():
            z.writestr(f"archive/{name}", data + (b"\x00" * (256 << 20) if name == "data/0" else b""))
    return path


@case("hang")
def zip_duplicated_central_directory(d: Path) -> Path:
    """One 1 MiB record listed 20,000 times in the central directory: 20 GB to check."""
    path = torch_zip(d / "ckpt.pt", Pickle().dict().s("w").tensor("0", 4, (4,), (1,)).setitem().done(),
                     {"0": b"\x00" * (1 << 20)})
    data = path.read_bytes()
    end = data.rindex(b"PK\x05\x06")
    count, size, offset = struct.unpack_from("<HII", data, end + 10)
    central = data[offset:offset + size]
    entry = central[central.index(b"archive/data/0") - 46:]
    entry = entry[:46 + struct.unpack_from("<HHH", entry, 28)[0] + sum(struct.unpack_from("<HH", entry, 30))]
    n = 20_000
    new_central = central + entry * n
    eocd = bytearray(data[end:end + 22])
    struct.pack_into("<HHII", eocd, 8, 0xFFFF, 0xFFFF, len(new_central), offset)  # too many for 16 bits: zip64
    zip64_eocd = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count + n, count + n,
                             len(new_central), offset)
    locator = struct.pack("<IIQI", 0x07064B50, 0, offset + len(new_central), 1)
    path.write_bytes(data[:offset] + new_central + zip64_eocd + locator + bytes(eocd))
    return path


@case("hang")
def reduce_flood(d: Path) -> Path:
    p = Pickle().g("builtins", "set").put(200)
    p.raw(b"h\xc8)R0" * 3_000_000)  # set() three million times, each thrown away
    return _extra(d, p.none())


@case("hang")
def safetensors_300k_tensors(d: Path) -> Path:
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(300_000)}
    return safetensors_file(d / "model.safetensors", header)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@case("hang")
def fifo_index_in_directory(d: Path) -> Path:
    (d / "ckpt").mkdir()
    _fifo(d / "ckpt" / "model.safetensors.index.json")
    return d / "ckpt"


@case("hang")
def fifo_safetensors_in_directory(d: Path) -> Path:
    (d / "ckpt").mkdir()
    _fifo(d / "ckpt" / "model.safetensors")
    return d / "ckpt"


@case("hang")
def fifo_shard(d: Path) -> Path:
    (d / "ckpt").mkdir()
    _fifo(d / "ckpt" / "s.safetensors")
    (d / "ckpt" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "s.safetensors"}}))
    return d / "ckpt"


@case("hang")
def fifo_dcp_storage(d: Path) -> Path:
    directory = dcp_dir(d / "ckpt", {"w": ([4], [([0], torch.ones(4))])})
    (directory / "__0_0.distcp").unlink()
    _fifo(directory / "__0_0.distcp")
    return directory


# ----------------------------------------------------------------------------- outside the given path


def _secret_safetensors(path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({SECRET: torch.full((4,), 7.0)}, path)
    return path


@case("outside the path", secret=True)
def symlinked_safetensors(d: Path) -> Path:
    secret = _secret_safetensors(d / "elsewhere" / "private.safetensors")
    (d / "ckpt").mkdir()
    (d / "ckpt" / "model.safetensors").symlink_to(secret)
    return d / "ckpt"


@case("outside the path", secret=True)
def symlinked_shard_index(d: Path) -> Path:
    from safetensors.torch import save_file

    (d / "elsewhere").mkdir()
    (d / "elsewhere" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "s.safetensors", SECRET: "s.safetensors"}}))
    (d / "ckpt").mkdir()
    save_file(small_state(), d / "ckpt" / "s.safetensors")
    (d / "ckpt" / "model.safetensors.index.json").symlink_to(d / "elsewhere" / "model.safetensors.index.json")
    return d / "ckpt"


@case("outside the path", secret=True)
def symlinked_dcp_metadata(d: Path) -> Path:
    elsewhere = dcp_dir(d / "elsewhere", {SECRET: ([4], [([0], torch.full((4,), 7.0))])})
    (d / "ckpt").mkdir()
    (d / "ckpt" / ".metadata").symlink_to(elsewhere / ".metadata")
    (d / "ckpt" / "__0_0.distcp").write_bytes((elsewhere / "__0_0.distcp").read_bytes())
    return d / "ckpt"


@case("outside the path")
def shard_named_many_ways(d: Path) -> Path:
    from safetensors.torch import save_file

    (d / "ckpt").mkdir()
    save_file({"w": torch.ones(1 << 20)}, d / "ckpt" / "s.safetensors")  # 4 MiB, read once per spelling: 80 GB
    weight_map = {"w": "s.safetensors", **{f"w{i}": f"x{i}/../s.safetensors" for i in range(20_000)}}
    (d / "ckpt" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d / "ckpt"


@case("outside the path")
def dcp_storage_named_many_ways(d: Path) -> Path:
    tensors = {"big": ([1 << 21], [([0], torch.ones(1 << 21))]),  # 8 MiB in the one storage file
               **{f"w{i}": ([1], [([0], torch.ones(1))]) for i in range(300)}}

    def edit(meta) -> None:
        for i, (key, info) in enumerate(meta.storage_data.items()):
            info.relative_path = f"x{i}/../{info.relative_path}"

    return dcp_dir(d / "ckpt", tensors, edit)


# ----------------------------------------------------------------------------- what the file makes us print


@case("terminal escapes")
def escape_in_key(d: Path) -> Path:
    torch.save({"\x1b[2J\x1b[Hfake report\x07": torch.ones(4)}, d / "ckpt.pt")
    return d / "ckpt.pt"


@case("terminal escapes")
def escape_in_class_name(d: Path) -> Path:
    cls = Pickle().g("evil\x1b[2J\x1b[31m", "Config\x1b]0;title\x07").tuple(0).reduce().body()
    return saved_with(d / "ckpt.pt", {"model": small_state(), "config": FORGED}, {FORGED: cls})


@case("terminal escapes")
def escape_in_safetensors_metadata(d: Path) -> Path:
    from safetensors.torch import save_file

    from craft import fastnet_state

    save_file(fastnet_state(), d / "model.safetensors", metadata={"model_name": "\x1b[2Jfastnet_small",
                                                                  "dataset": "\x1b[31mcifar10"})
    return d / "model.safetensors"


# ----------------------------------------------------------------------------- tracebacks instead of one line


def _index(d: Path, weight_map: object, name: str = "model.safetensors.index.json") -> Path:
    (d / "ckpt").mkdir(exist_ok=True)
    (d / "ckpt" / name).write_text(json.dumps({"weight_map": weight_map}))
    return d / "ckpt" / name


@case("traceback")
def index_names_itself(d: Path) -> Path:
    return _index(d, {"w": "model.safetensors.index.json"})


@case("traceback")
def indexes_name_each_other(d: Path) -> Path:
    _index(d, {"w": "b.safetensors.index.json"}, "a.safetensors.index.json")
    _index(d, {"w": "a.safetensors.index.json"}, "b.safetensors.index.json")
    return d / "ckpt" / "a.safetensors.index.json"


@case("traceback")
def shard_of_wrong_type(d: Path) -> Path:
    index = _index(d, {"w": "s.bin"}, "model.bin.index.json")
    torch.save([torch.ones(4)], index.parent / "s.bin")
    return index


@case("traceback")
def weight_map_is_a_list(d: Path) -> Path:
    return _index(d, ["s.safetensors"])


@case("traceback")
def weight_map_values_not_strings(d: Path) -> Path:
    return _index(d, {"w": 5})


@case("traceback")
def dcp_chunk_outside_tensor(d: Path) -> Path:
    return dcp_dir(d / "ckpt", {"w": ([4], [([10], torch.ones(4))])})


@case("traceback", fill=1.0)
def dcp_chunks_overlap(d: Path) -> Path:
    """Two chunks of 2**17 at offsets 0 and 1 of a tensor of 2**18: all of it "covered", yet its last
    2**17 - 1 elements are never written (a fresh 1 MiB allocation: zeros, or whatever was there)."""
    half = torch.ones(1 << 17)
    return dcp_dir(d / "ckpt", {"w": ([1 << 18], [([0], half), ([1], half)])})


@case("traceback")
def dcp_negative_offset(d: Path) -> Path:
    return dcp_dir(d / "ckpt", {"w": ([4], [([-2], torch.ones(2)), ([0], torch.ones(2))])})


@case("traceback")
def dcp_infinite_storage_offset(d: Path) -> Path:
    def edit(meta) -> None:
        for info in meta.storage_data.values():
            info.offset = float("inf")

    return dcp_dir(d / "ckpt", {"w": ([4], [([0], torch.ones(4))])}, edit)


@case("traceback")
def dcp_negative_storage_length(d: Path) -> Path:
    def edit(meta) -> None:
        for info in meta.storage_data.values():
            info.offset, info.length = -10, -5

    return dcp_dir(d / "ckpt", {"w": ([4], [([0], torch.ones(4))])}, edit)


@case("traceback")
def meta_tensor(d: Path) -> Path:
    torch.save({"whiten.weight": torch.empty(24, 3, 2, 2, device="meta")}, d / "ckpt.pt")
    return d / "ckpt.pt"


@case("traceback")
def int_keys_in_state_dict(d: Path) -> Path:
    torch.save({0: torch.ones(4), 1: torch.ones(4)}, d / "ckpt.pt")
    return d / "ckpt.pt"


@case("traceback")
def weights_export_without_model_name(d: Path) -> Path:
    torch.save({"format": "ddp-cifar-weights/1", "model": small_state(), "num_classes": 10}, d / "ckpt.pt")
    return d / "ckpt.pt"


@case("traceback")
def ours_config_is_a_list(d: Path) -> Path:
    return ours(d / "ckpt.pt", config=["fastnet_small"])


@case("traceback")
def ours_model_is_a_list(d: Path) -> Path:
    return ours(d / "ckpt.pt", model=[torch.ones(4)])


@case("traceback")
def inert_module_cycle(d: Path) -> Path:
    p = Pickle().g("hostile_lib", "Net").tuple(0).raw(b"\x81").put(200)  # NEWOBJ: a StandIn
    p.dict().s("_parameters").dict().setitem().s("_buffers").dict().setitem()
    p.s("_modules").dict().s("self").get(200).setitem().setitem().build()
    return _extra(d, p)


@case("traceback")
def safetensors_unknown_dataset(d: Path) -> Path:
    from safetensors.torch import save_file

    from craft import fastnet_state

    save_file(fastnet_state(), d / "model.safetensors", metadata={"model_name": "fastnet_small",
                                                                  "dataset": "imagenet-22k"})
    return d / "model.safetensors"


@case("traceback")
def safetensors_num_classes_not_json(d: Path) -> Path:
    from safetensors.torch import save_file

    from craft import fastnet_state

    save_file(fastnet_state(), d / "model.safetensors", metadata={"model_name": "fastnet_small",
                                                                  "num_classes": "ten"})
    return d / "model.safetensors"


def _patched_zip(d: Path, patch: Callable[[bytearray, int], None]) -> Path:
    """A plain state dict's zip with `patch(bytes, offset of each central directory entry)` applied."""
    torch.save(small_state(), d / "ckpt.pt")
    data = bytearray((d / "ckpt.pt").read_bytes())
    end = data.rindex(b"PK\x05\x06")
    count, _, offset = struct.unpack_from("<HII", data, end + 10)
    for _ in range(count):
        patch(data, offset)
        offset += 46 + sum(struct.unpack_from("<HHH", data, offset + 28))
    (d / "ckpt.pt").write_bytes(bytes(data))
    return d / "ckpt.pt"


@case("traceback")
def zip_bad_compression_method(d: Path) -> Path:
    return _patched_zip(d, lambda data, at: struct.pack_into("<H", data, at + 10, 99))


@case("traceback")
def zip_encryption_flag(d: Path) -> Path:
    return _patched_zip(d, lambda data, at: struct.pack_into("<H", data, at + 8, 1))


@case("traceback")
def zip_name_not_utf8(d: Path) -> Path:
    def patch(data: bytearray, at: int) -> None:
        struct.pack_into("<H", data, at + 8, 0x800)  # "names are UTF-8"
        data[at + 46] = 0xFF  # ... and the first byte of each is not

    return _patched_zip(d, patch)


@case("traceback")
def zip_without_records(d: Path) -> Path:
    with zipfile.ZipFile(d / "ckpt.pt", "w"):
        pass
    return d / "ckpt.pt"


@case("traceback")
def zip_name_without_directory(d: Path) -> Path:
    pkl = Pickle().g("hostile_lib", "Config").tuple(0).reduce().done()
    with zipfile.ZipFile(d / "ckpt.pt", "w") as z:
        z.writestr("data.pkl", pkl)
    return d / "ckpt.pt"


@case("traceback")
def legacy_tar(d: Path) -> Path:
    import io

    with tarfile.open(d / "ckpt.pt", "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in {"storages": b"\x80\x02K\x00.", "tensors": b"\x80\x02K\x00.",
                           "pickle": Pickle().dict().done()}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return d / "ckpt.pt"


@case("traceback")
def corrupt_deflated_record(d: Path) -> Path:
    torch.save(small_state(), d / "ckpt.pt")
    records = {n: zipfile.ZipFile(d / "ckpt.pt").read(n) for n in zipfile.ZipFile(d / "ckpt.pt").namelist()}
    with zipfile.ZipFile(d / "ckpt.pt", "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in records.items():
            z.writestr(name, data)
    data = bytearray((d / "ckpt.pt").read_bytes())
    at = data.index(zlib.compress(b"little")[2:6]) if zlib.compress(b"little")[2:6] in data else 60
    data[at] ^= 0xFF
    (d / "ckpt.pt").write_bytes(bytes(data))
    return d / "ckpt.pt"


def by_name() -> dict[str, Case]:
    return {c.name: c for c in CASES}
