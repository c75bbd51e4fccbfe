"""One sharded optimizer step under FSDP2 at N ranks (gloo, CPU), each adamkit optimizer against
torch.optim.AdamW (foreach) on the same fully_shard model (GPT-2 shapes scaled by --scale).

    python benchmarks/fsdp2_speed.py --nproc 2 --scale 0.1 --json fsdp2_speed.json

Each optimizer is timed on the same sharded parameters with the same gradients: the median of
--steps timed steps after --warmup; rank 0 prints the table (ms/step of the slowest rank) and
writes the JSON. The ranks are spawned by torch.multiprocessing on a free port.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

OPTIMIZERS = ["adamw", "adam", "sgd", "lion", "adafactor", "fadam", "adopt"]


def _worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import adamkit
        from adamkit.bench.speed import gpt2_shapes, scaled
        from torch.distributed.fsdp import fully_shard
        torch.manual_seed(0)
        model = torch.nn.Module()
        model.params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s) * 0.02)
                                               for s in scaled(gpt2_shapes(), args.scale)])
        fully_shard(model)
        n = sum(p.numel() for p in model.parameters())
        for p in model.parameters():
            p.grad = torch.distributed.tensor.distribute_tensor(
                torch.randn(p.shape) * 1e-3, p.device_mesh, p.placements)
        rows = []
        candidates = [("torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True))]
        candidates += [(f"adamkit.{name}", lambda ps, name=name: adamkit.create(name, ps, lr=1e-3))
                       for name in args.optimizers]
        for label, make in candidates:
            try:
                opt = make(list(model.parameters()))
                times = []
                for i in range(args.warmup + args.steps):
                    dist.barrier()
                    begin = time.perf_counter()
                    opt.step()
                    elapsed = torch.tensor([time.perf_counter() - begin])
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                    if i >= args.warmup:
                        times.append(float(elapsed) * 1e3)
                rows.append({"optimizer": label, "ms_per_step": statistics.median(times)})
            except Exception as error:  # report, keep timing the others
                rows.append({"optimizer": label, "error": f"{type(error).__name__}: {error}"})
        if rank == 0:
            queue.put({"world_size": world, "scale": args.scale, "params": n, "rows": rows})
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--json", default="fsdp2_speed.json")
    args = parser.parse_args()
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(args.nproc, port, args, queue), nprocs=args.nproc, join=True)
    result = queue.get()
    base = next((r["ms_per_step"] for r in result["rows"] if r["optimizer"] == "torch.optim.AdamW"
                 and "ms_per_step" in r), None)
    print(f"FSDP2, {result['world_size']} ranks (gloo, CPU), GPT-2 shapes x{args.scale}: "
          f"{result['params'] / 1e6:.2f} M parameters")
    print(f"{'optimizer':<22}{'ms/step':>10}{'vs torch AdamW':>16}")
    for row in result["rows"]:
        if "error" in row:
            print(f"{row['optimizer']:<22}  {row['error'][:80]}")
        else:
            row["ratio_to_torch_adamw"] = row["ms_per_step"] / base if base else None
            print(f"{row['optimizer']:<22}{row['ms_per_step']:>10.2f}{row['ratio_to_torch_adamw']:>15.2f}x")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
