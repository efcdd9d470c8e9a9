"""Comparison methods, one module each; importing this package registers them."""
from baselines import fastv  # noqa: F401
from baselines import feather  # noqa: F401
from baselines import pdrop  # noqa: F401
from baselines import framefusion  # noqa: F401
from baselines import holitom  # noqa: F401
from baselines import visionzip  # noqa: F401
