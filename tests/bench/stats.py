"""Small statistics for the bench: percentiles the way numpy's default (linear) computes them."""

from __future__ import annotations


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: list[float]) -> dict:
    """p50/p90/p99/min/max/mean of seconds, given in milliseconds."""
    ms = [v * 1000.0 for v in values]
    return {"n": len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
            "min": min(ms) if ms else float("nan"), "max": max(ms) if ms else float("nan"),
            "mean": sum(ms) / len(ms) if ms else float("nan")}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")
