"""Checkpoints that load anywhere: pure functions over dicts, modules and files.

Nothing here touches torch.distributed; the trainer decides which rank calls what. Every file we
write is readable with torch.load(weights_only=True): tensors and plain Python types only.

    readers/   one reader per format family behind one dispatcher (read_checkpoint): torch zip/legacy,
               safetensors (single, sharded, model directories), DCP directories read whole without unpickling
    dcp_writer.py  a DCP directory written from one process, atomically
    keys.py    unwrap DDP/compile, strip/remap prefixes, diff keys against a model, load with a report
    lock.py    one run per checkpoint directory: rank 0's lock on DIR/.lock, stale temp files removed
    files.py   atomic save, with one-line errors
    unpickle.py  the inert unpickler every pickle goes through; rebuild.py  the checked callables it may reach
    standins.py  what stands in for the classes a pickle names; hostile names; a pickled model's state
    weights.py the weight sets a file holds, picking one, loading it into a model
    writer.py  background writes: a CPU copy of the state, then one write at a time on a thread
    state.py   the full training-state dict, RNG, the checkpoint directory (latest/best/epoch files)
    __main__   python -m ddp.checkpoint {inspect,export,convert}
"""

from ddp.checkpoint.dcp_writer import write_dcp
from ddp.checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointLockedError,
    CheckpointMismatchError,
    CheckpointWriteError,
    DamagedCheckpointWarning,
    UntrustedPickleError,
)
from ddp.checkpoint.files import (
    BEST_NAME,
    FORMAT,
    LATEST_NAME,
    WEIGHTS_FORMAT,
    save_checkpoint,
)
from ddp.checkpoint.keys import (
    WRAPPER_PREFIXES,
    KeyDiff,
    align_prefixes,
    detect_prefixes,
    diff_state,
    load_state_into,
    parse_remap,
    remap_prefixes,
    strip_wrapper_prefixes,
    unwrap_model,
)
from ddp.checkpoint.lock import LOCK_NAME, NO_LOCK_ENV, RunLock, hold_run_lock
from ddp.checkpoint.readers import Loaded, read_checkpoint
from ddp.checkpoint.readers.dcp import is_dcp_directory, read_dcp
from ddp.checkpoint.readers.torch_file import load_checkpoint
from ddp.checkpoint.state import (
    capture_rng,
    check_resumable,
    epoch_checkpoint_name,
    make_checkpoint,
    newest_valid_checkpoint,
    prune_epoch_checkpoints,
    restore_checkpoint,
    restore_rng,
)
from ddp.checkpoint.weights import (
    DEFAULT_MIN_MATCH,
    Weights,
    extract_model_state,
    extract_weights,
    load_into,
    load_model_state,
    load_weights,
)
from ddp.checkpoint.writer import BackgroundWriter, cpu_copy

__all__ = [
    "BEST_NAME",
    "DEFAULT_MIN_MATCH",
    "FORMAT",
    "LATEST_NAME",
    "LOCK_NAME",
    "NO_LOCK_ENV",
    "WEIGHTS_FORMAT",
    "WRAPPER_PREFIXES",
    "BackgroundWriter",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "DamagedCheckpointWarning",
    "KeyDiff",
    "Loaded",
    "RunLock",
    "UntrustedPickleError",
    "Weights",
    "align_prefixes",
    "capture_rng",
    "check_resumable",
    "cpu_copy",
    "detect_prefixes",
    "diff_state",
    "epoch_checkpoint_name",
    "extract_model_state",
    "extract_weights",
    "hold_run_lock",
    "is_dcp_directory",
    "load_checkpoint",
    "load_into",
    "load_model_state",
    "load_state_into",
    "load_weights",
    "make_checkpoint",
    "newest_valid_checkpoint",
    "parse_remap",
    "prune_epoch_checkpoints",
    "read_checkpoint",
    "read_dcp",
    "remap_prefixes",
    "restore_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "strip_wrapper_prefixes",
    "unwrap_model",
    "write_dcp",
]
