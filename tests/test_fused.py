"""The fused CPU engine against the reference engine (the oracle), for every optimizer.

One table drives the comparison: every registered optimizer with each of its flag variants
(plus ``maximize``), stepped 10 times in float64 and float32 on the same parameter set
(several param groups; a zero-size, a single-element, a non-contiguous and a large tensor
among them). Parameters and every state tensor must agree to 1e-12 (float64) or 1e-5
(float32), measured as max|fused - reference| / max|reference| per tensor.

Compiled kernels live in the kernel cache (``ADAMKIT_CACHE_DIR`` or ~/.cache/adamkit/kernels),
so only the first run pays for compilation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

import adamkit
from adamkit import compiler
from adamkit.engines import cpu
from adamkit.engines.cpu import batch, codegen, runtime
from adamkit.registry import OPTIMIZERS

pytestmark = pytest.mark.skipif(not cpu.available(), reason="numba is not installed")

# Flag variants per optimizer: every boolean option on and off, and the decay forms. The first
# entry of each list is combined with maximize=True as well.
VARIANTS: dict[str, list[dict]] = {
    "adabelief": [dict(weight_decay=0.1), dict(amsgrad=True), dict(rectify=False),
                  dict(rectify=False, amsgrad=True, weight_decay=0.1,
                       decoupled_weight_decay=False)],
    "adabound": [dict(weight_decay=0.1), dict(amsbound=True),
                 dict(weight_decay=0.1, decoupled_weight_decay=True)],
    "adafactor": [dict(weight_decay=0.1), dict(eps=(1e-30, 1e-3), d=2.0)],
    "adagrad": [dict(weight_decay=0.1, lr_decay=0.01, initial_accumulator_value=0.1), dict()],
    "adam": [dict(weight_decay=0.1), dict(amsgrad=True),
             dict(weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True)],
    "adamax": [dict(weight_decay=0.1)],
    "adamod": [dict(weight_decay=0.1)],
    "adamw": [dict(), dict(amsgrad=True), dict(cautious=True)],
    "adopt": [dict(weight_decay=0.1), dict(weight_decay=0.1, decouple=True, cautious=True),
              dict(clip_lambda=None)],
    "fadam": [dict(), dict(weight_decay=0.0, p=1.0, clip=0.5), dict(p=0.75)],
    "lion": [dict(weight_decay=0.1), dict(weight_decay=0.1, cautious=True)],
    "nadam": [dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True),
              dict(cautious=True)],
    "radam": [dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True)],
    "rmsprop": [dict(weight_decay=0.1), dict(momentum=0.9), dict(centered=True),
                dict(centered=True, momentum=0.9)],
    "sgd": [dict(momentum=0.9, weight_decay=0.1), dict(),
            dict(momentum=0.9, nesterov=True), dict(momentum=0.9, dampening=0.5),
            dict(momentum=0.9, weight_decay=0.1, cautious=True)],
    "sparseadam": [dict()],
    "schedulefreeadamw": [dict(weight_decay=0.1), dict(warmup_steps=3, r=1.0, weight_lr_power=1.0)],
    "schedulefreesgd": [dict(weight_decay=0.1), dict(momentum=0.5, warmup_steps=3)],
}
# Registered optimizers these drivers cannot step (the tests/optim_table.py ``elsewhere`` column
# says where each one's engines are compared)
ELSEWHERE = {"muon", "compositeadam", "c-adam"}
# Learning rates large enough that 10 steps move every optimizer visibly.
LR = {"sgd": 0.05, "adagrad": 0.05, "rmsprop": 0.01, "lion": 0.01, "adafactor": 0.05}


def _cases():
    assert set(VARIANTS) | ELSEWHERE == set(OPTIMIZERS), "every registered optimizer needs table entries"
    cases = []
    for name, variants in VARIANTS.items():
        for i, kwargs in enumerate(variants):
            cases.append(pytest.param(name, kwargs, id=f"{name}-{i}"))
        cases.append(pytest.param(name, {**variants[0], "maximize": True},
                                  id=f"{name}-maximize"))
    return cases


def _make_params(dtype, sparse: bool):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    if sparse:  # SparseAdam: embedding-like tables
        return [[rnd(40, 8), rnd(1, 3)], [rnd(0, 4), rnd(300, 2)]]
    transposed = rnd(9, 6).t()  # non-contiguous: "auto" runs the reference engine on it
    assert not transposed.is_contiguous()
    # 257 x 513 is above codegen.SERIAL_BELOW: its per-tensor kernels (reductions) run on
    # the thread pool, over several chunks; the others run on the calling thread
    big = rnd(257, 513)
    assert big.numel() >= codegen.SERIAL_BELOW
    return [[rnd(33, 17), rnd(1), rnd(0), rnd(5, 3, 4)], [rnd(1000), transposed, rnd(2, 1), big]]


def _grads(params, step, sparse: bool):
    g = torch.Generator().manual_seed(1000 + step)
    grads = []
    for p in params:
        dense = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        if sparse:
            rows = torch.randint(0, max(p.shape[0], 1), (5,), generator=g)
            if p.shape[0] == 0:
                rows = rows[:0]
            values = dense[rows] if p.shape[0] else dense[:0].reshape(0, *p.shape[1:])
            grads.append(torch.sparse_coo_tensor(rows[None], values, p.shape))
        else:
            grads.append(dense)
    return grads


def _run(name, kwargs, dtype, backend, steps=10):
    sparse = name == "sparseadam"
    groups = _make_params(dtype, sparse)
    params = [p for group in groups for p in group]
    lr = LR.get(name, 0.02)
    opt = adamkit.create(name, [{"params": groups[0]}, {"params": groups[1], "lr": lr / 2}],
                         lr=lr, backend=backend, **kwargs)
    if hasattr(opt, "train"):  # Schedule-Free: steps are taken in train mode
        opt.train()
    for step in range(steps):
        for p, grad in zip(params, _grads(params, step, sparse)):
            p.grad = grad
        opt.step()
    return params, opt


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if b.numel() == 0:
        return 0.0
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


@pytest.fixture
def count_fused(monkeypatch):
    calls = []
    original = cpu.FusedEngine.map

    def counting(self, fn, *args, **kwargs):
        calls.append(fn)
        return original(self, fn, *args, **kwargs)

    monkeypatch.setattr(cpu.FusedEngine, "map", counting)
    return calls


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("name,kwargs", _cases())
def test_fused_matches_reference(name, kwargs, dtype, tol, count_fused):
    ref_params, ref_opt = _run(name, kwargs, dtype, "reference")
    assert not count_fused
    params, opt = _run(name, kwargs, dtype, "auto")
    assert count_fused, "backend='auto' did not use the fused engine"
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert p.dtype == q.dtype and p.shape == q.shape
        assert _rel(p, q) <= tol, f"parameter {i}: {_rel(p, q):.3g}"
        state, ref_state = opt.state[p], ref_opt.state[q]
        assert state.keys() == ref_state.keys()
        for key, value in ref_state.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == state[key].dtype, key
                assert _rel(state[key], value) <= tol, f"parameter {i} {key}: " \
                    f"{_rel(state[key], value):.3g}"
            else:
                assert state[key] == value, key


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                       (torch.bfloat16, 2.0**-7)],
                         ids=["float64", "float32", "bfloat16"])
def test_adafactor_conv_shapes_match_reference(dtype, tol):
    """Adafactor factors the last two dims: on conv kernels those are 3x3 or 1x1, batches of
    tiny matrices (the small-matrix sums and short-row broadcast kernels; 128x128x3x3 is
    above SERIAL_BELOW, so it also runs on the thread pool). bfloat16: the same float32
    arithmetic, rounded to nearest on both engines (at most a last-bit difference)."""
    shapes = [(128, 128, 3, 3), (16, 8, 3, 3), (64, 32, 1, 1), (7, 5, 2, 3), (3, 70, 60)]
    assert math.prod(shapes[0]) >= codegen.SERIAL_BELOW
    results = []
    for backend in ("reference", "fused"):
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
        opt = adamkit.Adafactor(params, lr=0.02, weight_decay=0.1, backend=backend)
        for step in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
            opt.step()
        results.append((params, opt))
    (ref, ref_opt), (fused, opt) = results
    for i, (p, q) in enumerate(zip(fused, ref)):
        assert _rel(p, q) <= tol, f"parameter {i} {tuple(p.shape)}: {_rel(p, q):.3g}"
        for key in ("row_var", "col_var"):
            assert _rel(opt.state[p][key], ref_opt.state[q][key]) <= tol, (i, key)


@pytest.mark.parametrize("shape", [(3, 3), (4096, 3, 3), (2, 1, 1), (300, 2, 5), (4, 7),
                                   (5000, 7), (2, 300, 200), (1, 70000), (50, 9, 11),
                                   (2, 1100, 1001)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-6),
                                       (torch.bfloat16, 1e-6)],
                         ids=["float64", "float32", "bfloat16"])
def test_mean_sq_last_dims_matches_reference(shape, dtype, tol):
    """Row and column means of g^2, small matrices (summed whole) and large ones (row bands,
    element-dtype runs; 1100 x 1001 is two bands), against torch in float64. bfloat16 is
    computed in float32: its small matrices by the same kernels, decoding as they read."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rows, cols = cpu.FusedEngine(dtype).mean_sq_last_dims(x.to(dtype))
    sq = x.to(dtype).double() ** 2
    assert rows.shape == shape[:-1] + (1,) and cols.shape == shape[:-2] + (1, shape[-1])
    assert _rel(rows, sq.mean(dim=-1, keepdim=True)) <= tol
    assert _rel(cols, sq.mean(dim=-2, keepdim=True)) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_mean_rows_equals_torch_mean_bit_for_bit(dtype):
    """engine.mean_rows (Adafactor's mean of a row factor over its rows) of both engines is
    torch's ``mean(dim=-2, keepdim=True)`` bit for bit: a conv kernel's 3 rows (one Numba pass
    in the fused engine, on the calling thread and on the pool), 1 and 2 rows, longer rows and
    a single matrix (torch's mean), and bfloat16 (summed in float32 and rounded to nearest in
    the fused engine's pass), with values over 12 decades."""
    from adamkit.engines.reference import ReferenceEngine

    gen = torch.Generator().manual_seed(9)
    shapes = [(512, 300, 3, 1), (7, 5, 3, 1), (40, 2, 1), (9, 1, 1), (6, 7, 1), (3, 1),
              (2, 4, 1)]
    assert math.prod(shapes[0]) >= codegen.SERIAL_BELOW > math.prod(shapes[1])
    for shape in shapes:
        decades = torch.randint(-6, 6, shape, generator=gen).double()
        x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 10 ** decades).to(dtype)
        want = x.mean(dim=-2, keepdim=True)
        for engine in (ReferenceEngine(dtype), cpu.FusedEngine(dtype)):
            got = engine.mean_rows(x)
            assert got.dtype == dtype and got.shape == want.shape, (shape, engine)
            assert torch.equal(got, want), (shape, engine)


