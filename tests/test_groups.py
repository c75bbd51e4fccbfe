"""param_groups: exact membership of the decay and no-decay groups."""

import pytest
import torch
from torch import nn

from adamkit.groups import NORM_TYPES, param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(3, 4))  # a parameter of the root module itself
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.no_bias = nn.Linear(4, 4, bias=False)
        self.frozen = nn.Linear(4, 4)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied with the embedding


def names_of(model, groups):
    """Each group as (weight_decay, [names of its parameters in model.named_parameters()])."""
    name = {id(parameter): name for name, parameter in model.named_parameters()}
    return [(group["weight_decay"], [name[id(p)] for p in group["params"]]) for group in groups]


DECAYED = ["pos", "embed.weight", "proj.weight", "no_bias.weight"]
NOT_DECAYED = ["proj.bias", "norm.weight", "norm.bias", "bn.weight", "bn.bias", "frozen.bias"]


def test_default_membership_order_and_keys():
    model = Net()
    groups = param_groups(model, weight_decay=0.1)
    assert names_of(model, groups) == [(0.1, DECAYED), (0.0, NOT_DECAYED)]
    assert [set(group) for group in groups] == [{"params", "weight_decay"}] * 2
    assert all(isinstance(group["params"], list) for group in groups)


def test_each_trainable_parameter_exactly_once():
    model = Net()
    grouped = [p for group in param_groups(model, 0.1) for p in group["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    position = {id(p): index for index, p in enumerate(model.parameters())}
    for group in param_groups(model, 0.1):  # each group in model.parameters() order
        indices = [position[id(p)] for p in group["params"]]
        assert indices == sorted(indices)
    assert not any(p is model.frozen.weight for p in grouped)


def test_embeddings_not_decayed_on_request_and_tied_weight_follows():
    model = Net()
    groups = param_groups(model, weight_decay=0.05, decay_embeddings=False)
    assert names_of(model, groups) == [
        (0.05, ["pos", "proj.weight", "no_bias.weight"]),
        (0.0, ["embed.weight", *NOT_DECAYED]),
    ]


def test_no_decay_wins_for_a_tied_weight_whatever_the_owner_order():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 5, bias=False)
            self.embed = nn.Embedding(5, 3)
            self.embed.weight = self.head.weight

    model = HeadFirst()
    assert names_of(model, param_groups(model, 0.1, decay_embeddings=False)) == [
        (0.0, ["head.weight"])
    ]
    assert names_of(model, param_groups(model, 0.1)) == [(0.1, ["head.weight"])]


def test_name_patterns():
    model = Net()
    groups = param_groups(model, 0.1, no_decay=("pos", "proj.*"))
    assert names_of(model, groups) == [
        (0.1, ["embed.weight", "no_bias.weight"]),
        (0.0, ["pos", "proj.weight", *NOT_DECAYED]),
    ]
    # A single pattern need not be wrapped in a tuple; patterns are case-sensitive.
    assert names_of(model, param_groups(model, 0.1, no_decay="pos"))[1][1][0] == "pos"
    assert names_of(model, param_groups(model, 0.1, no_decay="POS"))[0][1] == DECAYED
    # The tied weight is also reachable under its second name.
    assert "embed.weight" in names_of(model, param_groups(model, 0.1, no_decay="head.*"))[1][1]


def test_module_types():
    model = Net()
    groups = param_groups(model, 0.1, no_decay=(nn.Linear,))
    # head is a Linear, so the weight it shares with the embedding is not decayed either.
    assert names_of(model, groups) == [
        (0.1, ["pos"]),
        (0.0, ["embed.weight", "proj.weight", "proj.bias", "norm.weight", "norm.bias",
               "bn.weight", "bn.bias", "no_bias.weight", "frozen.bias"]),
    ]
    assert names_of(model, param_groups(model, 0.1, no_decay=[nn.Embedding, "pos"]))[0] == (
        0.1,
        ["proj.weight", "no_bias.weight"],
    )


def test_every_kind_of_normalization_layer():
    class MyNorm(nn.LayerNorm):
        pass

    class Custom(nn.Module):  # a norm torch does not know about, named by type
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

    layers = [
        nn.BatchNorm2d(4),
        nn.BatchNorm3d(4),
        nn.SyncBatchNorm(4),
        nn.InstanceNorm1d(4, affine=True),
        nn.GroupNorm(2, 4),
        nn.LayerNorm(4, bias=False),
        MyNorm(4),
        Custom(),
    ]
    if hasattr(nn, "RMSNorm"):
        layers.append(nn.RMSNorm(4))
    model = nn.Sequential(nn.Linear(4, 4, bias=False), *layers)
    groups = param_groups(model, 0.1, no_decay=[Custom])
    assert len(groups) == 2
    assert [id(p) for p in groups[0]["params"]] == [id(model[0].weight)]
    expected = [p for layer in layers for p in layer.parameters()]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in expected]
    assert nn.LayerNorm in NORM_TYPES and nn.LocalResponseNorm in NORM_TYPES
    assert nn.Linear not in NORM_TYPES and nn.Embedding not in NORM_TYPES


def test_lr_is_set_on_both_groups():
    model = Net()
    groups = param_groups(model, 0.1, lr=3e-4)
    assert [set(group) for group in groups] == [{"params", "weight_decay", "lr"}] * 2
    assert [group["lr"] for group in groups] == [3e-4, 3e-4]


def test_empty_groups_are_omitted():
    norm_only = nn.LayerNorm(4)
    assert names_of(norm_only, param_groups(norm_only, 0.1)) == [(0.0, ["weight", "bias"])]
    no_bias = nn.Linear(3, 3, bias=False)
    assert names_of(no_bias, param_groups(no_bias, 0.1)) == [(0.1, ["weight"])]
    frozen = nn.Linear(3, 3).requires_grad_(False)
    assert param_groups(frozen, 0.1) == []
    assert param_groups(nn.ReLU(), 0.1) == []


def test_adamw_accepts_the_groups_and_decays_only_the_decay_group():
    model = Net()
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.5), lr=0.1)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.5, 0.0]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # with zero gradients AdamW only applies the decay
    optimizer.step()
    for name, p in model.named_parameters():
        if name in DECAYED:
            torch.testing.assert_close(p, before[name] * (1 - 0.1 * 0.5))
        else:
            torch.testing.assert_close(p, before[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_decay": -0.1}, r"Invalid weight_decay: -0.1 \(must be >= 0\)"),
        ({"weight_decay": float("inf")}, r"Invalid weight_decay: inf \(must be >= 0\)"),
        ({"weight_decay": 0.1, "lr": -1.0}, r"Invalid lr: -1.0 \(must be >= 0\)"),
        (
            {"weight_decay": 0.1, "no_decay": ["bias", 3]},
            r"Invalid no_decay entry: 3 "
            r"\(must be a parameter-name pattern or an nn.Module subclass\)",
        ),
        (
            {"weight_decay": 0.1, "no_decay": [int]},
            r"Invalid no_decay entry: <class 'int'> "
            r"\(must be a parameter-name pattern or an nn.Module subclass\)",
        ),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        param_groups(Net(), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(ValueError, match=r"^Invalid model: list \(must be a torch.nn.Module\)$"):
        param_groups([nn.Parameter(torch.zeros(2))], 0.1)
