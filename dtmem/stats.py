"""Confidence intervals, p-values and the family-wise correction of the table."""

import numpy as np


def bootstrap_means(values, n_boot=10_000, seed=0):
    """Means of n_boot resamples of values; fixed seed, so the same values give the same."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    return values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)


def bootstrap_ci(values, confidence=0.95, n_boot=10_000, seed=0):
    """Percentile bootstrap CI of the mean."""
    means = bootstrap_means(values, n_boot, seed)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def bootstrap_p(differences, n_boot=10_000, seed=0):
    """Two-sided p-value of "the mean difference is 0" from the same percentile bootstrap
    as bootstrap_ci: the smallest alpha whose (1 - alpha) interval reaches 0."""
    means = bootstrap_means(differences, n_boot, seed)
    return float(min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean())))


def holm(p_values, alpha=0.05):
    """Holm-Bonferroni: which hypotheses of a family are rejected at family-wise error
    rate alpha (step down through the sorted p-values, p_(k) <= alpha / (m - k))."""
    order = np.argsort(p_values, kind="stable")
    rejected = np.zeros(len(p_values), dtype=bool)
    for k, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - k):
            break
        rejected[i] = True
    return rejected.tolist()
