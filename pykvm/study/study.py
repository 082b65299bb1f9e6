"""`pykvm ft study`: the Kemari measurements (qemu-devel, November 2009) reproduced on this machine,
and Avi Kivity's question answered with data.

Every workload (runner.WORKLOADS) runs under every mode the CLI offers (runner.MODES), one trial
each; the figures go to DIR/results.json, the table beside Kemari's to DIR/table.md, the pictures
to DIR/*.png, and each trial's own files (metrics, serial output, VMM logs) to DIR/runs/."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

from pykvm.study import figures, plots
from pykvm.study.runner import MODE_TITLES, MODES, WORKLOAD_TITLES, WORKLOADS, TrialResult, offered_modes, run_trial

QUICK_SECONDS = 4.0  # per trial: ten trials and their start-ups in about two minutes
FULL_SECONDS = 30.0

# What the Kemari thread reported (see docs/ft-study.md): interval and pages per sync measured,
# the sync time given for the buffered case, and the latency claimed for it (the sync time).
KEMARI = {
    "buffered": {"sync_interval_ms": 400, "pages_per_sync": 3000, "sync_ms": 150, "latency_ms": 150},
    "sync": {"sync_interval_ms": 10, "pages_per_sync": 80, "sync_ms": None, "latency_ms": None},
}


def trial_figures(trial: TrialResult) -> dict:
    """One row of results.json: what the client saw and what the primary's metrics say."""
    session = trial.session
    latencies = session.latencies_ms()
    clock = session.clock()
    arrivals = [report.arrival for report in session.reports]
    gaps = [(b - a) * 1000 for a, b in zip(arrivals, arrivals[1:])]
    syncs = figures.steady(trial.syncs, session.started, session.stopped)
    row = {
        "workload": trial.workload, "mode": trial.mode, "options": MODES[trial.mode] or [],
        "latency_ms": figures.latency_figures(latencies),
        "reports_sent": max((report.seq for report in session.reports), default=0),  # received: latency_ms.reports
        "report_interval_ms": round(sum(gaps) / len(gaps), 3) if gaps else None,
        "throughput": {name: round(value, 3) for name, value in session.throughput().items()},
        "guest_totals": dict(zip(("writes", "bytes", "fsyncs"), session.totals)),
        "calibration": {"tsc_hz": round(clock.rate),
                        "min_round_trip_ms": round(session.min_rtt_ms(), 3)},
        "latencies_ms": [round(value, 4) for value in latencies],
        # (made, arrived) of each report, seconds from the workload's start on the wall clock
        "report_times": [[round(made - session.started, 6), round(arrived - session.started, 6)]
                         for made, arrived in session.report_times()],
    }
    if MODES[trial.mode] is not None:
        row.update(figures.sync_figures(syncs))
        row["answer"] = figures.answer(row, figures.decompose(session.report_times(), syncs))
        # (end, pages, sync ms, pause ms) of each steady sync, the end in seconds from the workload's start
        row["sync_points"] = [[round(figures.number(r, "time") - session.started, 6), figures.number(r, "pages"),
                               round(figures.sync_ms(r), 3), round(figures.pause_ms(r), 3)] for r in syncs]
    return row


def run_study(out: Path, *, quick: bool, say: Callable[[str], None] = print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    seconds = QUICK_SECONDS if quick else FULL_SECONDS
    modes = offered_modes()
    load = [round(figure, 2) for figure in os.getloadavg()]
    rows = []
    for workload in WORKLOADS:
        for mode in modes:
            started = time.monotonic()
            trial = run_trial(workload, mode, seconds, out / "runs")
            rows.append(trial_figures(trial))
            latency = rows[-1]["latency_ms"]
            say(f"ft study: {workload.name:<9} {mode:<10} {latency['reports']:>5} reports, latency p50 "
                f"{latency['p50']} ms p99 {latency['p99']} ms, {rows[-1].get('syncs', 0)} syncs "
                f"({time.monotonic() - started:.0f} s)")
    results = {"command": "pykvm ft study" + (" --quick" if quick else ""), "seconds_per_trial": seconds,
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.platform(),
               "cpus": os.cpu_count(), "load_average": {"start": load, "end": [round(f, 2) for f in os.getloadavg()]},
               "kemari": KEMARI, "modes": {mode: MODES[mode] or [] for mode in modes}, "trials": rows}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "table.md").write_text(table(results))
    draw(results, out)
    return results


def _cell(*values, digits: int = 1) -> str:
    shown = [("–" if value is None else f"{value:.{digits}f}") for value in values]
    return " / ".join(shown)


