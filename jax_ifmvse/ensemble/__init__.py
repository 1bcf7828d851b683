"""The ensemble of score sets (paper eq. 7, Y = sum_i w_i S_i): `search` finds the weights on
Development (CCC per attribute; macro-F1 of class probabilities for task 1), `combine` mixes
score sets with those weights (with fallbacks for rows missing some set), `run` reads a training
RUN/ and writes RUN/ensemble/ (weights, predictions, submissions). `ifmvse ensemble` (cli.py)
calls `run.run_ensemble`; prediction and serving use `combine` only.
"""

from jax_ifmvse.errors import IfmvseError


class EnsembleError(IfmvseError, ValueError):
    """A run directory or score file that cannot be ensembled (one-line message)."""