@pytest.mark.parametrize("element", ["float32", "float64", "int16", "int8"])
def test_shuffled_copy_moves_the_elements_its_pattern_names(element):
    """numba_ops.shuffled_copy (one vector permute, which the small-matrix kernels spread
    factors with): dst[j + e] == src[i + pattern[e]] for a conv kernel's column-factor pattern,
    nothing else written; a pattern reaching past its window is refused."""
    import numba
    import numpy as np

    from adamkit.engines.cpu import numba_ops

    pattern = tuple(3 * (e // 9) + e % 3 for e in range(144))  # 16 matrices' column factors
    copy = numba_ops.shuffled_copy(48, pattern)

    @numba.njit
    def run(src, i, dst, j):
        copy(src, i, dst, j)

    src = ((np.arange(100) * 37) % 101).astype(element)
    dst = np.full(160, 7, dtype=element)
    run(src, 5, dst, 3)
    want = np.full(160, 7, dtype=element)
    want[3:147] = src[5 + np.array(pattern)]
    assert np.array_equal(dst, want)
    with pytest.raises(ValueError, match=r"pattern entries must lie in \[0, 48\)"):
        numba_ops.shuffled_copy(48, (0, 48))


class _Unused(NamedTuple):
    unused: float


def _first(s: _Unused, a, b):
    return a


def _product(s: _Unused, a, b, out):
    return a * b


def test_batched_means_of_squares_run_in_one_launch_before_the_maps(monkeypatch):
    """With a KernelBatch, mean_sq_last_dims is deferred (matrices over SMALL_BCAST elements):
    every queued tensor's row and column means come from one launch per dtype pair at
    flush(), before the maps queued after them
    (which may read them), for matrices summed whole and in row bands, in float64 to 1e-13
    and float32 to 1e-6 against torch; a map run at once on a deferred result waits for it."""
    from adamkit.engines.cpu import numba_ops

    launches = []
    original = numba_ops.sq_means_many

    def spy(*args):
        launches.append(len(args[0]))
        return original(*args)

    monkeypatch.setattr(numba_ops, "sq_means_many", spy)
    shapes = [(300, 2, 5), (4, 7), (5000, 7), (2, 300, 200), (1, 70000), (50, 9, 11), (70, 80),
              (1100, 1001)]
    # several bands of rows per matrix (work items of about numba_ops.BAND elements)
    assert 1100 * 1001 > numba_ops.BAND
    gen = torch.Generator().manual_seed(6)
    batch = cpu.KernelBatch()
    queued = []
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 1e-6)):
        engine = cpu.FusedEngine(dtype, batch=batch, batch_sums=True)
        for shape in shapes:
            x = torch.randn(shape, generator=gen, dtype=dtype)
            rows, cols = engine.mean_sq_last_dims(x)
            copy = torch.empty_like(rows)
            # a queued map reading the deferred row means (a copy of them)
            engine.map(_first, _Unused(0.0), [rows, copy], [copy])
            queued.append((x, rows, cols, copy, tol))
    assert not launches
    batch.flush()
    # matrices of at most SMALL_BCAST elements run at once (kernels compiled per shape)
    deferred = sum(1 for shape in shapes if shape[-2] * shape[-1] > codegen.SMALL_BCAST)
    assert deferred == 6 and sorted(launches) == [deferred, deferred]
    for x, rows, cols, copy, tol in queued:
        sq = x.double() ** 2
        assert _rel(rows, sq.mean(dim=-1, keepdim=True)) <= tol
        assert _rel(cols, sq.mean(dim=-2, keepdim=True)) <= tol
        assert torch.equal(copy, rows)
    # a map of row and column factors (the mfact layout) queued after them reads them too
    engine = cpu.FusedEngine(torch.float64, batch=batch, batch_sums=True)
    x = torch.randn(2, 30, 40, generator=gen, dtype=torch.float64)
    rows, cols = engine.mean_sq_last_dims(x)
    out = torch.empty(2, 30, 40, dtype=torch.float64)
    engine.map(_product, _Unused(0.0), [rows, cols, out], [out])
    assert len(launches) == 2
    batch.flush()
    assert len(launches) == 3
    sq = x ** 2
    assert _rel(out, sq.mean(dim=-1, keepdim=True) * sq.mean(dim=-2, keepdim=True)) <= 1e-13
    # a map run at once (its operands broadcast in a way no batched layout takes: one
    # matrix's column means against both matrices) on a deferred result flushes first
    rows, cols = engine.mean_sq_last_dims(x)
    engine.map(_product, _Unused(0.0), [rows, cols[:1], out], [out])
    assert len(launches) == 4
    assert _rel(out, sq.mean(dim=-1, keepdim=True) * sq[:1].mean(dim=-2, keepdim=True)) <= 1e-13


@pytest.mark.parametrize("shape,others", [
    # small matrices (sizes and strides compiled in): factors per row, per column, per matrix,
    # shared by all matrices, and lower-rank operands
    ((3000, 3, 3), [(3000, 3, 1), (3000, 1, 3), (3000, 1, 1), (1, 3, 3), (3, 1), (3,), (1,)]),
    ((5, 4, 2, 7), [(5, 4, 2, 1), (1, 1, 2, 7), (5, 4, 1, 7), (7,)]),
    ((40, 1, 1), [(40, 1, 1), (1, 1)]),
    ((6, 7), [(6, 1), (1, 7), (7,), (6, 7)]),  # one matrix: the full operands read in place
    # larger matrices (runtime sizes and strides)
    ((6, 70, 60), [(6, 70, 1), (6, 1, 60), (70, 60), (60,)]),
])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)],
                         ids=["float64", "float32"])
