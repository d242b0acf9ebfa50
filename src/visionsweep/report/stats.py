"""Statistics over seeds: mean with a t-based confidence interval, and paired comparisons."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval.

    Args:
        values: one value per seed (NaNs are dropped).
        confidence: two-sided confidence level.

    Returns:
        ``(mean, half_width)``; the half-width is NaN with fewer than two values.
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), math.nan
    sem = x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * sem)


@dataclass
class Paired:
    """The best configuration minus another one, seed by seed."""

    other: str
    seeds: list[int]
    diffs: list[float]
    mean: float
    ci: float
    wins: int
    p_value: float
    unit: str = "seeds"  # or "folds"

    @property
    def holds(self) -> bool:
        """Ahead on every shared seed (two or more) and the CI of the mean difference excludes zero."""
        return len(self.seeds) >= 2 and self.wins == len(self.seeds) and self.mean - self.ci > 0

    @property
    def verdict(self) -> str:
        """A short human reading of the comparison."""
        if not self.seeds:
            return f"no shared {self.unit}"
        if len(self.seeds) == 1:
            return f"one shared {self.unit[:-1]}: not conclusive"
        if self.holds:
            return f"better on all {len(self.seeds)} {self.unit}"
        return f"better on {self.wins} of {len(self.seeds)} {self.unit} (not conclusive)"


def paired(best: Mapping[Any, float], other: Mapping[Any, float], other_label: str,
           confidence: float = 0.95, higher_is_better: bool = True, unit: str = "seeds") -> Paired:
    """Compare two configurations on the seeds they share (a paired design: same splits, same seeds).

    Args:
        best: seed → metric of the reference (best) configuration.
        other: seed → metric of the other configuration.
        other_label: name of the other configuration.
        confidence: level of the CI of the mean difference.
        higher_is_better: direction of the metric.
        unit: what the shared keys are (``seeds`` or ``folds``), for the verdict.

    Returns:
        The :class:`Paired` comparison (differences are oriented so that positive favours ``best``): the
        mean difference, the half-width of its CI and the p-value of scipy's paired t-test
        (``scipy.stats.ttest_rel``), NaN with fewer than two shared seeds.
    """
    seeds = sorted(set(best) & set(other))
    sign = 1.0 if higher_is_better else -1.0
    ours = np.array([sign * best[s] for s in seeds], dtype=float)
    theirs = np.array([sign * other[s] for s in seeds], dtype=float)
    diffs = ours - theirs
    mean = float(diffs.mean()) if len(diffs) else math.nan
    ci = p = math.nan
    if len(diffs) >= 2:
        with warnings.catch_warnings():  # equal differences on every seed: scipy warns, the CI is 0 wide
            warnings.simplefilter("ignore", RuntimeWarning)
            test = stats.ttest_rel(ours, theirs)
            low, high = test.confidence_interval(confidence)
        ci = float(high - low) / 2
        # the same difference on every seed (to float noise): the t statistic is undefined, not "p = 0"
        p = math.nan if np.allclose(diffs, diffs[0], rtol=0.0, atol=1e-12) else float(test.pvalue)
    return Paired(other_label, seeds, diffs.tolist(), mean, ci, int((diffs > 0).sum()), p, unit)
