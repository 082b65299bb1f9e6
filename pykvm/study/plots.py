"""The study's and the report's pictures, drawn with matplotlib (imported only here, and only when
a picture is drawn: it is heavy, and nothing else in pykvm needs it). Each function takes plain
series — {panel: {label: values}} — and writes one PNG; what the series hold is decided by the
callers (study.py, report.py)."""

from __future__ import annotations

from pathlib import Path

from pykvm.errors import ConfigError

LATENCY_CDF = "latency_cdf.png"
SYNC_VS_PAGES = "sync_time_vs_pages.png"
PAUSE_OVER_TIME = "pause_over_time.png"
LATENCY_SPLIT = "latency_split.png"

Panels = dict[str, dict[str, list]]  # panel title -> series label -> values (or points)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("drawing needs matplotlib, which is not installed (pip install matplotlib, "
                          "or bash scripts/setup.sh)") from None

    matplotlib.use("Agg")  # files only: no display needed, none used
    import matplotlib.pyplot as plt

    return plt


def _figure(plt, panels: int):
    figure, axes = plt.subplots(1, max(panels, 1), figsize=(6.4 * max(panels, 1), 4.6), squeeze=False)
    return figure, list(axes[0])


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def latency_cdf(panels: Panels, path: Path, *, xlabel: str) -> Path:
    """One CDF per series (milliseconds, log scale), one panel per workload."""
    plt = _pyplot()
    figure, axes = _figure(plt, len(panels))
    for ax, (title, series) in zip(axes, panels.items()):
        for label, values in series.items():
            if not values:
                continue
            ordered = sorted(values)
            fractions = [(index + 1) / len(ordered) for index in range(len(ordered))]
            ax.step(ordered, fractions, where="post", label=f"{label} (n={len(ordered)})")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of outputs")
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return _save(plt, figure, path)


def sync_vs_pages(series: dict[str, list[tuple[float, float]]], path: Path) -> Path:
    """Sync time against pages per sync: one point per sync, one colour per series."""
    plt = _pyplot()
    figure, (ax,) = _figure(plt, 1)
    for label, points in series.items():
        if points:
            ax.scatter([p for p, _ in points], [ms for _, ms in points], s=9, alpha=0.6, label=label)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("log")
    ax.set_xlabel("pages per sync")
    ax.set_ylabel("sync time (ms): quiesce to the standby's ack")
    ax.set_title("sync time against pages per sync")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", markerscale=2)
    return _save(plt, figure, path)


def pause_over_time(panels: Panels, path: Path, *, xlabel: str) -> Path:
    """The guest's pause of each sync against time (points: (seconds, ms))."""
    plt = _pyplot()
    figure, axes = _figure(plt, len(panels))
    for ax, (title, series) in zip(axes, panels.items()):
        for label, points in series.items():
            if points:
                ax.plot([t for t, _ in points], [ms for _, ms in points], ".", markersize=3, label=label)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("guest pause per sync (ms)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small", markerscale=3)
    return _save(plt, figure, path)


def latency_split(panels: dict[str, dict[str, dict[str, float]]], path: Path) -> Path:
    """Per mode, the mean latency as stacked bars (wait for a sync, the sync, the delivery), and a
    mark where an output that waited for the next sync point would be (sync interval + sync)."""
    plt = _pyplot()
    figure, axes = _figure(plt, len(panels))
    parts = (("wait_mean_ms", "wait for a sync to start"), ("sync_mean_ms", "the releasing sync"),
             ("delivery_mean_ms", "delivery"))
    for ax, (title, bars) in zip(axes, panels.items()):
        labels = list(bars)
        left = [0.0] * len(labels)
        for key, name in parts:
            widths = [max(bars[label][key], 0.0) for label in labels]
            ax.barh(labels, widths, left=left, label=name)
            left = [a + b for a, b in zip(left, widths)]
        ax.plot([bars[label]["interval_plus_sync_ms"] for label in labels], labels, "k|", markersize=18,
                label="sync interval + sync")
        ax.invert_yaxis()
        ax.set_xlabel("mean externally observed latency (ms)")
        ax.set_title(title)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize="small")
    return _save(plt, figure, path)
