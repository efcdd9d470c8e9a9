"""Comparison methods, one module each; importing this package registers them."""
from baselines import fastv  # noqa: F401