def test_broadcast_maps_match_reference(shape, others, dtype, tol):
    """Broadcast maps (a full parameter and gradient, factors of many shapes) against the
    reference engine: the stored result and both sums."""
    from adamkit.algorithms.adafactor import AdafactorScalars, _apply_update, _update_sq
    from adamkit.engines.reference import ReferenceEngine

    s = AdafactorScalars(lr=0.01, one_minus_beta2=0.2, rho=0.01, eps1=1e-30, eps2=1e-3, d=1.0,
                         weight_decay=0.1, step_size=0.003, max_rsqrt=50.0)
    gen = torch.Generator().manual_seed(11)
    for a_shape in others:
        for b_shape in (others[0], others[-1]):
            p, g = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
            a, b = (torch.rand(sh, generator=gen, dtype=torch.float64) * 10
                    for sh in (a_shape, b_shape))
            results = []
            for engine in (ReferenceEngine(dtype), cpu.FusedEngine(dtype)):
                q, h, x, y = (t.to(dtype, copy=True) for t in (p, g, a, b))
                sums = engine.map(_update_sq, s, [q, h, x, y], [], n_sums=2)
                engine.map(_apply_update, s, [q, h, x, y], [q])
                results.append((q, sums))
            (ref, ref_sums), (fused, sums) = results
            assert _rel(fused, ref) <= tol, (a_shape, b_shape)
            assert _rel(fused, p.to(dtype)) > 1e-4  # the map did write
            for got, want in zip(sums, ref_sums):
                assert abs(got - want) <= tol * abs(want), (a_shape, b_shape, got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_factored_maps_of_many_matrices_run_in_one_launch(dtype):
    """Maps of row and column factors against matrices (Adafactor's) are queued in a
    KernelBatch and run as one launch for all matrices (the mfact layout): the stored results
    equal the per-tensor broadcast kernel's bit for bit, also with bfloat16 parameters rounded
    stochastically (the same random bits per element) and a negated gradient; the sums agree
    with float64 ones. Shapes: rows longer than a work item, one row, 3-wide rows, a batch of
    matrices, a column factor given 1-D; a small matrix and a factor shared by a batch are not
    taken (they run at once)."""
    from adamkit.algorithms.adafactor import AdafactorScalars, _apply_update, _update_sq
    from adamkit.engines.reference import ReferenceEngine

    s = AdafactorScalars(lr=0.01, one_minus_beta2=0.2, rho=0.01, eps1=1e-30, eps2=1e-3, d=1.0,
                         weight_decay=0.1, step_size=0.003, max_rsqrt=50.0)
    assert 20000 > codegen.CHUNK
    cases = [((300, 40), (300, 1), (1, 40)), ((3, 20000), (3, 1), (1, 20000)),
             ((1, 5000), (1, 1), (1, 5000)), ((40000, 3), (40000, 1), (1, 3)),
             ((2, 70, 30), (2, 70, 1), (2, 1, 30)), ((50, 64), (50, 1), (64,)),
             ((4, 4), (4, 1), (1, 4)), ((2, 30, 20), (2, 30, 1), (1, 1, 20))]
    gen = torch.Generator().manual_seed(12)

    def operands():
        made = []
        for shape, a_shape, b_shape in cases:
            p, g = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
            a, b = (torch.rand(sh, generator=gen, dtype=torch.float64) * 10 + 0.1
                    for sh in (a_shape, b_shape))
            made.append((p.to(dtype), g.to(dtype), a, b))
        return made

    compute = torch.float64 if dtype == torch.float64 else torch.float32
    made = operands()
    results = {}
    for batched in (True, False):
        batch = cpu.KernelBatch() if batched else None
        sums, outs = [], []
        for i, (p, g, a, b) in enumerate(made):
            q, h, x, y = p.clone(), g.clone(), a.to(compute), b.to(compute)
            engine = cpu.FusedEngine(dtype, negate=h, seed=1000 + i, batch=batch,
                                           batch_sums=True, stochastic_bf16=True)
            sums.append(engine.map(_update_sq, s, [q, h, x, y], [], n_sums=2))
            engine.map(_apply_update, s, [q, h, x, y], [q])
            outs.append(q)
        if batched:
            # the six factored cases queued (one kernel per rule and operand roles: the one-row
            # matrix's column factor has the matrix's shape); the last two ran at once
            queued = {}
            for spec, entries in batch._groups.items():
                assert spec[5][0] == "mfact"
                queued[spec[0]] = queued.get(spec[0], 0) + len(entries)
            assert queued == {_update_sq: 6, _apply_update: 6}
            assert len(batch._groups) == 4
            batch.flush()
            sums = [list(x.value) if isinstance(x, cpu.Pending) else x for x in sums]
        results[batched] = (sums, outs)
    (sums, outs), (sums_1, outs_1) = results[True], results[False]
    reference = ReferenceEngine(torch.float64)
    for i, (p, g, a, b) in enumerate(made):
        assert torch.equal(outs[i], outs_1[i]), cases[i]
        assert not torch.equal(outs[i], p), cases[i]  # the map did write
        # the sums against the reference engine's in float64, on the same (rounded) operands
        operands = [t.to(compute).double() for t in (p, -g, a, b)]
        want = reference.map(_update_sq, s, operands, [], n_sums=2)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for got, got_1, w in zip(sums[i], sums_1[i], want):
            assert abs(got - w) <= tol * w and abs(got_1 - w) <= tol * w, (cases[i], got, w)


def test_parameters_move():
    """Guard against a vacuous comparison: 10 fused steps change every non-empty parameter."""
    before = [p.clone() for group in _make_params(torch.float32, False) for p in group]
    params, _ = _run("adam", {}, torch.float32, "auto")
    for p, b in zip(params, before):
        if p.numel():
            assert not torch.equal(p, b)


def test_bfloat16_parameters_match_reference():
    """bfloat16 parameters: float32 arithmetic, rounded to nearest-even on both engines
    (FAdam and Adafactor: their passes batched over the tensors, with per-tensor sums)."""
    for name in ("adamw", "lion", "rmsprop", "fadam", "adafactor"):
        ref, ref_opt = _run(name, {}, torch.bfloat16, "reference")
        fused, opt = _run(name, {}, torch.bfloat16, "auto")
        for p, q in zip(fused, ref):
            assert p.dtype == torch.bfloat16
            # identical float32 arithmetic and rounding: at most a last-bit difference
            assert _rel(p, q) <= 2.0**-7, name
            for key, value in ref_opt.state[q].items():
                if isinstance(value, torch.Tensor) and value.dim():
                    assert opt.state[p][key].dtype == torch.bfloat16
                    assert _rel(opt.state[p][key], value) <= 2.0**-7, (name, key)


def test_fused_backend_rejects_unsupported_tensors():
    contiguous = torch.zeros(4, requires_grad=True)
    transposed = torch.zeros(3, 4).t().requires_grad_()
    with pytest.raises(ValueError, match=r"backend='fused' cannot update parameter 1 of param "
                                         r"group 0 \(shape \(4, 3\)\): it is not contiguous"):
        adamkit.Adam([contiguous, transposed], backend="fused")
    with pytest.raises(ValueError, match="complex"):
        adamkit.Adam([torch.zeros(3, dtype=torch.complex64)], backend="fused")
    with pytest.raises(ValueError, match="float16"):
        adamkit.SGD([torch.zeros(3, dtype=torch.float16)], backend="fused")
    opt = adamkit.Adam([contiguous], backend="fused")
    with pytest.raises(ValueError, match="param group 1"):
        opt.add_param_group({"params": [transposed]})
    assert len(opt.param_groups) == 1
    # a gradient the kernels cannot read is caught at step, naming the parameter
    contiguous.grad = torch.zeros(4, 2).t()[0]  # a strided view
    assert not contiguous.grad.is_contiguous()
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 .*gradient"):
        opt.step()


def test_fused_backend_needs_numba(monkeypatch):
    monkeypatch.setitem(runtime._numba_state, "ok", False)
    monkeypatch.setitem(runtime._numba_state, "error", "ImportError: No module named 'numba'")
    with pytest.raises(ValueError, match=r"backend='fused' needs numba"):
        adamkit.Adam([torch.zeros(3)], backend="fused")
    # "auto" quietly uses the reference engine
    p = torch.zeros(3, requires_grad=True)
    opt = adamkit.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.allclose(p, torch.full((3,), -0.1))


def test_auto_falls_back_for_unsupported_tensors(count_fused):
    p16 = torch.ones(5, dtype=torch.float16, requires_grad=True)
    pc = torch.ones(3, dtype=torch.complex128, requires_grad=True)
    pt = torch.ones(4, 3).t().requires_grad_()
    params = [p16, pc, pt]
    ref = [t.detach().clone().requires_grad_() for t in params]
    opt = adamkit.Adam(params, lr=0.1)
    ref_opt = adamkit.Adam(ref, lr=0.1, backend="reference")
    for t, r in zip(params, ref):
        t.grad = torch.ones_like(t)
        r.grad = torch.ones_like(r)
    opt.step()
    ref_opt.step()
    assert not count_fused
    for t, r in zip(params, ref):
        assert torch.equal(t, r)


def test_kernel_cache_is_on_disk(tmp_path, monkeypatch):
    """Kernels are generated as modules in the cache directory with Numba's cache beside them."""
    directory = runtime._writable_cache_dir()
    p = torch.ones(10, requires_grad=True)
    opt = adamkit.Lion([p], lr=0.1, backend="fused")
    p.grad = torch.ones(10)
    opt.step()
    generated = list(directory.glob("adamkit_kernel_*.py"))
    assert generated
    assert any("Lion.update" in f.read_text() for f in generated)
    assert list((directory / "__pycache__").glob("adamkit_kernel_*.nbi"))


@pytest.mark.parametrize("name,kwargs,param_dtype,state_dtype", [
    ("adam", {"weight_decay": 0.1}, torch.float32, None),
    ("adamw", {"maximize": True}, torch.float64, None),
    ("adamw", {}, torch.bfloat16, None),
    ("lion", {}, torch.float32, "bfloat16"),
    ("adam", {"amsgrad": True}, torch.float32, "int8"),
], ids=["adam-f32", "adamw-f64-maximize", "adamw-bf16", "lion-bf16-state", "amsgrad-int8"])
def test_one_launch_for_all_tensors_equals_one_launch_per_tensor(
        name, kwargs, param_dtype, state_dtype, monkeypatch):
    """A step collects the single-pass maps of all its tensors and launches each kernel once over
    a table of tensors; that must be bit-identical to launching it per tensor. Sizes cover several
    chunks of one tensor, a chunk's tail, one element, zero elements and two param groups."""
    torch.manual_seed(0)
    sizes = [[codegen.CHUNK * 2 + 517, 1, 0], [300, 5000, codegen.CHUNK]]

    def run(batched: bool):
        if not batched:  # step() then runs every map as it comes
            monkeypatch.setattr(cpu, "KernelBatch", lambda: None)
        gen = torch.Generator().manual_seed(1)
        groups = [[torch.randn(n, generator=gen).to(param_dtype).requires_grad_() for n in g]
                  for g in sizes]
        opt = adamkit.create(name, [{"params": groups[0]}, {"params": groups[1], "lr": 3e-3}],
                             lr=1e-2, state_dtype=state_dtype, **kwargs)
        for _ in range(3):
            for p in (p for g in groups for p in g):
                p.grad = torch.randn(p.shape, generator=gen).to(param_dtype)
            opt.step()
        monkeypatch.undo()
        return [p for g in groups for p in g], opt

    launches = []
    original = cpu.KernelBatch.flush

    def counting_flush(self):
        launches.append(len(self._groups))
        return original(self)

    monkeypatch.setattr(cpu.KernelBatch, "flush", counting_flush)
    batched, opt_b = run(True)
    # one kernel for the whole step; with int8 state, tensors under 4096 elements keep float32
    # state and take a second kernel
    assert launches == [2 if state_dtype == "int8" else 1] * 3
    single, opt_s = run(False)
    for p, q in zip(batched, single):
        assert torch.equal(p, q)
        for key, value in opt_s.state[q].items():
            mine = opt_b.state[p][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(mine, value), key
            elif hasattr(value, "codes"):
                assert torch.equal(mine.codes, value.codes) and torch.equal(mine.absmax,
                                                                          value.absmax), key


def test_any_nonfinite_over_many_tensors():
    """The one-pass NaN/Inf check behind on_nonfinite='skip'/'raise', against torch.isfinite,
    with one bad value at a time in each tensor and every dtype: at the edges of the check's
    work items and of the four streams each reads (quarters, and the tail a quarter leaves)."""
    gen = torch.Generator().manual_seed(0)
    chunk = cpu.CHECK_CHUNK
    tensors = [torch.randn(n, generator=gen).to(dtype)
               for n, dtype in [(0, torch.float32), (1, torch.float32), (2 * chunk + 1027,
                                torch.float32), (5000, torch.float64), (7, torch.bfloat16),
                                (chunk + 6, torch.bfloat16)]]
    tensors[2][7] = 3.0e38  # huge but finite: x * 0 is still 0
    tensors[5][5] = 3.0e38  # finite in bfloat16 too (its largest exponent is below all ones)
    assert cpu.any_nonfinite(tensors) is False

    def edges(n):
        out = set()
        for lo in range(0, n, chunk):
            length = min(chunk, n - lo)
            q = length // 4
            out |= {lo, lo + q - 1, lo + q, lo + 2 * q, lo + 3 * q, lo + 4 * q - 1, lo + 4 * q,
                    lo + length - 1}
        return sorted(k for k in out if 0 <= k < n)

    bad = [float("nan"), float("inf"), -float("inf"), -float("nan")]
    checked = 0
    for i, t in enumerate(tensors):
        for j, k in enumerate(edges(t.numel())):
            old = t[k].clone()
            t[k] = bad[(i + j) % 4]
            assert not bool(torch.isfinite(t).all())
            assert cpu.any_nonfinite(tensors) is True, (i, k, t[k])
            t[k] = old
            checked += 1
    assert checked > 30
    assert cpu.any_nonfinite(tensors) is False


def test_auto_uses_the_fused_engine_for_multi_pass_rules(count_fused):
    # Adafactor (per-tensor sums, broadcast factors) runs its kernels under backend="auto"
    p = torch.ones(64, 32, requires_grad=True)
    p.grad = torch.ones(64, 32)
    adamkit.Adafactor([p]).step()
    assert count_fused


def test_kernels_are_compiled_per_outcome_of_scalar_branches():
    from adamkit.algorithms.adam import Adam
    from adamkit.algorithms.fadam import _clip_sums_pass

    program = compiler._rule_program(Adam.update)
    assert [kind for kind, _ in program.points] == ["if", "if", "if", "if"]
    # no decay, not decoupled, no AMSGrad, not cautious
    plain = program.source((False, False, False, False), codegen.RULE_DECORATOR)
    assert "maximum(" not in plain and "weight_decay" not in plain and "agreement" not in plain
    amsgrad = program.source((True, True, True, True), codegen.RULE_DECORATOR)
    assert "maximum(" in amsgrad and "weight_decay" in amsgrad and "agreement" in amsgrad
    fisher = compiler._rule_program(_clip_sums_pass)
    assert fisher.points == [("pow", "_E(s.power)")]
    assert "_sqrt(" in fisher.source((0.5,), codegen.RULE_DECORATOR) \
        and "_pow_general(" in fisher.source(("other",), codegen.RULE_DECORATOR)


def test_groups_with_different_branch_outcomes_match_reference():
    # one step, two groups whose scalars take different branches: the batch must run them
    # with different kernels
    def run(backend):
        g = torch.Generator().manual_seed(5)
        a = torch.randn(300, generator=g, requires_grad=True)
        b = torch.randn(40, 50, generator=g, requires_grad=True)
        opt = adamkit.Adam([{"params": [a]}, {"params": [b], "weight_decay": 0.1}],
                           lr=0.01, amsgrad=True, backend=backend)
        for step in range(3):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = torch.randn(b.shape, generator=g)
            opt.step()
        return a.detach(), b.detach()

    for x, y in zip(run("fused"), run("reference")):
        assert _rel(x, y) <= 1e-5


def test_repeated_steps_take_the_fast_path_and_notice_every_change(count_fused):
    """From a parameter's second step its batched map is repeated without the per-operand
    checks (plans._Plan). Against torch.optim.AdamW run side by side (float64, 1e-12),
    through the changes a training loop makes between steps: fresh gradient tensors,
    gradients accumulated in place, a new learning rate, ``p.data`` replaced, state loaded from
    a checkpoint, ``maximize`` switched, a parameter without a gradient, a non-contiguous
    gradient. Each change must send exactly the affected parameters down the full path."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(40, 30), (7,), (5000,)]
    ours = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = adamkit.AdamW(ours, lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.1, foreach=False)

    def grads(fresh=True):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if fresh or p.grad is None:
                p.grad, q.grad = g.clone(), g.clone()
            else:  # accumulate into the same tensors (p.grad keeps its address)
                p.grad += g
                q.grad += g

    def step(expected_full_path):
        count_fused.clear()
        opt.step()
        ref.step()
        assert len(count_fused) == expected_full_path
        for p, q in zip(ours, theirs):
            assert _rel(p.detach(), q.detach()) <= 1e-12
            for key in ("exp_avg", "exp_avg_sq"):
                assert _rel(opt.state[p][key], ref.state[q][key]) <= 1e-12

    grads()
    step(3)  # first step: full path for all
    grads()
    step(0)  # new gradient tensors, same shapes: fast path
    grads(fresh=False)
    step(0)
    for group in opt.param_groups + ref.param_groups:
        group["lr"] = 0.003  # what a scheduler does: only the scalars change
    grads()
    step(0)
    ours[0].data = ours[0].data.clone()  # new storage for parameter 0
    grads()
    step(1)
    grads()
    step(0)
    saved = opt.state_dict()
    opt.load_state_dict(saved)  # new state tensors for every parameter
    grads()
    step(3)
    for group in opt.param_groups + ref.param_groups:
        group["maximize"] = True
    grads()
    step(3)
    grads()
    step(0)
    ours[1].grad = theirs[1].grad = None  # parameter 1 sits this step out
    step(0)
    grads()
    step(0)
    g = torch.randn(30, 40, generator=gen, dtype=torch.float64).t()  # non-contiguous
    ours[0].grad, theirs[0].grad = g, g.clone()
    step(0)  # the reference engine runs it (no fused map), the others repeat
    grads()
    step(1)  # contiguous again: parameter 0 takes the full path once more
    grads()
    step(0)
    exp_avg = opt.state[ours[2]]["exp_avg"]
    exp_avg.set_(exp_avg.clone())  # the same state object on new storage
    grads()
    step(1)
    grads()
    step(0)


def test_fast_path_notices_8bit_state_moved_to_new_storage():
    """A BlockQuantized slot whose codes or scales are replaced (same object, new storage)
    sends its parameter down the full path: the kernel must write where the state now is.
    Against the same steps without the replacement (codes rounded to nearest: identical)."""
    def run(replace):
        gen = torch.Generator().manual_seed(8)
        params = [torch.randn(5000, generator=gen).requires_grad_() for _ in range(2)]
        opt = adamkit.AdamW(params, lr=0.01, state_dtype="int8")
        opt.round_int8_stochastically = False
        for step in range(5):
            for p in params:
                p.grad = torch.randn(5000, generator=gen)
            if replace and step in (2, 3):
                q = opt.state[params[1]]["exp_avg_sq" if step == 2 else "exp_avg"]
                if step == 2:
                    q.codes = q.codes.clone()
                else:
                    q.absmax = q.absmax.clone()
            opt.step()
        return [(opt.state[p][k].codes, opt.state[p][k].absmax, p.detach())
                for p in params for k in ("exp_avg", "exp_avg_sq")]

    for a, b in zip(run(True), run(False)):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def _assert_same(params, other_params, states, other_states) -> None:
    """Parameters and every state tensor equal bit for bit (8-bit state: codes and scales)."""
    for a, b in zip(params, other_params):
        assert torch.equal(a, b)
    for a, b in zip(states, other_states):
        assert a.keys() == b.keys()
        for key in a:
            x, y = a[key], b[key]
            if isinstance(x, adamkit.storage.BlockQuantized):
                assert torch.equal(x.codes, y.codes) and torch.equal(x.absmax, y.absmax)
            else:
                assert torch.equal(x, y), key


@pytest.mark.parametrize("config", ["float32-int8", "bfloat16-sr"])
@pytest.mark.parametrize("name,kwargs", [
    ("adamw", dict(weight_decay=0.1)), ("radam", dict()), ("sgd", dict(momentum=0.9)),
    ("lion", dict()), ("adagrad", dict()), ("rmsprop", dict(centered=True)),
    ("nadam", dict(weight_decay=0.1)), ("fadam", dict()), ("adafactor", dict())])
def test_group_fast_path_matches_the_per_tensor_path_bit_for_bit(name, kwargs, config,
                                                                  monkeypatch):
    """From a param group's second step its maps are added as one block per kernel, with the
    scalars computed once per step count (plans._GroupPlan). Bitwise against the same
    steps with that path switched off (each tensor then repeats its own _Plan), so scalars,
    step counts, NAdam's per-parameter mu_product (shared through scalars_key and
    share_scalars) and stochastic-rounding seeds must all be the same: int8 state rounded
    stochastically (tensors under and over 4096 elements: two kernels in one group), or
    bfloat16 parameters rounded stochastically; two groups; a parameter that sits two steps
    out and comes back a step count behind (two counts in one group: RAdam's rectified and
    unrectified kernels); a new learning rate; maximize switched; a parameter replaced in its
    group. The path must be taken exactly where nothing it depends on changed.

    FAdam (a generator apply with vectorized_apply) takes cohort._GroupLockstepPlan instead:
    its generator runs once per cohort of tensors on arrays of their sums (int8 state: the
    tensors over and under 4096 elements are two cohorts), so its per-tensor scalars must
    come out of the array arithmetic bit for bit as from the per-tensor generators. So does
    Adafactor (vectors and 2-D matrices; the 3x3, whose maps run at once, stays on the
    per-tensor path)."""
    dtype, state_dtype, sr = ((torch.float32, "int8", False) if config == "float32-int8"
                              else (torch.bfloat16, None, True))
    taken = []
    plan_type = adamkit.engines.cohort._GroupLockstepPlan if name in ("fadam", "adafactor") \
        else adamkit.engines.plans._GroupPlan
    original = plan_type.repeat

    def spy(self, opt, group, batch):
        result = original(self, opt, group, batch)
        taken.append(result)
        return result

    def run(fast):
        monkeypatch.setattr(plan_type, "repeat", spy)
        if not fast:
            monkeypatch.setattr(plan_type, "record", classmethod(lambda *args: None))
        gen = torch.Generator().manual_seed(5)
        shapes = [[(5000,), (30, 40), (7,)], [(4100,), (3, 3)]]
        groups = [[torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shp]
                  for shp in shapes]
        lr = LR.get(name, 0.01)
        opt = adamkit.create(name, [{"params": groups[0]}, {"params": groups[1], "lr": lr / 2}],
                             lr=lr, state_dtype=state_dtype, stochastic_rounding=sr, **kwargs)
        taken.clear()
        log = []

        def step(skip=()):
            for gi, params in enumerate(groups):
                for pi, p in enumerate(params):
                    p.grad = None if (gi, pi) in skip else torch.randn(
                        p.shape, generator=gen).to(dtype)
            opt.step()
            log.append(list(taken))
            taken.clear()

        step()  # full path, plans recorded
        step()  # both groups repeat as blocks
        step(skip={(0, 1)})  # a gradient gone: group 0 per tensor, group 1 block
        step(skip={(0, 1)})  # the same again: group 0 block with a gap
        step()  # back, a step count behind: group 0 per tensor
        step()  # two step counts in group 0
        for group in opt.param_groups:
            group["lr"] *= 0.5
        if name == "nadam":  # a product unlike its group's at the same step count
            opt.state[groups[1][0]]["mu_product"] *= 0.9
        step()
        opt.param_groups[1]["maximize"] = True
        step()  # group 1 per tensor (settings changed)
        step()
        retired = groups[0][2]  # compared too: in a cohort, it followed another tensor
        groups[0][2] = torch.randn(7, generator=gen).to(dtype).requires_grad_()
        opt.param_groups[0]["params"][2] = groups[0][2]
        step()  # a new parameter in group 0: per tensor
        step()
        monkeypatch.undo()
        every = [p for params in groups for p in params] + [retired]
        return [p.detach().clone() for p in every], [opt.state[p] for p in every], log

    fast, fast_state, log = run(True)
    slow, slow_state, slow_log = run(False)
    # per step, each group plan's verdict (the first step records; a False is followed by
    # the per-tensor path)
    assert log == [[], [True, True], [False, True], [True, True], [False, True], [True, True],
                   [True, True], [True, False], [True, True], [False, True], [True, True]]
    assert all(not entry for entry in slow_log)
    _assert_same(fast, slow, fast_state, slow_state)


def test_a_subclass_whose_scalars_read_the_state_gets_no_shared_scalars():
    """scalars_from_step is a promise about ``scalars``: a subclass that overrides it (here
    with a per-parameter step size kept in the state) does not inherit it, so each tensor
    keeps its own scalars on the fast path; one that repeats the promise gets it."""
    from adamkit.engines.plans import _shares_scalars

    class PerParameterLR(adamkit.AdamW):
        def scalars(self, group, state):
            s = super().scalars(group, state)
            return s._replace(step_size=s.step_size * state.setdefault("lr_scale", 1.0))

    class Promised(PerParameterLR):
        scalars_from_step = True

    assert _shares_scalars(adamkit.AdamW) and _shares_scalars(adamkit.Adam)
    assert not _shares_scalars(PerParameterLR) and _shares_scalars(Promised)
    assert _shares_scalars(adamkit.NAdam)

    params = [torch.zeros(50, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    opt = PerParameterLR(params, lr=0.1)
    for p, scale in zip(params, (1.0, 0.5, 0.0)):
        opt.state[p]["lr_scale"] = scale
    for _ in range(4):
        for p in params:
            p.grad = torch.ones(50, dtype=torch.float64)
        opt.step()
    moved = [float(-p.detach()[0]) for p in params]
    assert moved[0] > 0 and moved[1] == pytest.approx(moved[0] / 2, rel=1e-12)
    assert moved[2] == 0.0


# kernels launched per pass of one step: FAdam's sum of g^2, clip sums, update (with int8
# state the tensors under 4096 elements keep float32 state: a second kernel once state is read);
# Adafactor (1-D tensors: unfactored) sums of U^2 (with the new V) and p^2, update
@pytest.mark.parametrize("name,state_dtype,per_pass", [
    ("fadam", None, [1, 1, 1]), ("fadam", "int8", [1, 2, 2]),
    ("adafactor", None, [1, 1]), ("adafactor", "int8", [2, 2])])
def test_multi_pass_rules_run_each_pass_once_for_all_tensors(name, state_dtype, per_pass,
                                                           monkeypatch):
    """FAdam's and Adafactor's generator ``apply`` advance in lockstep: each pass is one
    launch over every tensor (per kernel), with per-tensor sums from per-chunk partials. On
    tensors of several chunks, a chunk's tail, one element and 5000 elements, in float64, to
    1e-12: against the reference engine and against the same rule run tensor by tensor (int8
    state rounded to nearest: both engines then store the same codes)."""
    sizes = [(codegen.CHUNK * 2 + 517,), (1,), (5000,), (300,)]

    def run(backend, batched=True):
        if not batched:  # step() then runs every map as it comes
            monkeypatch.setattr(cpu, "KernelBatch", lambda: None)
        gen = torch.Generator().manual_seed(4)
        params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_()
                  for s in sizes]
        opt = adamkit.create(name, params, lr=0.01, state_dtype=state_dtype, backend=backend)
        opt.round_int8_stochastically = False  # deterministic codes
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        monkeypatch.undo()
        return params, opt

    launches = []
    original = cpu.KernelBatch.flush

    def counting_flush(self):  # kernels: maps added one by one or as blocks (a group's)
        if self._groups or self._blocks:
            launches.append(len(set(self._groups) | set(self._blocks)))
        return original(self)

    monkeypatch.setattr(cpu.KernelBatch, "flush", counting_flush)
    fused, opt_f = run("fused")
    assert launches == per_pass * 4
    oracles = [run("fused", batched=False), run("reference")]
    for others, opt_o in oracles:
        for p, q in zip(fused, others):
            assert _rel(p.detach(), q.detach()) <= 1e-12
            for key, value in opt_o.state[q].items():
                mine = opt_f.state[p][key]
                if hasattr(value, "codes"):
                    mine, value = mine.dequantize(torch.float64), value.dequantize(torch.float64)
                assert _rel(mine, value) <= 1e-12, key


def test_a_sum_needed_without_yield_is_an_error():
    """In a generator apply the sums of a batched map exist only after the other tensors reach
    the same pass: unpacking them without yielding names the fix."""
    from adamkit.algorithms.fadam import FAdam, _square

    class Forgetful(FAdam):
        def apply(self, engine, s, p, g, slots):
            (g_sq,) = engine.map(_square, s, [g], [], n_sums=1)
            yield

    p = torch.ones(10, requires_grad=True)
    p.grad = torch.ones(10)
    with pytest.raises(TypeError, match=r"yield the map in a generator apply"):
        Forgetful([p], backend="fused").step()


def test_broadcast_shapes_and_strides_match_torch():
    """The bcast layout's shape and stride helpers (plain Python, per map) against
    torch.broadcast_shapes and Tensor.expand, including size-0 and size-1 dimensions and shapes
    that do not broadcast."""
    cases = [[(4, 1), (1, 5)], [(3, 4, 5), (4, 1)], [(2, 1, 3), (5, 3)], [(0, 1), (1, 7)],
             [(1,), (0,)], [(6,), (2, 3, 6), (3, 1)], [()], [(4, 3), (3, 4)], [(0,), (5,)],
             [(2, 3), (2, 3)]]
    for shapes in cases:
        try:
            expected = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            expected = None
        assert batch._broadcast_shape([torch.Size(s) for s in shapes]) == expected, shapes
        if expected is None:
            continue
        for s in shapes:
            t = torch.zeros(s)
            got = batch._collapse_strides(t, expected)
            e = t.expand(expected)
            # collapse torch's own expanded view the same way and compare
            assert got == batch._collapse_strides(e, expected), (s, expected)
    # strides from a transposed operand keep their values
    t = torch.zeros(5, 4).t()
    assert batch._collapse_strides(t, (4, 5)) == (0, 1, 4)


def _add(s: _Unused, x, c):
    return x + c


def _accumulate(s: _Unused, p, x):
    return p + x


def test_a_queued_map_reading_a_queued_result_runs_after_it():
    """Two dependent maps queued in one phase (x += c, then p += x) for two tensors whose
    first maps differ in kernel (c a number, c a tensor) and whose second maps share one: run
    grouped by kernel, the second tensor's p += x would run before its x += c. The batch
    flushes before queuing a map that reads what a queued map writes."""
    batch = cpu.KernelBatch()
    engine = cpu.FusedEngine(torch.float64, batch=batch)
    xs = [torch.ones(10, dtype=torch.float64) for _ in range(2)]
    ps = [torch.zeros(10, dtype=torch.float64) for _ in range(2)]
    c = torch.full((10,), 2.0, dtype=torch.float64)
    engine.map(_add, _Unused(0.0), [xs[0], 2.0], [xs[0]])
    engine.map(_accumulate, _Unused(0.0), [ps[0], xs[0]], [ps[0]])  # flushes: x0 is queued
    engine.map(_add, _Unused(0.0), [xs[1], c], [xs[1]])
    engine.map(_accumulate, _Unused(0.0), [ps[1], xs[1]], [ps[1]])  # flushes again
    batch.flush()
    for x, p in zip(xs, ps):
        assert torch.equal(x, torch.full((10,), 3.0, dtype=torch.float64))
        assert torch.equal(p, x)


def test_a_map_run_at_once_waits_for_queued_maps_that_write_its_tensors():
    """A batched (deferred) map writes a; a broadcast map, which runs at once, then reads a
    without a yield in between: the engine flushes the batch first, so the result is the
    reference engine's, not one computed from a's old values."""
    from adamkit.algorithms.adafactor import (AdafactorScalars, _apply_update, _ema_rsqrt,
                                              _update_sq)
    from adamkit.engines.reference import ReferenceEngine

    s = AdafactorScalars(lr=0.01, one_minus_beta2=0.5, rho=0.01, eps1=1e-30, eps2=1e-3, d=1.0,
                         weight_decay=0.0, step_size=0.01, max_rsqrt=1e6)
    gen = torch.Generator().manual_seed(2)
    p0, g0 = (torch.randn(300, 40, generator=gen) for _ in range(2))
    row0, new0 = (torch.rand(300, 1, generator=gen) + 0.5 for _ in range(2))
    col = torch.rand(1, 40, generator=gen) + 0.5
    results = []
    for engine in ("reference", "fused"):
        batch = cpu.KernelBatch()
        e = ReferenceEngine(torch.float32) if engine == "reference" else \
            cpu.FusedEngine(torch.float32, batch=batch)
        p, g, row, a = p0.clone(), g0.clone(), row0.clone(), new0.clone()
        e.map(_ema_rsqrt, s, [row, a], [row, a])  # queued by the fused engine
        if engine == "fused":
            assert len(batch) == 1 and torch.equal(a, new0)
        sums = e.map(_update_sq, s, [p, g, a, col], [], n_sums=2)  # runs at once
        if engine == "fused":
            assert len(batch) == 0
        e.map(_apply_update, s, [p, g, a, col], [p])
        batch.flush()
        results.append((p, row, a, sums))
    (p_ref, row_ref, a_ref, sums_ref), (p, row, a, sums) = results
    assert not torch.equal(a_ref, new0)
    for mine, ref in ((p, p_ref), (row, row_ref), (a, a_ref)):
        assert _rel(mine, ref) <= 1e-6
    for mine, ref in zip(sums, sums_ref):
        assert abs(mine - ref) <= 1e-5 * abs(ref)


@pytest.mark.parametrize("config", ["float32-int8", "bfloat16-sr", "float64"])
@pytest.mark.parametrize("name", ["fadam", "adafactor"])
def test_generator_rules_repeat_their_maps_and_notice_every_change(name, config, monkeypatch):
    """From a parameter's second step a generator apply (FAdam, Adafactor) runs on an engine
    given the maps it queued last step, which re-queues each without the per-operand checks
    (optimizer._LockstepPlan, FusedEngine(calls=...)). Bitwise against the same steps with
    those plans switched off, through: fresh gradients, a new learning rate, ``p.data``
    replaced, state loaded from a checkpoint, ``maximize`` switched, a parameter sitting a
    step out, a non-contiguous gradient. Parameters: a matrix whose factored maps are batched,
    a 3x3 whose maps run at once, a vector, and one of 5000 elements (8-bit state in the
    int8 config). The plan must be taken exactly where nothing it depends on changed, and
    every map of an unchanged parameter's batched passes must be repeated, none rebuilt."""
    dtype, state_dtype, sr = {"float32-int8": (torch.float32, "int8", False),
                              "bfloat16-sr": (torch.bfloat16, None, True),
                              "float64": (torch.float64, None, False)}[config]
    verdicts, repeats = [], []
    plan_repeat = adamkit.engines.plans._LockstepPlan.repeat
    engine_repeat = cpu.FusedEngine._repeat

    def spy_plan(self, *args):
        result = plan_repeat(self, *args)
        verdicts.append(result)
        return result

    def spy_engine(self, *args):
        result = engine_repeat(self, *args)
        repeats.append(result is not None)
        return result

    def run(fast):
        monkeypatch.setattr(adamkit.engines.plans._LockstepPlan, "repeat", spy_plan)
        monkeypatch.setattr(cpu.FusedEngine, "_repeat", spy_engine)
        # the per-tensor plans, without the group-level one of a vectorized apply (FAdam)
        monkeypatch.setattr(adamkit.engines.cohort._GroupLockstepPlan, "record",
                            classmethod(lambda *args: None))
        if not fast:
            monkeypatch.setattr(adamkit.engines.plans._LockstepPlan, "record",
                                classmethod(lambda *args: None))
        gen = torch.Generator().manual_seed(11)
        params = [torch.randn(s, generator=gen).to(dtype).requires_grad_()
                  for s in [(40, 30), (3, 3), (7,), (5000,)]]
        opt = adamkit.create(name, params, lr=LR.get(name, 0.01), state_dtype=state_dtype,
                             stochastic_rounding=sr)
        log = []

        def step(skip=()):
            for i, p in enumerate(params):
                p.grad = None if i in skip else torch.randn(p.shape, generator=gen).to(dtype)
            verdicts.clear()
            repeats.clear()
            opt.step()
            log.append((list(verdicts), all(repeats), len(repeats)))

        step()  # full path, plans recorded
        step()
        for group in opt.param_groups:
            group["lr"] *= 0.5
        step()
        params[0].data = params[0].data.clone()
        step()  # parameter 0: full path
        opt.load_state_dict(opt.state_dict())
        step()  # new state objects (and loading drops the plans): full path for all
        opt.param_groups[0]["maximize"] = True
        step()  # settings changed: full path for all
        step()
        step(skip={2})
        step()
        g = torch.randn(30, 40, generator=gen).to(dtype).t()
        step()
        params[0].grad = g  # non-contiguous: the reference engine steps parameter 0
        verdicts.clear()
        repeats.clear()
        opt.step()
        log.append((list(verdicts), all(repeats), len(repeats)))
        step()  # no plan for parameter 0 (the reference engine ran it): full path
        step()
        monkeypatch.undo()
        state = [opt.state[p] for p in params]
        return [p.detach().clone() for p in params], state, log

    fast, fast_state, log = run(True)
    slow, slow_state, slow_log = run(False)
    T, F = True, False
    assert [entry[0] for entry in log] == [
        [], [T, T, T, T], [T, T, T, T], [F, T, T, T], [], [F, F, F, F],
        [T, T, T, T], [T, T, T], [T, T, T, T], [T, T, T, T], [F, T, T, T], [T, T, T],
        [T, T, T, T]]
    # every repeated map fitted its entry; a step with all four plans taken repeats them all
    assert all(entry[1] for entry in log)
    assert log[1][2] == log[-1][2] > 0
    assert all(not entry[0] and entry[2] == 0 for entry in slow_log)
    _assert_same(fast, slow, fast_state, slow_state)


def test_a_repeated_map_that_no_longer_fits_takes_the_full_path():
    """FusedEngine(calls=...): a map whose operand changed shape or kind since the entry was
    recorded, whose rule differs, or whose operand is now read negated (maximize), is not
    re-queued from the entry; it is built anew (and the entry rewritten), giving what a fresh
    engine gives."""
    calls = []
    x = torch.ones(10, dtype=torch.float64)
    outputs = []

    def phase(c, y=None, negate=None):
        batch = cpu.KernelBatch()
        engine = cpu.FusedEngine(torch.float64, batch=batch, calls=calls, trusted=(x,),
                                       negate=negate)
        engine.map(_add, _Unused(0.0), [x, c], [x])
        if y is not None:
            engine.map(_accumulate, _Unused(0.0), [y, x], [y])
        batch.flush()
        outputs.append(x.clone())

    phase(2.0)  # recorded: (x, number)
    assert calls[0].roles == (0, -1)  # x is trusted object 0; the number is not a tensor
    entry = calls[0]
    phase(1.0)  # repeated with the new number
    assert calls[0] is entry
    phase(torch.full((10,), 0.5, dtype=torch.float64))  # a tensor where a number was
    assert calls[0] is not entry and calls[0].spec[1] == ("f64", "f64")
    entry = calls[0]
    phase(torch.full((5,), 0.5, dtype=torch.float64)[:1].expand(10))  # broadcast: not batched
    assert calls[0] is None
    y = torch.zeros(10, dtype=torch.float64)
    phase(0.25, y)  # a second map: a new entry
    assert len(calls) == 2 and calls[1].spec[0] is _accumulate
    c = torch.full((10,), 0.5, dtype=torch.float64)
    phase(c)
    entry = calls[0]
    phase(c, negate=c)  # the same operands, c now read with its sign flipped
    assert calls[0] is not entry and calls[0].spec[9] == (1,)
    assert [float(o[0]) for o in outputs] == [3.0, 4.0, 4.5, 5.0, 5.25, 5.75, 5.25]
    assert torch.equal(y, torch.full((10,), 5.25, dtype=torch.float64))


def test_a_vectorized_apply_must_queue_the_maps_it_recorded():
    """A generator apply that declares vectorized_apply runs once per param group from the
    group's second step, standing for every tensor; if it then queues other maps than the
    per-tensor generators recorded (a branch on something other than its inputs), the step
    stops with an error naming the contract. A subclass that overrides apply does not inherit
    the declaration."""
    from adamkit.algorithms.fadam import FAdam, _square
    from adamkit.optimizer import _vectorizes

    class Drifting(FAdam):
        vectorized_apply = True
        extra = 0  # maps of g^2 queued after FAdam's passes

        def apply(self, engine, s, p, g, slots):
            yield from FAdam.apply(self, engine, s, p, g, slots)
            for _ in range(self.extra):
                yield engine.map(_square, s, [g], [], n_sums=1)

    class Overriding(FAdam):
        def apply(self, engine, s, p, g, slots):
            return FAdam.apply(self, engine, s, p, g, slots)

    assert _vectorizes(FAdam) and _vectorizes(Drifting)
    assert not _vectorizes(Overriding)
    for recorded, now, message in [(0, 1, "one call more than recorded"),
                                    (1, 0, "fewer calls than recorded")]:
        params = [torch.randn(50, requires_grad=True), torch.randn(4, 5, requires_grad=True)]
        opt = Drifting(params, lr=0.01)

        def step(extra):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.extra = extra
            opt.step()

        step(recorded)  # per tensor: the maps are recorded
        step(recorded)  # vectorized, as recorded
        with pytest.raises(RuntimeError,
                           match=f"vectorized apply: .*{message}.*vectorized_apply = True"):
            step(now)


def test_adafactor_tensors_the_vectorized_pass_cannot_take_stay_per_tensor(monkeypatch):
    """Adafactor's vectorized group pass covers vectors and matrices whose maps are batched
    and whose norm (the mean of the row factor) is one number: 2-D weights, and N-D ones with
    one matrix. A conv kernel (3x3 matrices: maps run at once) and a stack of matrices (a
    norm per matrix: a tensor) stay on the per-tensor path every step, alongside. Bitwise
    against the same steps with the group pass off."""
    from adamkit.optimizer import _GroupLockstepPlan

    shapes = [(4, 100, 100), (16, 8, 3, 3), (1, 30, 40), (50,), (60, 70), (8, 500, 1)]
    plans = []
    record = _GroupLockstepPlan.record.__func__

    def spy(cls, *args):
        plan = record(cls, *args)
        plans.append(plan)
        return plan

    def run(fast):
        monkeypatch.setattr(_GroupLockstepPlan, "record",
                            classmethod(spy if fast else lambda *args: None))
        gen = torch.Generator().manual_seed(8)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        opt = adamkit.Adafactor(params, lr=0.05)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        monkeypatch.undo()
        return [p.detach().clone() for p in params], [opt.state[p] for p in params]

    fast, fast_state = run(True)
    slow, slow_state = run(False)
    assert len(plans) == 1 and plans[0] is not None  # recorded once, then repeated
    assert plans[0].rest == (0, 1, 5)
    covered = sorted(len(cohort.positions) for cohort in plans[0].parts)
    assert covered == [1, 2]  # the vector; the two single matrices (same maps)
    _assert_same(fast, slow, fast_state, slow_state)


class _SignScalars(NamedTuple):
    lr: float
    sign: float  # per tensor, from its first pass's sum: +1 or -1


def _sq(s: _SignScalars, g):
    return g * g


def _signed_sum(s: _SignScalars, p, g):
    if s.sign > 0:
        return p * g
    return 2.0 * p * g


def _signed_step(s: _SignScalars, p, g):
    if s.sign > 0:
        return p - s.lr * g
    return p + s.lr * g


class _Signed(adamkit.optimizer.Optimizer):
    """A rule whose kernels branch on a scalar computed from each tensor's sums."""

    checks = {}
    scalars_from_step = True
    vectorized_apply = True

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr, maximize=False))

    def scalars(self, group, state):
        self.advance_step(state)
        return _SignScalars(lr=float(group["lr"]), sign=math.nan)

    def apply(self, engine, s, p, g, slots):
        (g_sq,) = yield engine.map(_sq, s, [g], [], n_sums=1)
        s = s._replace(sign=(g_sq > p.numel()) * 2.0 - 1.0)
        (pg,) = yield engine.map(_signed_sum, s, [p, g], [], n_sums=1)
        s = s._replace(lr=s.lr / (1.0 + abs(pg)))
        engine.map(_signed_step, s, [p, g], [p])