def table(results: dict) -> str:
    """Kemari's published figures and ours, side by side, then the question answered per run."""
    load = results["load_average"]
    lines = [f"Measured by `{results['command']}` ({results['seconds_per_trial']:.0f} s per trial, "
             f"{results['date']}, {results['host']}, {results['cpus']} CPUs, load average {load['start'][0]} "
             f"at the start and {load['end'][0]} at the end).", "",
             "| workload | run | sync interval ms (mean) | pages per sync (mean / max) | sync time ms (p50 / p99) "
             "| guest pause ms (p50 / p99) | external latency ms (p50 / p99) | reports received / sent "
             "| throughput (writes/s, MB/s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for workload in WORKLOADS:
        kemari = results["kemari"][workload.name]
        lines.append(f"| {WORKLOAD_TITLES[workload.name]} | Kemari 2009 (published) | ~{kemari['sync_interval_ms']} "
                     f"| ~{kemari['pages_per_sync']} | {_cell(kemari['sync_ms'], digits=0)} | – | "
                     f"{_cell(kemari['latency_ms'], digits=0)} (claimed) | – | – |")
        for row in (r for r in results["trials"] if r["workload"] == workload.name):
            protected = "syncs" in row
            lines.append(
                f"| {WORKLOAD_TITLES[workload.name]} | pykvm: {MODE_TITLES[row['mode']]} "
                f"| {_cell(row['sync_interval_ms']['mean']) if protected else '–'} "
                f"| {_cell(row['pages_per_sync']['mean'], row['pages_per_sync']['max'], digits=0) if protected else '–'} "
                f"| {_cell(row['sync_ms']['p50'], row['sync_ms']['p99']) if protected else '–'} "
                f"| {_cell(row['pause_ms']['p50'], row['pause_ms']['p99']) if protected else '–'} "
                f"| {_cell(row['latency_ms']['p50'], row['latency_ms']['p99'])} "
                f"| {row['latency_ms']['reports']} / {row['reports_sent']} "
                f"| {row['throughput']['writes_per_s']:.0f}, {row['throughput']['mb_per_s']:.2f} |")
    lines += ["", "Is the externally observed latency the sync interval plus the sync time, or the sync time? "
              "Each report's latency is split at the sync that released it (the first to start after the report "
              "was made): the wait for that sync to start, the sync (quiesce to ack), and the delivery after it "
              "(means in ms, so the parts add up). If the latency were the sync interval plus the sync time, the wait "
              "would be the interval; if the output starts its own sync, next to nothing: the last column says "
              "which the median wait is nearer to.", "",
              "| workload | mode | interval between reports | sync interval | latency "
              "| = wait for a sync + sync + delivery | median wait | sync interval + sync | the output waits for |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in results["trials"]:
        if row.get("answer"):
            answer = row["answer"]
            lines.append(f"| {WORKLOAD_TITLES[row['workload']]} | {MODE_TITLES[row['mode']]} "
                         f"| {_cell(row['report_interval_ms'])} | {_cell(row['sync_interval_ms']['mean'])} "
                         f"| {_cell(answer['latency_mean_ms'])} | {_cell(answer['wait_mean_ms'])} + "
                         f"{_cell(answer['sync_mean_ms'])} + {_cell(answer['delivery_mean_ms'])} "
                         f"| {_cell(answer['wait_p50_ms'])} | {_cell(answer['interval_plus_sync_ms'])} "
                         f"| {answer['output_waits_for']} |")
    return "\n".join(lines) + "\n"


def draw(results: dict, out: Path) -> list[Path]:
    """The pictures, from results.json's rows (so a results file can be drawn again)."""
    rows = results["trials"]
    latency = {WORKLOAD_TITLES[w.name]: {MODE_TITLES[r["mode"]]: r["latencies_ms"] for r in rows if r["workload"] == w.name}
               for w in WORKLOADS}
    points = {f"{w.name}, {r['mode']}": [(p[1], p[2]) for p in r["sync_points"]]
              for w in WORKLOADS for r in rows if r["workload"] == w.name and "sync_points" in r}
    pauses = {WORKLOAD_TITLES[w.name]: {MODE_TITLES[r["mode"]]: [(p[0], p[3]) for p in r["sync_points"]]
                                        for r in rows if r["workload"] == w.name and "sync_points" in r}
              for w in WORKLOADS}
    split = {WORKLOAD_TITLES[w.name]: {MODE_TITLES[r["mode"]]: r["answer"] for r in rows
                                       if r["workload"] == w.name and r.get("answer")} for w in WORKLOADS}
    return [plots.latency_cdf(latency, out / plots.LATENCY_CDF,
                              xlabel="externally observed latency (ms): report produced to report received"),
            plots.sync_vs_pages(points, out / plots.SYNC_VS_PAGES),
            plots.pause_over_time(pauses, out / plots.PAUSE_OVER_TIME, xlabel="seconds since the workload started"),
            plots.latency_split(split, out / plots.LATENCY_SPLIT)]
