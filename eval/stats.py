"""The statistics every comparison uses: percentile bootstrap intervals over items (a fixed seed, so a number
is reproducible) and the exact McNemar test on paired outcomes. numpy and scipy only."""
from __future__ import annotations

import numpy as np

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0


def resamples(n: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``samples`` bootstrap resamples of ``n`` items, as an index array (samples x n); one seed gives the same
    resamples everywhere, so paired statistics of one set of items use the same draws."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def percentile_interval(values: np.ndarray, level: float = 95.0) -> list[float] | None:
    """The central ``level``% percentile interval of ``values`` (NaNs, undefined resamples, dropped); None when
    nothing is left."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    tail = (100.0 - level) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))] if len(values) else None


def mean_interval(values: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> list[float]:
    """The bootstrap 95% interval of the mean of per-item ``values`` (booleans or per-item means), in percent."""
    values = np.asarray(values)
    return percentile_interval(100.0 * values[resamples(len(values), samples, seed)].mean(axis=1))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """The exact McNemar test (a two-sided sign test) on the discordant items: ``only_a`` right for A alone,
    ``only_b`` for B alone; 1.0 when no item is discordant."""
    from scipy.stats import binomtest

    return float(binomtest(only_b, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0


def percent(num: float, den: float) -> float | None:
    """``100 * num / den``; None (JSON null) when undefined: the reference writes 0, which reads as perfect confusion."""
    return float(100.0 * num / den) if den > 0 else None