def test_a_vectorized_map_whose_kernel_branches_per_tensor_splits_its_block(monkeypatch):
    """When a scalar a kernel branches on differs between the tensors of a vectorized run,
    the map is queued as one block per branch outcome, and each tensor's sums come back at
    its own index (here they set its next step size): bitwise as the per-tensor path, with
    tensors of both outcomes interleaved."""
    from adamkit.engines import cohort
    from adamkit.engines.cohort import _GroupLockstepPlan

    outcomes = []
    split = compiler.block_outcomes

    def spy(fn, s, dtype, rows):
        result = split(fn, s, dtype, rows)
        outcomes.append((fn, [None if i is None else i.tolist() for _, i in result]))
        return result

    def run(fast):
        if not fast:
            monkeypatch.setattr(_GroupLockstepPlan, "record", classmethod(lambda *a: None))
        monkeypatch.setattr(cohort, "block_outcomes", spy)
        gen = torch.Generator().manual_seed(6)
        params = [torch.randn(n, generator=gen, dtype=torch.float64).requires_grad_()
                  for n in (300, 5000, 40, 7)]
        opt = _Signed(params)
        for _ in range(3):
            for i, p in enumerate(params):  # mean g^2 about 4 (sign +1) or 1/4 (-1)
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (
                    2.0 if i % 2 == 0 else 0.5)
            opt.step()
        monkeypatch.undo()
        return [p.detach().clone() for p in params]

    fast = run(True)
    assert (_signed_sum, [[0, 2], [1, 3]]) in outcomes  # split, in both vectorized steps
    assert (_sq, [None]) in outcomes  # no branch: one block
    outcomes.clear()
    slow = run(False)
    assert not outcomes
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(70, 90), (3, 40, 50), (2, 1100, 1001), (1, 70000),
                                   (300, 9)])
