"""`pykvm ft report METRICS.jsonl`: the study's pictures and a summary table from any run's
`--metrics` file (a `pykvm run --ft ... --metrics FILE`, the demo's, a study trial's).

A metrics file has no client outside the guest, so the latency picture shows what the primary
itself measures of its outputs: how long each sync held the outputs it released (the longest of
them, `output_delay_ms`). Records that name an FT mode (or a disk mode) are grouped by it; a file
from one run is one group. Live migration writes no metrics file (its figures come back in the
`ctl migrate` reply), so there is none to read here."""

from __future__ import annotations

from pathlib import Path

from pykvm.errors import ConfigError
from pykvm.study import figures, plots

SUMMARY = "summary.md"


def groups(records: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(figures.mode_of(record) or "run", []).append(record)
    return grouped


def summary_table(path: Path, grouped: dict[str, list[dict]]) -> str:
    lines = [f"Syncs of `{path}` (the full copy left out).", "",
             "| group | syncs | triggers | sync interval ms (mean / p50) | pages per sync (mean / p99 / max) "
             "| sync time ms (p50 / p99) | guest pause ms (p50 / p99) | output delay ms (p50 / p99) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, records in grouped.items():
        f = figures.sync_figures(records)
        triggers = ", ".join(f"{trigger} {count}" for trigger, count in f["triggers"].items())
        lines.append(f"| {name} | {f['syncs']} | {triggers} | {_cells(f['sync_interval_ms'], 'mean', 'p50')} "
                     f"| {_cells(f['pages_per_sync'], 'mean', 'p99', 'max', digits=0)} "
                     f"| {_cells(f['sync_ms'], 'p50', 'p99')} | {_cells(f['pause_ms'], 'p50', 'p99')} "
                     f"| {_cells(f['output_delay_ms'], 'p50', 'p99')} |")
    return "\n".join(lines) + "\n"


def _cells(values: dict, *names: str, digits: int = 1) -> str:
    return " / ".join("–" if values.get(name) is None else f"{values[name]:.{digits}f}" for name in names)


def report(metrics: Path, out: Path) -> tuple[str, list[Path]]:
    """Read `metrics`, write the summary and the three pictures into `out`; returns the summary
    and the files written. A file that is not JSON lines, or has no sync in it: ConfigError."""
    records = figures.steady(figures.load_metrics(metrics))
    if not records:
        raise ConfigError(f"{metrics}: only the full copy, no sync to report on")
    grouped = groups(records)
    out.mkdir(parents=True, exist_ok=True)
    text = summary_table(metrics, grouped)
    (out / SUMMARY).write_text(text)
    first = min(figures.number(r, "time") for r in records)
    delays = {name: [figures.number(r, "output_delay_ms") for r in group if r.get("trigger") in ("blk", "net")]
              for name, group in grouped.items()}
    points = {name: [(figures.number(r, "pages"), figures.sync_ms(r)) for r in group] for name, group in grouped.items()}
    pauses = {name: [(figures.number(r, "time") - first, figures.pause_ms(r)) for r in group]
              for name, group in grouped.items()}
    title = metrics.name
    written = [out / SUMMARY,
               plots.latency_cdf({title: delays}, out / plots.LATENCY_CDF,
                                 xlabel="output delay (ms): an output held until its sync's ack"),
               plots.sync_vs_pages(points, out / plots.SYNC_VS_PAGES),
               plots.pause_over_time({title: pauses}, out / plots.PAUSE_OVER_TIME,
                                     xlabel="seconds since the first sync")]
    return text, written
