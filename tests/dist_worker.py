"""One rank of the distributed tests (tests/test_distributed.py spawns it): runs a scenario,
checks it against one process on the concatenated batch, and exits non-zero on a mismatch."""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import adamkit  # noqa: E402

RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
BATCH = 12  # divisible by 1, 2 and 3 ranks

#: (optimizer, options) run under every strategy: every optimizer, and lossy storages
#: optimizers these generic loops cannot step: sparse gradients, a closure (C-Adam), a
#: train/eval switch (Schedule-Free), 2-D parameters only (Muon)
NOT_GENERIC = {"sparseadam", "compositeadam", "c-adam", "schedulefreeadamw", "schedulefreesgd",
               "muon"}
RUNS = [(name, {}) for name in adamkit.available() if name not in NOT_GENERIC] + [
    ("adam", dict(state_dtype="int8")), ("rmsprop", dict(state_dtype="int8")),
    ("fadam", dict(state_dtype="int8")), ("adafactor", dict(state_dtype="int8")),
    ("adamw", dict(state_dtype="bfloat16", stochastic_rounding=True)),
    ("fadam", dict(state_dtype="bfloat16", stochastic_rounding=True)),
    ("adagrad", dict(state_dtype="int8")),
]
LR = {"sgd": 0.05, "adagrad": 0.05, "adafactor": 0.05}


def lossy(options) -> bool:
    return options.get("state_dtype") in ("int8", "bfloat16")


def model() -> torch.nn.Module:
    # 333 x 13 = 4329 weights: int8 state is quantised; 333 and 5 rows split unevenly, and the
    # last layer's single row leaves empty shards on ranks 1 and 2
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 333), torch.nn.Tanh(), torch.nn.Linear(333, 5),
                               torch.nn.Tanh(), torch.nn.Linear(5, 1))


def batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 13, generator=gen), torch.randn(BATCH, 1, generator=gen)


def local_batch(step: int):
    x, y = batch(step)
    return x.chunk(WORLD)[RANK], y.chunk(WORLD)[RANK]


def make(name, params, options, backend="auto"):
    return adamkit.create(name, params, lr=LR.get(name, 1e-2), backend=backend, **options)


def train_step(m, opt, step, local=True):
    x, y = local_batch(step) if local else batch(step)
    opt.zero_grad()
    torch.nn.functional.mse_loss(m(x), y).backward()
    opt.step()


def full(t):
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def params_of(m):
    return [full(p.detach()).clone() for p in m.parameters()]


def shard(m, mesh):
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def check_close(got, want, label, exact_tol):
    for i, (a, b) in enumerate(zip(got, want)):
        err = float((a - b).abs().max())
        if not err <= exact_tol:
            raise AssertionError(f"{label}: parameter {i} differs from one process by {err}")