@pytest.mark.parametrize("dtype,state_dtype,tol", [
    (torch.float64, torch.float64, 1e-13), (torch.float32, torch.float32, 2e-6),
    (torch.bfloat16, torch.bfloat16, 2e-6), (torch.bfloat16, torch.float32, 2e-6)],
    ids=["float64", "float32", "bfloat16", "bfloat16-float32-state"])
def test_sq_stats_last_dims_matches_torch(shape, dtype, state_dtype, tol):
    """FusedEngine.sq_stats_last_dims (Adafactor's pass over g and p) against float64 torch:
    the row rule's new state and a from the row means of x^2, the column means of x^2, the
    column sums of (a x)^2 over the rows whose x is not all zero, sum(y^2) and the largest a
    of those rows and of the others (0 where there are none: 1 x 70000). Every third row of x
    is zero; 1100 x 1001 is two bands. bfloat16 x and y are computed in float32 (a, the
    column means and w are float32), a bfloat16 row state is stored rounded to nearest: a
    comes from the unrounded state, as in the reference engine."""
    from adamkit.algorithms.adafactor import AdafactorScalars, _ema_rsqrt

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x[..., 1::3, :] = 0.0
    y = torch.randn(shape, generator=gen, dtype=torch.float64)
    state = torch.rand(shape[:-1] + (1,), generator=gen, dtype=torch.float64) * 1e-3
    s = AdafactorScalars(lr=0.01, one_minus_beta2=0.3, rho=0.01, eps1=1e-30, eps2=1e-3, d=1.0,
                         weight_decay=0.0, step_size=math.nan, max_rsqrt=math.nan)
    got_state = state.to(state_dtype).clone()
    engine = cpu.FusedEngine(dtype)
    assert engine.makes_row_stats(got_state, x.to(dtype), y.to(dtype))
    a, cols, w, sums = engine.sq_stats_last_dims(
        _ema_rsqrt, s, got_state, x.to(dtype), y.to(dtype))
    x, y = x.to(dtype).double(), y.to(dtype).double()
    rows = (x * x).mean(dim=-1, keepdim=True)
    want_state = state.to(state_dtype).double() * 0.7 + rows * 0.3
    want_a = 1 / want_state.sqrt()
    zero = rows == 0
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert a.dtype == cols.dtype == w.dtype == compute and got_state.dtype == state_dtype
    state_tol = 2.0**-8 if state_dtype == torch.bfloat16 else tol  # rounded to nearest
    assert _rel(got_state, want_state) <= state_tol and _rel(a, want_a) <= tol
    assert _rel(cols, (x * x).mean(dim=-2, keepdim=True)) <= tol
    assert _rel(w, ((want_a * x) ** 2).sum(dim=-2, keepdim=True)) <= tol
    assert sums[0] == pytest.approx((y * y).sum().item(), rel=tol)
    for found, rows_of in zip(sums[1:3], (~zero, zero)):  # 0 where there are no such rows
        want = want_a[rows_of].max().item() if rows_of.any() else 0.0
        assert found == pytest.approx(want, rel=tol)
    assert sums[3] == pytest.approx((x * x).sum().item(), rel=tol)
    want_min = want_a[~zero].min().item() if (~zero).any() else math.inf
    assert sums[4] == pytest.approx(want_min, rel=tol)


