"""Muon against torch.optim.Muon, its AdamW groups against torch.optim.AdamW, on both engines;
param_groups(model, muon=True); the non-2-D error; checkpoints."""

import copy
import io

import pytest
import torch
from torch import nn

import adamkit
from adamkit.engines.reference import ReferenceEngine, newton_schulz

pytestmark = pytest.mark.filterwarnings("ignore")

BACKENDS = ["reference", "fused"]
# tall, wide, square, zero-size, and one that is built non-contiguous (a transposed view)
SHAPES = [(7, 3), (3, 8), (4, 4), (0, 5), "noncontig"]
# ulp-level differences (torch's lerp_/add_ fuse a multiply-add) between two float32 runs
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        if shape == "noncontig":
            t = torch.randn(5, 6, generator=gen, dtype=dtype).t()  # (6, 5), strides (1, 6)
            assert not t.is_contiguous()
        else:
            t = torch.randn(*shape, generator=gen, dtype=dtype)
        out.append(t)
    return out


def _run(make_ours, make_torch, tensors, steps=20, seed=1):
    ours = [nn.Parameter(t.clone()) for t in tensors]
    theirs = [nn.Parameter(t.clone()) for t in tensors]
    opt_ours, opt_theirs = make_ours(ours), make_torch(theirs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen, dtype=a.dtype)
            a.grad = g.clone()
            b.grad = g.clone()
        opt_ours.step()
        opt_theirs.step()
    return ours, theirs, opt_ours, opt_theirs


FLAGS = [
    dict(),
    dict(nesterov=False),
    dict(adjust_lr_fn="original"),
    dict(adjust_lr_fn="match_rms_adamw"),
    dict(weight_decay=0.0, momentum=0.8, eps=1e-5),
    dict(ns_steps=3, ns_coefficients=(2.0, -1.5, 0.5)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flags", FLAGS, ids=str)
def test_matches_torch_muon(backend, dtype, flags):
    tensors = _params(dtype)
    half = len(tensors) // 2

    def groups(ps):  # two param groups, the second with its own lr and momentum
        return [{"params": ps[:half]}, {"params": ps[half:], "lr": 0.05, "momentum": 0.9}]

    # "auto": the fused engine where it can run (the transposed tensor takes the reference)
    chosen = "auto" if backend == "fused" else backend
    ours, theirs, opt, ref = _run(
        lambda ps: adamkit.Muon(groups(ps), lr=0.02, backend=chosen, **flags),
        lambda ps: torch.optim.Muon(groups(ps), lr=0.02, **flags), tensors)
    for a, b, start in zip(ours, theirs, tensors):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, **TOL[dtype])
        torch.testing.assert_close(opt.state[a]["momentum_buffer"],
                                   ref.state[b]["momentum_buffer"], **TOL[dtype])
        if a.numel():
            assert not torch.equal(a, start)  # it moved
    # the fused engine took the contiguous tensors (the transposed one falls back)
    assert opt.engines_used == ({"reference"} if backend == "reference"
                                else {"fused", "reference"})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamw_groups_match_torch_adamw(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    vectors = [torch.randn(7, generator=gen, dtype=dtype),
               torch.randn(2, 3, 4, generator=gen, dtype=dtype),  # a conv-like kernel
               torch.randn(0, generator=gen, dtype=dtype)]
    matrix = torch.randn(4, 6, generator=gen, dtype=dtype)
    adamw = [dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
             dict(lr=1e-3, weight_decay=0.0)]
    ours = [nn.Parameter(t.clone()) for t in vectors]
    theirs = [nn.Parameter(t.clone()) for t in vectors]
    m = nn.Parameter(matrix.clone())
    opt = adamkit.Muon([{"params": [m]},
                        {"params": ours[:2], "use_muon": False, **adamw[0]},
                        {"params": ours[2:], "use_muon": False, **adamw[1]}],
                       lr=0.02, backend=backend)
    ref = torch.optim.AdamW([{"params": theirs[:2], **adamw[0]},
                             {"params": theirs[2:], **adamw[1]}])
    for _ in range(20):
        m.grad = torch.randn(m.shape, generator=gen, dtype=dtype)
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen, dtype=dtype)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tol)
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[a][name], ref.state[b][name], **tol)
    assert set(opt.state[m]) == {"momentum_buffer"}
    # a group without betas/eps/weight_decay takes torch.optim.AdamW's defaults
    assert (opt.param_groups[2]["betas"], opt.param_groups[2]["eps"]) == ((0.9, 0.999), 1e-8)


def test_orthogonalize_is_torchs_newton_schulz():
    from torch.optim._muon import _zeropower_via_newtonschulz

    gen = torch.Generator().manual_seed(0)
    for shape in [(9, 4), (4, 9), (5, 5)]:
        u = torch.randn(shape, generator=gen)
        ours = ReferenceEngine(torch.float32).orthogonalize(u, (3.4445, -4.775, 2.0315), 5, 1e-7)
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours, _zeropower_via_newtonschulz(u, (3.4445, -4.775, 2.0315), 5, 1e-7))
        # nearly orthogonal rows/columns: singular values near 1, far from u's
        sv = torch.linalg.svdvals(ours.float())
        assert sv.min() > 0.5 and sv.max() < 1.5
    u = torch.randn(4, 6, generator=gen).bfloat16()
    before = u.clone()
    newton_schulz(u, (3.4445, -4.775, 2.0315), 5, 1e-7)
    assert torch.equal(u, before)  # the input is never written


