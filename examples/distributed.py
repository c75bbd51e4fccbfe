"""Two-process training with adamkit on PyTorch's own distributed engine (gloo, CPU).

    torchrun --nproc-per-node 2 examples/distributed.py ddp
    torchrun --nproc-per-node 2 examples/distributed.py zero
    torchrun --nproc-per-node 2 examples/distributed.py fsdp2

Each rank trains on its half of every batch; the FSDP2 run also writes and reads back a
torch.distributed.checkpoint of the model and the optimizer.
"""

import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

import adamkit

strategy = sys.argv[1] if len(sys.argv) > 1 else "ddp"
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 1))

if strategy == "ddp":
    model = DDP(model)
    opt = adamkit.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
elif strategy == "zero":
    model = DDP(model)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=adamkit.AdamW,
                                  lr=1e-3, weight_decay=0.01)
elif strategy == "fsdp2":
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # FAdam's per-tensor RMS norms are all-reduced over the mesh; state is sharded like p
    opt = adamkit.FAdam(model.parameters(), lr=1e-3, state_dtype="bfloat16")
else:
    sys.exit(f"unknown strategy {strategy!r}: use ddp, zero or fsdp2")

gen = torch.Generator().manual_seed(1)
for step in range(20):
    x = torch.randn(64, 32, generator=gen)
    y = x.sum(dim=1, keepdim=True).sin()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(xs), ys)
    loss.backward()
    opt.step()
    if rank == 0 and step % 5 == 0:
        print(f"{strategy} step {step} loss {loss.item():.4f}")

if strategy == "fsdp2":
    directory = tempfile.mkdtemp() if rank == 0 else None
    shared = [directory]
    dist.broadcast_object_list(shared)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=shared[0])
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=shared[0])
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if rank == 0:
        print("checkpoint written and read back:", shared[0])
dist.destroy_process_group()