def test_sq_stats_last_dims_rounds_bfloat16_row_state_as_a_map_does():
    """With stochastic rounding a bfloat16 row state gets the random bits the map of the
    row rule would give it (the same seed, element by element), so the one-pass kernel and
    the per-element path store the same bits. x's values make the row means exact in either
    order of summation (small integers, 64 columns), so the rule sees the same inputs."""
    from adamkit.algorithms.adafactor import AdafactorScalars, _ema_rsqrt
    from adamkit.engines.reference import ReferenceEngine

    s = AdafactorScalars(lr=0.01, one_minus_beta2=0.3, rho=0.01, eps1=1e-30, eps2=1e-3, d=1.0,
                         weight_decay=0.0, step_size=math.nan, max_rsqrt=math.nan)
    gen = torch.Generator().manual_seed(14)
    x = torch.randint(-3, 4, (300, 64), generator=gen).to(torch.bfloat16)
    state = (torch.rand(300, 1, generator=gen) * 3).to(torch.bfloat16)
    results = []
    for one_pass in (True, False):
        engine = cpu.FusedEngine(torch.bfloat16, seed=777, stochastic_bf16=True)
        st = state.clone()
        if one_pass:
            a, _, w, _ = engine.sq_stats_last_dims(_ema_rsqrt, s, st, x, x)
            assert w is not None
        else:  # mean_sq_last_dims, then the rule as a map (fused, with the same seed)
            a, _, w, _ = ReferenceEngine.sq_stats_last_dims(engine, _ema_rsqrt, s, st, x, x)
            assert w is None
        results.append((a, st))
    (a, st), (a_map, st_map) = results
    assert torch.equal(a, a_map)
    assert torch.equal(st, st_map)
    unrounded = state.float() * 0.7 + (x.float() ** 2).mean(dim=1, keepdim=True) * 0.3
    nearest = unrounded.to(torch.bfloat16)
    assert not torch.equal(st, nearest)  # rounded stochastically: some rows went the other way
    assert _rel(st, unrounded) <= 2.0**-7


