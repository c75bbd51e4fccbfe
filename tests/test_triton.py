"""The Triton engine (backend="triton"), run on CPU tensors by Triton's interpreter, against the
reference engine (float32) and the CPU engine's codes (bfloat16, int8); ahead-of-time
compilation of its kernels for sm_80 and sm_90 (marker ``aot``, in a subprocess without the
interpreter)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install adamkit[gpu])")

import adamkit  # noqa: E402
from adamkit.engines import cpu as fused_cpu  # noqa: E402
from adamkit.engines import gpu  # noqa: E402
from adamkit.storage import BlockQuantized  # noqa: E402

pytestmark = pytest.mark.skipif(not gpu.interpreting(),
                                reason="TRITON_INTERPRET was set to 0 before this module")

SHAPES = [(0,), (1,), (1025,), (2, 3, 4, 5)]
# (optimizer, options) — every optimizer, and the options that change its kernel
CASES = [
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("adagrad", {"weight_decay": 0.1}),
    ("rmsprop", {"momentum": 0.9, "centered": True}),
    ("adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("adamw", {}),
    ("nadam", {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("radam", {}),
    ("adamax", {"weight_decay": 0.1}),
    ("adabound", {"amsbound": True}),
    ("adamod", {}),
    ("adabelief", {"amsgrad": True}),
    ("lion", {"weight_decay": 0.1}),
    ("fadam", {}),
    ("adafactor", {}),
]


def _params(dtype=torch.float32, shapes=SHAPES, seed=0):
    torch.manual_seed(seed)
    return [(torch.randn(s) * 0.5).to(dtype).requires_grad_() for s in shapes]


def _run(backend, name, options, steps=8, dtype=torch.float32, shapes=SHAPES, nan_at=None,
         **kw):
    params = _params(dtype, shapes)
    half = len(params) // 2
    # two param groups; the second maximizes with its own learning rate
    groups = [{"params": params[:half]},
              {"params": params[half:], "lr": 2e-3, "maximize": True}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = adamkit.create(name, groups, backend=backend, **options, **kw)
        for i in range(steps):
            gen = torch.Generator().manual_seed(100 + i)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            if nan_at == i:
                params[-1].grad.view(-1)[3] = float("nan")
            opt.step()
    return params, opt


def _state_tensors(opt):
    out = []
    for p in (p for g in opt.param_groups for p in g["params"]):
        for k, v in sorted(opt.state[p].items()):
            if isinstance(v, BlockQuantized):
                out += [(k, v.codes), (k, v.absmax)]
            elif isinstance(v, torch.Tensor):
                out.append((k, v))
    return out


@pytest.mark.parametrize("name,options", CASES, ids=[c[0] for c in CASES])
def test_float32_matches_reference(name, options):
    got, opt_t = _run("triton", name, options)
    want, opt_r = _run("reference", name, options)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    sa, sb = _state_tensors(opt_t), _state_tensors(opt_r)
    assert [k for k, _ in sa] == [k for k, _ in sb]
    for (k, a), (_, b) in zip(sa, sb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")


def test_the_kernels_run_and_the_engine_is_triton(monkeypatch):
    # a broken kernel must not pass by falling back: count the launches
    from adamkit.engines.gpu import engine

    launches = []
    real = engine._run
    monkeypatch.setattr(engine, "_run", lambda launch, found: (launches.append(launch.spec[0]),
                                                              real(launch, found)))
    _run("triton", "adam", {}, steps=1)
    # two groups with different maximize: two kernels, each launched once for its tensors
    assert len(launches) == 2


needs_numba = pytest.mark.skipif(not fused_cpu.available(), reason="the CPU engine needs numba")


@needs_numba
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_bfloat16_matches_cpu_engine_bitwise(name, stochastic):
    # bfloat16 parameters and state: rounding to nearest-even, or stochastic rounding with the
    # CPU engine's random bits, bit for bit
    kw = dict(dtype=torch.bfloat16, state_dtype="bfloat16", stochastic_rounding=stochastic,
              steps=3, shapes=[(7,), (1025,)])
    got, opt_t = _run("triton", name, {}, **kw)
    want, opt_f = _run("fused", name, {}, **kw)
    for a, b in zip(got, want):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    for (k, a), (_, b) in zip(_state_tensors(opt_t), _state_tensors(opt_f)):
        assert torch.equal(a, b), k


def test_float16_parameters_compute_in_float32():
    got, _ = _run("triton", "adam", {}, dtype=torch.float16, steps=3, shapes=[(5,), (33,)])
    want, _ = _run("reference", "adam", {}, dtype=torch.float16, steps=3, shapes=[(5,), (33,)])
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@needs_numba
def test_int8_state_matches_cpu_engine_codes():
    # nearest rounding: the format defines the codes, so both engines agree bit for bit
    def run(backend):
        params = _params(shapes=[(4100,), (8,)])
        opt = adamkit.AdamW(params, backend=backend, state_dtype="int8")
        opt.round_int8_stochastically = False
        for i in range(3):
            gen = torch.Generator().manual_seed(i)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params, opt

    got, opt_t = run("triton")
    want, opt_f = run("fused")
    assert isinstance(opt_t.state[got[0]]["exp_avg"], BlockQuantized)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for (k, a), (_, b) in zip(_state_tensors(opt_t), _state_tensors(opt_f)):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", ["adam", "fadam"])
def test_skip_on_nan_changes_nothing(name):
    params, opt = _run("triton", name, {}, steps=2, shapes=[(3,), (1025,)],
                       on_nonfinite="skip")
    before = [p.detach().clone() for p in params]
    state = [(k, v.clone()) for k, v in _state_tensors(opt)]
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[7] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert opt.skipped_steps == 1
    for a, b in zip(params, before):
        assert torch.equal(a, b)
    for (k, a), (_, b) in zip(_state_tensors(opt), state):
        assert torch.equal(a, b), k
    params[1].grad[7] = 0.0
    opt.step()  # and a finite step goes ahead
    assert not torch.equal(params[1], before[1])


def test_errors_name_the_problem_and_the_fix(monkeypatch):
    p = torch.zeros(3, requires_grad=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1.*backend='auto'"):
        adamkit.Adam([p], backend="triton")
    monkeypatch.setattr(gpu, "_checked", True)
    monkeypatch.setattr(gpu, "_IMPORT_ERROR", "ImportError: no module named triton")
    with pytest.raises(ValueError, match=r"needs Triton.*adamkit\[gpu\]"):
        adamkit.Adam([p], backend="triton")


def test_auto_stays_off_triton_for_cpu_tensors():
    p = torch.zeros(3, requires_grad=True)
    assert not gpu.chosen(adamkit.Adam([p]))
    assert gpu.chosen(adamkit.Adam([p], backend="triton"))


_AOT = """
import sys
from adamkit.bench import kernels
sys.exit(kernels.run(sys.argv[1], one_per_rule=sys.argv[2] == '1'))
"""


@pytest.mark.aot
@pytest.mark.parametrize("target", ["cuda:80", "cuda:90"])
def test_kernels_compile_ahead_of_time(target):
    # every rule's kernel by default (ADAMKIT_AOT_ALL=1: every kernel of every configuration,
    # several minutes); a subprocess, since the interpreter is on in this one
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))), "src"), env.get("PYTHONPATH")]))
    one = "0" if os.environ.get("ADAMKIT_AOT_ALL") == "1" else "1"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _AOT, target, one],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if ".update " in line or "._" in line]
    assert len(rows) >= 17  # one per rule at least: 14 optimizers, FAdam 3, Adafactor 3
    assert " 0 failed" in out.stdout