def scenario_parallel(steps=3):
    """Every optimizer x {DDP, ZeRO (bucket view on/off), FSDP2} against one process."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    mesh = init_device_mesh("cpu", (WORLD,))
    for name, options in RUNS:
        ref = model()
        ref_opt = make(name, ref.parameters(), options)
        for step in range(steps):
            train_step(ref, ref_opt, step, local=False)
        want = params_of(ref)
        tol = 3e-3 if lossy(options) else 2e-5
        label = f"{name} {options}"
        # DDP
        m = DDP(model())
        opt = make(name, m.parameters(), options)
        for step in range(steps):
            train_step(m, opt, step)
        got = params_of(m)
        check_close(got, want, f"DDP {label}", tol)
        for i, p in enumerate(got):  # replicas bitwise equal
            gathered = [torch.empty_like(p) for _ in range(WORLD)]
            dist.all_gather(gathered, p)
            if not all(torch.equal(g, gathered[0]) for g in gathered):
                raise AssertionError(f"DDP {label}: replicas differ in parameter {i}")
        # ZeroRedundancyOptimizer, both bucket-view settings
        for bucket_view in (True, False):
            m = DDP(model())
            opt = ZeroRedundancyOptimizer(
                m.parameters(), optimizer_class=type(make(name, [torch.zeros(1)], options)),
                parameters_as_bucket_view=bucket_view, lr=LR.get(name, 1e-2), **options)
            for step in range(steps):
                train_step(m, opt, step)
            check_close(params_of(m), want, f"ZeRO(bucket_view={bucket_view}) {label}", tol)
            opt.consolidate_state_dict(to=0)
            if RANK == 0:  # round trip of the consolidated state
                saved = opt.state_dict()
                opt.load_state_dict(saved)
            dist.barrier()
        # FSDP2, the fused engine (backend="auto") on the local shards
        m = shard(model(), mesh)
        opt = make(name, m.parameters(), options)
        for step in range(steps):
            train_step(m, opt, step)
        # int8 blocks within rows of dim 0 and other random bits: lossy state's noise differs
        check_close(params_of(m), want, f"FSDP2 {label}", 8e-3 if lossy(options) else tol)
        for p in m.parameters():
            for key, value in opt.state[p].items():
                if key != "step" and isinstance(value, torch.Tensor) and value.dim() > 0:
                    assert isinstance(value, torch.distributed.tensor.DTensor), (label, key)
                    assert value.device_mesh == p.device_mesh, (label, key)
        if RANK == 0:
            print(f"ok {label}", flush=True)


def scenario_sharded_reductions(steps=4):
    """FAdam and Adafactor on both engines, sharded against unsharded; fused engine and
    reference engine agree under FSDP2."""
    mesh = init_device_mesh("cpu", (WORLD,))
    for name in ("fadam", "adafactor"):
        for backend in ("auto", "reference"):
            ref = model()
            ref_opt = make(name, ref.parameters(), {}, backend=backend)
            for step in range(steps):
                train_step(ref, ref_opt, step, local=False)
            m = shard(model(), mesh)
            opt = make(name, m.parameters(), {}, backend=backend)
            for step in range(steps):
                train_step(m, opt, step)
            check_close(params_of(m), params_of(ref), f"FSDP2 {name} {backend}", 2e-5)
            # the local-shard sums alone would be several percent off (issue #22)
            moved = max(float((a - b).abs().max()) for a, b in zip(params_of(ref), params_of(model())))
            assert moved > 1e-3, moved


def scenario_unshardable():
    """A rule whose per-tensor step needs the whole tensor raises, naming the parameter."""
    from adamkit.distributed import NotShardable

    class WholeNorm(adamkit.SGD):
        def apply(self, engine, s, p, g, slots):
            norm = engine.per_tensor(lambda t: float(t.norm()), g)
            yield
            engine.map(self.update, s, [p, g], [p])
            del norm

    mesh = init_device_mesh("cpu", (WORLD,))
    m = shard(model(), mesh)
    opt = WholeNorm(m.parameters(), lr=0.1)
    x, y = local_batch(0)
    torch.nn.functional.mse_loss(m(x), y).backward()
    try:
        opt.step()
    except NotShardable as error:
        message = str(error)
        assert "parameter 0 of param group 0" in message and "per_tensor" in message, message
    else:
        raise AssertionError("no error for a rule that cannot be sharded")


def _dcp_model_and_opt(name, options, mesh):
    m = shard(model(), mesh)
    return m, make(name, m.parameters(), options)


# a sample that keeps the suite's time down: plain and 0-dim state (NAdam's mu_product),
# eagerly made state (Adagrad), per-tensor sums (FAdam, Adafactor), every storage
DCP_RUNS = [(n, {}) for n in ("sgd", "adam", "adagrad", "nadam", "lion", "fadam", "adafactor")] + [
    ("adamw", dict(state_dtype="int8")), ("adafactor", dict(state_dtype="int8")),
    ("fadam", dict(state_dtype="bfloat16", stochastic_rounding=True)),
]


def scenario_dcp(directory, mode):
    """mode "save": 2 steps, dcp.save, 2 more steps (the reference continuation, written to
    DIR/final.pt); mode "load": a fresh model and optimizer, DCP's initialisation (which must
    change no parameter and create every state tensor), dcp.load, 2 steps; compared with the
    continuation, bit for bit at the saving world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = init_device_mesh("cpu", (WORLD,))
    finals = {}
    for i, (name, options) in enumerate(DCP_RUNS):
        key = f"{i}-{name}-{options.get('state_dtype')}"
        m, opt = _dcp_model_and_opt(name, options, mesh)
        if mode == "save":
            for step in range(2):
                train_step(m, opt, step)
            msd, osd = get_state_dict(m, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(directory, key))
        else:
            before = params_of(m)
            msd, osd = get_state_dict(m, opt)  # runs DCP's zero-gradient lr=0 step
            after = params_of(m)
            for j, (a, b) in enumerate(zip(before, after)):
                assert torch.equal(a, b), f"{key}: DCP's init step changed parameter {j}"
            for p, group in ((p, g) for g in opt.param_groups for p in g["params"]):
                missing = [s for s in opt.state_slots(group, p) if s not in opt.state[p]]
                assert not missing, f"{key}: the init step left out {missing}"
            for values in osd["state"].values():  # tensors and numbers only
                for k, v in values.items():
                    assert isinstance(v, (torch.Tensor, int, float)), (key, k, type(v))
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=os.path.join(directory, key))
            set_state_dict(m, opt, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        for step in range(2, 4):
            train_step(m, opt, step)
        finals[key] = params_of(m)
    if RANK == 0:
        torch.save(finals, os.path.join(directory, f"final-{mode}-{WORLD}.pt"))


def main():
    scenario, args = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        {"parallel": scenario_parallel, "reductions": scenario_sharded_reductions,
         "unshardable": scenario_unshardable, "dcp": scenario_dcp}[scenario](*args)
    finally:
        dist.destroy_process_group()
    if RANK == 0:
        print(json.dumps({"done": scenario}), flush=True)


if __name__ == "__main__":
    main()
