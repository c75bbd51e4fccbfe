"""An adamkit workload of your own: a small MLP classifying noisy spirals.

Run it with any command that trains:

    adamkit train --workload examples/my_workload.py:make --optimizer adamw --lr 3e-3
    adamkit bench --workloads examples/my_workload.py:make --optimizers sgdm,adam,adamw --out runs/mine
    adamkit tune  --workload examples/my_workload.py:make --optimizers adam,adamw --trials 20 --out runs/tune-mine

``make(seed)`` returns the model, the two loaders and the loss; everything is built from ``seed``
so that each seed is a different, reproducible run. Replace the data and the model with yours.
"""
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def spirals(n_per_class: int, classes: int, generator: torch.Generator):
    """``classes`` interleaved spiral arms in the plane, with a little noise."""
    radius = torch.linspace(0.05, 1.0, n_per_class).repeat(classes)
    label = torch.arange(classes).repeat_interleave(n_per_class)
    angle = radius * 4.0 + label * (2 * math.pi / classes) + 0.2 * torch.randn(len(radius), generator=generator)
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return points, label


def make(seed: int):
    generator = torch.Generator().manual_seed(seed)
    x, y = spirals(400, 3, generator)
    order = torch.randperm(len(y), generator=generator)
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    model = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    return {
        "model": model,
        # shuffled every epoch; adamkit seeds each epoch's order from the run's seed
        "train_loader": DataLoader(TensorDataset(x[:cut], y[:cut]), batch_size=64, shuffle=True),
        "val_loader": DataLoader(TensorDataset(x[cut:], y[cut:]), batch_size=256),
        "loss_fn": nn.functional.cross_entropy,
        "task": "classification",          # adds accuracy and macro precision / recall / F1
        "steps": 600,                      # the default budget (--steps overrides it)
        "target": {"metric": "accuracy", "value": 0.9, "mode": "max"},   # for time-to-target
    }
