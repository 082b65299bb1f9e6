"""Percentiles of measured figures, for FT's summaries and the benchmarks."""

from __future__ import annotations

SUMMARY = (50, 90, 99)  # the percentiles a summary gives, besides the maximum


def percentile(values: list[float], percent: float) -> float:
    """The value at `percent` (0-100) of the sorted values: nearest rank, halves rounded up.
    `values` must not be empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(percent / 100 * (len(ordered) - 1) + 0.5))]


def summary(values: list[float]) -> dict[str, float]:
    """{"p50", "p90", "p99", "max"}; empty for no values."""
    if not values:
        return {}
    ordered = sorted(values)
    figures = {f"p{percent}": percentile(ordered, percent) for percent in SUMMARY}
    figures["max"] = ordered[-1]
    return figures