def test_non_2d_parameter_is_an_error_naming_it():
    good = nn.Parameter(torch.randn(3, 3))
    bias = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 has shape \(3,\)"):
        adamkit.Muon([good, bias])
    opt = adamkit.Muon([good])
    with pytest.raises(ValueError, match=r"parameter 0 of param group 1 has shape \(2, 2, 2\)"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 2, 2))]})
    assert len(opt.param_groups) == 1  # nothing changed
    opt.add_param_group({"params": [bias], "use_muon": False})  # AdamW takes it
    with pytest.raises(ValueError, match="ns_steps"):
        adamkit.Muon([good], ns_steps=100)
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        adamkit.Muon([good], adjust_lr_fn="other")


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d, bias=False)


class _TinyLM(nn.Module):
    def __init__(self, vocab=11, d=8, tied=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.blocks = nn.ModuleList([_Block(d), _Block(d)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, x):
        h = self.embed(x)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            q, _, _ = block.qkv(block.norm(h)).chunk(3, dim=-1)
            h = h + block.proj(torch.tanh(q))
        return self.head(self.norm(h))


def _names(model, groups):
    name = {id(p): n for n, p in model.named_parameters()}
    return [(g.get("use_muon"), g.get("weight_decay"), sorted(name[id(p)] for p in g["params"]))
            for g in groups]


@pytest.mark.parametrize("tied", [True, False])
def test_param_groups_muon_split(tied):
    model = _TinyLM(tied=tied)
    groups = adamkit.param_groups(model, muon=True, weight_decay=0.1)
    muon_matrices = ["blocks.0.proj.weight", "blocks.0.qkv.weight",
                     "blocks.1.proj.weight", "blocks.1.qkv.weight"]
    adamw_decayed = ["conv.weight", "embed.weight"] + ([] if tied else ["head.weight"])
    no_decay = ["blocks.0.norm.bias", "blocks.0.norm.weight", "blocks.0.qkv.bias",
                "blocks.1.norm.bias", "blocks.1.norm.weight", "blocks.1.qkv.bias",
                "conv.bias", "norm.bias", "norm.weight"]
    assert _names(model, groups) == [(True, 0.1, muon_matrices),
                                     (False, 0.1, adamw_decayed), (False, 0.0, no_decay)]
    # weight_decay None: the decayed groups take the optimizer's
    assert [g.get("weight_decay") for g in adamkit.param_groups(model, muon=True)] == \
        [None, None, 0.0]
    # without muon=True the function is unchanged: two groups, no use_muon key
    assert all("use_muon" not in g for g in adamkit.param_groups(model, 0.1))
    with pytest.raises(ValueError, match="weight_decay"):
        adamkit.param_groups(model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_trains_a_model_from_param_groups(backend):
    torch.manual_seed(0)
    model = _TinyLM()
    opt = adamkit.Muon(adamkit.param_groups(model, muon=True), lr=0.02, backend=backend)
    x = torch.randint(0, 11, (8, 6))
    y = torch.roll(x, 1, dims=1)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_round_trip_and_torch_layout(backend):
    tensors = _params(torch.float64)[:3]
    ours, theirs, opt, ref = _run(
        lambda ps: adamkit.Muon(ps, lr=0.02, backend=backend),
        lambda ps: torch.optim.Muon(ps, lr=0.02), tensors, steps=5)
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    sd = torch.load(saved)
    assert set(sd["state"][0]) == set(ref.state_dict()["state"][0]) == {"momentum_buffer"}
    # adamkit -> adamkit and torch -> adamkit both continue as torch does
    for source in (sd, ref.state_dict()):
        clone = [nn.Parameter(p.detach().clone()) for p in ours]
        resumed = adamkit.Muon(clone, lr=0.02, backend=backend)
        resumed.load_state_dict(copy.deepcopy(source))  # loading may alias the tensors
        twin = [nn.Parameter(p.detach().clone()) for p in theirs]
        ref2 = torch.optim.Muon(twin, lr=0.02)
        ref2.load_state_dict(copy.deepcopy(ref.state_dict()))
        gen = torch.Generator().manual_seed(9)
        for _ in range(5):
            for a, b in zip(clone, twin):
                a.grad = torch.randn(a.shape, generator=gen, dtype=a.dtype)
                b.grad = a.grad.clone()
            resumed.step()
            ref2.step()
        for a, b in zip(clone, twin):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # adamkit -> torch
    back = torch.optim.Muon([nn.Parameter(p.detach().clone()) for p in ours], lr=0.02)
    back.load_state_dict(opt.state_dict())
    for i, p in enumerate(back.param_groups[0]["params"]):
        assert torch.equal(back.state[p]["momentum_buffer"], opt.state[ours[i]]["momentum_buffer"])


def test_registry_and_harness_names():
    assert "muon" in adamkit.available()
    assert type(adamkit.create("muon", [nn.Parameter(torch.zeros(2, 2))])) is adamkit.Muon
