"""Engines run an algorithm's rule; they never contain algorithm-specific formulas."""
