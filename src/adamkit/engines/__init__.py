"""Engines run an algorithm's rule; they never contain algorithm-specific formulas.

  reference.py  the engine contract and its executable statement (torch ops, any device)
  ops.py        the element helpers rules are written with (sqrt, clamp, lerp, ...)
  cpu/          the fused CPU engine: kernels generated from the rules with Numba
  plans.py      how the front end repeats a fused step without redoing its checks, per tensor
                and per param group
  cohort.py     a param group's multi-pass rule (FAdam, Adafactor) run once on arrays of sums

Engines import the rule compiler (:mod:`adamkit.compiler`), never the front end.
"""