def test_sq_stats_last_dims_leaves_other_tensors_to_the_reference_path():
    """Small matrices (a conv kernel's 3x3) and a non-contiguous x take the reference
    engine's path: no column sums of (a x)^2, no sums, and the same a as it."""
    from adamkit.algorithms.adafactor import AdafactorScalars, _ema_rsqrt
    from adamkit.engines.reference import ReferenceEngine

    s = AdafactorScalars(lr=0.01, one_minus_beta2=0.3, rho=0.01, eps1=1e-30, eps2=1e-3, d=1.0,
                         weight_decay=0.0, step_size=math.nan, max_rsqrt=math.nan)
    gen = torch.Generator().manual_seed(12)
    cases = [((16, 8, 3, 3), torch.float32, torch.float32),
             ((16, 8, 3, 3), torch.bfloat16, torch.bfloat16),
             ((50, 40), torch.bfloat16, torch.float32)]
    for shape, dtype, state_dtype in cases:
        x = torch.randn(shape, generator=gen).to(dtype)
        if shape == (50, 40):
            x = torch.randn(shape[::-1], generator=gen).to(dtype).t()
        state = torch.rand(shape[:-1] + (1,), generator=gen).to(state_dtype)
        results = []
        for engine in (cpu.FusedEngine(dtype), ReferenceEngine(dtype)):
            st = state.clone()
            a, cols, w, sums = engine.sq_stats_last_dims(_ema_rsqrt, s, st, x, x)
            assert w is None and sums is None, (shape, dtype, engine)
            results.append((a, cols, st))
        for got, want in zip(*results):
            assert _rel(got, want) <= 1e-6, (shape, dtype)


