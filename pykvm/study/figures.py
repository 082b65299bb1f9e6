"""The figures of a study or a report, computed from the metrics file's sync records and the
client's reports; nothing here draws (plots.py does) or runs anything (runner.py does).

Sync records are read by field name and defensively: the file is an interface other work extends
(the FT mode, the disk mode, a truer pause), and a file from an older pykvm lacks those fields."""

from __future__ import annotations

import bisect
import json
import statistics
from pathlib import Path

from pykvm.errors import ConfigError
from pykvm.stats import percentile

REQUIRED = ("sync", "time", "pages")  # what makes a line a sync record
PAUSE_FIELDS = ("true_pause_ms", "pause_ms")  # the first present is the guest's pause


def load_metrics(path: Path) -> list[dict]:
    """The sync records of a `--metrics` file (one JSON object a line). Not JSON lines, or no
    sync record at all: a ConfigError naming the file and the line."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path}:{number}: not a JSON line: {line[:60]!r}") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number}: a JSON line but not an object")
        if all(isinstance(record.get(name), (int, float)) for name in REQUIRED):
            records.append(record)
    if not records:
        raise ConfigError(f"{path}: no sync records (lines with {', '.join(REQUIRED)})")
    return records


def number(record: dict, name: str, default: float = 0.0) -> float:
    value = record.get(name, default)
    return float(value) if isinstance(value, (int, float)) else default


def pause_ms(record: dict) -> float:
    return next((number(record, name) for name in PAUSE_FIELDS if name in record), 0.0)


def sync_ms(record: dict) -> float:
    """From the guest's quiesce to the standby's Ack: what the sync costs the outputs it holds."""
    if "sync_ms" in record:
        return number(record, "sync_ms")
    return number(record, "transfer_ms") + number(record, "ack_ms")


def steady(records: list[dict], start: float = float("-inf"), end: float = float("inf")) -> list[dict]:
    """The syncs of the steady state: not the full copy, and ended inside [start, end] (wall clock)."""
    return [r for r in records if r.get("trigger") != "full" and start <= number(r, "time") <= end]


def mode_of(record: dict) -> str:
    """The FT mode (and disk mode) a record names, for grouping a report; "" if it names none."""
    return "/".join(str(record[name]) for name in ("mode", "disk_mode") if name in record)


def _p(values: list[float], percent: float) -> float | None:
    return round(percentile(values, percent), 3) if values else None


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 3) if values else None


def sync_figures(records: list[dict]) -> dict:
    """Per-sync figures of a run's steady syncs: interval, pages, sync time, pause, output delay."""
    times = sorted(number(r, "time") for r in records)
    intervals = [(b - a) * 1000 for a, b in zip(times, times[1:])]
    pages = [number(r, "pages") for r in records]
    syncs = [sync_ms(r) for r in records]
    pauses = [pause_ms(r) for r in records]
    delays = [number(r, "output_delay_ms") for r in records if r.get("trigger") in ("blk", "net")]
    return {
        "syncs": len(records),
        "sync_interval_ms": {"mean": _mean(intervals), "p50": _p(intervals, 50)},
        "pages_per_sync": {"mean": _mean(pages), "p50": _p(pages, 50), "p99": _p(pages, 99),
                           "max": max(pages, default=None)},
        "sync_ms": {"mean": _mean(syncs), "p50": _p(syncs, 50), "p99": _p(syncs, 99)},
        "pause_ms": {"mean": _mean(pauses), "p50": _p(pauses, 50), "p99": _p(pauses, 99)},
        "output_delay_ms": {"p50": _p(delays, 50), "p99": _p(delays, 99)},
        "triggers": {trigger: sum(r.get("trigger") == trigger for r in records)
                     for trigger in sorted({str(r.get("trigger")) for r in records})},
    }


def latency_figures(latencies: list[float]) -> dict:
    return {"reports": len(latencies), "p50": _p(latencies, 50), "p99": _p(latencies, 99),
            "max": round(max(latencies), 3) if latencies else None}


def decompose(reports: list[tuple[float, float]], records: list[dict]) -> dict[str, list[float]]:
    """Each report's latency in three parts, from the sync that released it: the first sync to
    start after the report was made (an output held while a sync is under way waits for the
    next). `wait`: from the report's making to that sync's start (the output waiting for a sync
    point); `sync`: quiesce to ack, after which the output goes; `delivery`: from then to the
    arrival. A record's `time` is taken after the guest resumed, so its start is `time` less the
    longer of its pause and its sync time. `reports` are (produced, arrived) on the wall clock;
    a report with no sync starting after it (and before its arrival) is left out."""
    syncs = sorted((number(r, "time") - max(pause_ms(r), sync_ms(r)) / 1000, sync_ms(r)) for r in records)
    starts = [start for start, _ in syncs]
    parts: dict[str, list[float]] = {"wait": [], "sync": [], "delivery": []}
    for produced, arrived in reports:
        index = bisect.bisect_left(starts, produced)
        if index == len(syncs) or starts[index] > arrived:
            continue
        start, took = syncs[index]
        parts["wait"].append((start - produced) * 1000)
        parts["sync"].append(took)
        parts["delivery"].append((arrived - start) * 1000 - took)
    return parts


def answer(sync: dict, parts: dict[str, list[float]]) -> dict | None:
    """Avi Kivity's question for one protected run: is the externally observed latency the sync
    interval plus the sync time (an output waits for the next sync point), or the sync time (the
    output starts its own sync)? The wait for a sync to start decides: in the first case it is
    the interval, in the second next to nothing; the verdict is whichever the median wait is
    nearer to. The means of the parts add up to the mean latency."""
    interval = sync["sync_interval_ms"]["mean"]
    if interval is None or not parts["sync"]:
        return None
    wait, took, delivery = (statistics.fmean(parts[name]) for name in ("wait", "sync", "delivery"))
    wait_p50 = percentile(parts["wait"], 50)
    verdict = "its own sync" if wait_p50 <= interval / 2 else "the next sync point"
    return {"reports": len(parts["sync"]), "latency_mean_ms": round(wait + took + delivery, 3),
            "wait_mean_ms": round(wait, 3), "sync_mean_ms": round(took, 3), "delivery_mean_ms": round(delivery, 3),
            "wait_p50_ms": round(wait_p50, 3), "interval_plus_sync_ms": round(interval + took, 3),
            "output_waits_for": verdict}
