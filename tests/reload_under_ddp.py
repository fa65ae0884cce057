"""Run under torchrun by test_resume.py: load a checkpoint into a DDP-wrapped model on every rank.

Each rank checks that its weights equal the file's, and that a state dict taken back through the
DDP wrapper is canonical. Exits non-zero on any mismatch.
"""

import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp import checkpoint, models
from ddp.dist import log, process_group

path = sys.argv[1]
with process_group("cpu") as ctx:
    about = checkpoint.load_weights(path).info  # our checkpoints record their model
    ddp_model = DDP(models.build(about["model_name"]))
    diff = checkpoint.load_into(ddp_model, path)  # DDP's own keys carry module.: the loader copes
    saved = checkpoint.load_model_state(path)
    mine = checkpoint.unwrap_model(ddp_model).state_dict()
    assert diff.ok and list(mine) == list(saved)
    assert all(torch.equal(mine[k], saved[k]) for k in saved)
    assert all(k.startswith("module.") for k in ddp_model.state_dict())
    again = checkpoint.make_checkpoint(ddp_model, None, None, None, progress={}, metrics={}, config={},
                                       world_size=ctx.world_size, device_type="cpu")
    assert list(again["model"]) == list(saved)
    log(f"rank {ctx.rank}: {len(saved)} tensors equal", every_rank=True)
    log(f"rank {ctx.rank}: {len(saved)} tensors equal")
