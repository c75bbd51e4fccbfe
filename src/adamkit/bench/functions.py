"""Test functions: 2-D benchmarks, an ill-conditioned quadratic, and Reddi et al.'s online problem.

All are written with torch operations on a point tensor so that gradients come from autograd.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


# Each function takes the coordinates along the first dimension of ``point``: a vector of 2 for
# training, or two stacked grids for contour plots.

def rosenbrock(point):
    """Rosenbrock (1960): (1 - x)^2 + 100 (y - x^2)^2; minimum 0 at (1, 1)."""
    x, y = point[0], point[1]
    return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2


def beale(point):
    """Beale: (1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2; minimum 0 at (3, 0.5)."""
    x, y = point[0], point[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y ** 2) ** 2 + (2.625 - x + x * y ** 3) ** 2


def rastrigin(point):
    """Rastrigin: 10 n + sum(x_i^2 - 10 cos(2 pi x_i)); minimum 0 at the origin, a local one near every integer point.

    ``point`` holds the coordinates along its first dimension (a vector, or stacked grids for plots).
    """
    return 10 * point.shape[0] + (point ** 2 - 10 * torch.cos(2 * math.pi * point)).sum(dim=0)


@dataclass(frozen=True)
class Function2D:
    """A 2-D test function with its standard start, minimum and the window used for contour plots."""

    name: str
    fn: Callable
    start: tuple[float, float]
    minimum: tuple[float, float]
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    reference: str


FUNCTIONS_2D = {
    # (-1.2, 1) is Rosenbrock's own start, also used by Moré, Garbow & Hillstrom (1981).
    "rosenbrock": Function2D("rosenbrock", rosenbrock, (-1.2, 1.0), (1.0, 1.0), (-2.0, 2.0), (-1.0, 3.0),
                             "Rosenbrock 1960; start from More, Garbow & Hillstrom 1981"),
    # (1, 1) is Moré, Garbow & Hillstrom's start for Beale's function.
    "beale": Function2D("beale", beale, (1.0, 1.0), (3.0, 0.5), (-4.5, 4.5), (-4.5, 4.5),
                        "Beale 1958; start from More, Garbow & Hillstrom 1981"),
    # Rastrigin has no standard start; (-2.3, 2.7) sits among several local minima, off the axes.
    "rastrigin": Function2D("rastrigin", rastrigin, (-2.3, 2.7), (0.0, 0.0), (-4.5, 4.5), (-4.5, 4.5),
                            "Rastrigin 1974 (2-D); start chosen by adamkit"),
}


def quadratic_problem(dim: int = 100, condition: float = 1e3, seed: int = 0):
    """A = Q diag(lambda) Q^T with eigenvalues log-spaced in [1, condition] and a random rotation Q.

    Returns (A, start): f(x) = x^T A x / 2 has its minimum 0 at the origin; the start is a fixed
    standard-normal point. Both depend only on ``seed`` (float64).
    """
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    eigenvalues = torch.logspace(0.0, math.log10(condition), dim, dtype=torch.float64)
    matrix = q @ torch.diag(eigenvalues) @ q.T
    matrix = (matrix + matrix.T) / 2
    start = torch.randn(dim, generator=generator, dtype=torch.float64)
    return matrix, start


# Reddi, Kale & Kumar (2018), "On the Convergence of Adam and Beyond", §5 (synthetic experiment):
# f_t(x) = 1010 x when t mod 101 = 1, -10 x otherwise, x kept in [-1, 1]. The average slope is
# +10/101 > 0, so the optimum is x = -1.
REDDI_PERIOD = 101
REDDI_LARGE = 1010.0
REDDI_SMALL = -10.0
REDDI_OPTIMUM = -1.0


def reddi_coefficient(t: int) -> float:
    """The slope of f_t at step t (t counts from 1)."""
    return REDDI_LARGE if t % REDDI_PERIOD == 1 else REDDI_SMALL


def reddi_expected_regret(x: float) -> float:
    """F(x) - F(-1) where F is f_t averaged over one period: (1010 - 100*10)/101 * (x + 1)."""
    return (REDDI_LARGE + (REDDI_PERIOD - 1) * REDDI_SMALL) / REDDI_PERIOD * (x - REDDI_OPTIMUM)