def _adafactor_redo_flags(monkeypatch) -> list:
    """Record every ``where`` Adafactor passes to sums_where (per tensor or per cohort)."""
    from adamkit.engines import cohort

    seen = []
    for cls in (cpu.FusedEngine, cohort._BlockEngine):
        original = cls.sums_where

        def record(self, where, *args, _original=original):
            seen.append(bool(torch.as_tensor(where).any()))
            return _original(self, where, *args)

        monkeypatch.setattr(cls, "sums_where", record)
    return seen


@pytest.mark.parametrize("case,redo", [
    ("plain", False),
    ("zero rows", False),  # rows of g that are all zero add nothing, whatever their a
    ("clamped", False),  # eps1 = 0.1: 1/sqrt(V) ~ 100 is clamped at 10 everywhere: g^2 / eps1^2
    ("partly clamped", True),  # eps1 = 0.01 and rows of g from 0.1x to 10x: some clamped
    ("eps1 0, zero rows", True),  # 0 * inf in U: NaN, as the reference gives
    ("nan gradient", True),
])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)],
                         ids=["float64", "float32"])
def test_adafactor_one_pass_sum_matches_per_element_pass(monkeypatch, case, redo, dtype, tol):
    """The fused engine's sum(U^2) from column sums (sum_j b_j^2 W_j) gives the reference's
    step for 10 steps, and falls back to the per-element pass exactly where that sum would
    differ (the clamp at 1/eps1 on some elements, NaN): NaN in the same places, the rest
    within tol. Where the clamp acts on every element the sum is sum(g^2) / eps1^2."""
    shapes = [(70, 90), (3, 40, 50), (300, 257), (100,)]
    eps = {"clamped": (0.1, 1e-3), "partly clamped": (0.01, 1e-3),
           "eps1 0, zero rows": (0.0, 1e-3)}.get(case, (None, 1e-3))
    seen = _adafactor_redo_flags(monkeypatch)
    results = []
    for backend in ("reference", "fused"):
        gen = torch.Generator().manual_seed(13)
        params = [torch.randn(sh, generator=gen, dtype=torch.float64).to(dtype)
                  for sh in shapes]
        opt = adamkit.Adafactor(params, lr=0.05, eps=eps, weight_decay=0.1, backend=backend)
        for step in range(10):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64)
                          * 1e-2).to(dtype)  # 1/sqrt(V) ~ 100: over 1/eps1 = 10 when clamped
                if "zero rows" in case and p.dim() > 1:
                    p.grad[..., 1::4, :] = 0.0
                if case == "clamped" and step >= 8:  # RMS(U) over d: the sum matters
                    p.grad *= 15
                if case == "partly clamped" and p.dim() > 1:
                    p.grad *= torch.logspace(-1, 1, p.shape[-2], dtype=dtype)[:, None]
                if case == "nan gradient" and step == 7 and p.dim() > 1:
                    p.grad[..., 2, 3] = math.nan
            opt.step()
        results.append((params, opt))
    (ref, ref_opt), (fused, opt) = results
    assert seen and any(seen) == redo
    for i, (p, q) in enumerate(zip(fused, ref)):
        assert torch.equal(p.isnan(), q.isnan()), (case, i)
        if case in ("eps1 0, zero rows", "nan gradient") and p.dim() > 1:
            assert p.isnan().all(), (case, i)  # its step size is NaN: so is all of it
        assert _rel(p.nan_to_num(), q.nan_to_num()) <= tol, (case, i)
        for key in opt.state[p]:
            if key != "step":
                got, want = opt.state[p][key], ref_opt.state[q][key]
                assert torch.equal(got.isnan(), want.isnan()), (case, i, key)
                assert _rel(got.nan_to_num(), want.nan_to_num()) <= tol, (case, i, key)
