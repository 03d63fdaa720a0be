"""Confidence intervals over episodes."""

import numpy as np


def bootstrap_ci(values, confidence=0.95, n_boot=10_000, seed=0):
    """Percentile bootstrap CI of the mean; fixed seed, so the same values give the same CI."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
