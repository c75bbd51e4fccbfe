"""Quality of compact optimizer state on a real small task: scikit-learn's digits.

An MLP (64-256-256-10; its two large weight matrices hold 8-bit state, the small tensors stay
float32) trained with AdamW for 30 epochs of minibatches of 64, three seeds, state kept in
float32, bfloat16 and int8. Prints the mean final training loss (full training set) per storage
and the relative difference to float32. Needs scikit-learn (the [bench] extra).

    python benchmarks/int8_quality.py [--epochs 30] [--seeds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from sklearn.datasets import load_digits

import adamkit


def train(state_dtype, seed, epochs, lr=1e-3):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    opt = adamkit.AdamW(model.parameters(), lr=lr, weight_decay=1e-2, state_dtype=state_dtype)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    return loss, accuracy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    results = {}
    for state_dtype in ("float32", "bfloat16", "int8"):
        t0 = time.perf_counter()
        runs = [train(None if state_dtype == "float32" else state_dtype, seed, args.epochs)
                for seed in range(args.seeds)]
        results[state_dtype] = {
            "losses": [r[0] for r in runs], "accuracies": [r[1] for r in runs],
            "mean_loss": statistics.mean(r[0] for r in runs),
            "mean_accuracy": statistics.mean(r[1] for r in runs),
            "seconds": time.perf_counter() - t0,
        }
    base = results["float32"]["mean_loss"]
    print(f"digits MLP, AdamW lr=1e-3, {args.epochs} epochs, mean of {args.seeds} seeds")
    print(f"{'state':9}  {'final train loss':>16}  {'vs float32':>10}  {'train acc':>9}")
    for name, r in results.items():
        print(f"{name:9}  {r['mean_loss']:16.5f}  {100 * (r['mean_loss'] / base - 1):+9.1f}%  "
              f"{r['mean_accuracy']:9.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
