"""`pykvm ft study` and `pykvm ft report`, run as a user runs them: the study boots the iozone
guest under every FT mode the CLI offers (real VMM processes, a real standby), the report reads a
real demo's metrics file; the files they write are checked as a user would open them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pykvm.ft.demo import run_demo
from pykvm.study.runner import MODE_TITLES, WORKLOAD_TITLES, WORKLOADS, offered_modes, run_trial
from tests.conftest import requires_kvm, run_pykvm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("latency_cdf.png", "sync_time_vs_pages.png", "pause_over_time.png")


def _pngs(folder: Path) -> list[Path]:
    return [path for path in folder.glob("*.png") if path.read_bytes().startswith(PNG_MAGIC)]


@requires_kvm
def test_quick_study_writes_results_table_and_plots(tmp_path, guest_images):
    out = tmp_path / "study"
    result = run_pykvm("ft", "study", "--quick", "-o", str(out), timeout=600)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    results = json.loads((out / "results.json").read_text())
    table = (out / "table.md").read_text()
    assert len(_pngs(out)) >= 3 and {path.name for path in _pngs(out)} >= set(PLOTS)
    modes = offered_modes()
    assert {"none", "sync", "pipelined", "periodic"} <= set(modes)
    assert [(t["workload"], t["mode"]) for t in results["trials"]] == [(w.name, m) for w in WORKLOADS for m in modes]
    for workload in WORKLOADS:
        assert f"| {WORKLOAD_TITLES[workload.name]} | Kemari 2009 (published) |" in table
        for mode in modes:
            assert f"| {WORKLOAD_TITLES[workload.name]} | pykvm: {MODE_TITLES[mode]} |" in table
    for trial in results["trials"]:
        latency = trial["latency_ms"]
        assert latency["reports"] == len(trial["latencies_ms"]) > 0, trial["workload"] + "/" + trial["mode"]
        assert latency["p50"] > 0  # the calibration errs toward too long, never below zero
        assert trial["throughput"]["writes_per_s"] > 0
        if trial["mode"] == "none":
            assert "syncs" not in trial
        else:  # a protected run syncs at the guest's reports, so it has syncs and an answer
            assert trial["syncs"] > 0 and trial["triggers"].get("net", 0) > 0
            assert trial["answer"]["output_waits_for"] in ("its own sync", "the next sync point")
    buffered = next(t for t in results["trials"] if (t["workload"], t["mode"]) == ("buffered", "none"))
    assert buffered["guest_totals"]["writes"] >= 3000 * buffered["guest_totals"]["fsyncs"] > 0


@requires_kvm
def test_report_on_the_demos_metrics(tmp_path, guest_images):
    run_demo(records=30, seed=5, workdir=tmp_path / "demo", say=lambda line: None)
    metrics = tmp_path / "demo" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    out = tmp_path / "report"
    result = run_pykvm("ft", "report", str(metrics), "-o", str(out))
    assert result.returncode == 0, result.stderr.decode()
    assert {path.name for path in _pngs(out)} == set(PLOTS)
    steady = [r for r in records if r["trigger"] != "full"]
    lines = (out / "summary.md").read_text().splitlines()
    row = lines[lines.index(next(line for line in lines if line.startswith("|---"))) + 1]  # one group: sync/replicated
    assert row.startswith("| sync/replicated |") and row.split("|")[2].strip() == str(len(steady))
    assert f"net {sum(r['trigger'] == 'net' for r in steady)}" in row


@pytest.mark.nokvm
def test_report_reads_fields_by_name(tmp_path):
    """Records of several FT modes, with fields this pykvm does not know and without optional
    ones, are grouped by mode and summarised."""
    lines = [{"sync": 1, "time": 100.0, "trigger": "full", "pages": 4000, "bytes": 1, "pause_ms": 50.0}]
    for index in range(10):
        lines.append({"sync": 2 + index, "time": 100.5 + index / 10, "trigger": "net", "pages": 10 * index,
                      "bytes": 4096, "pause_ms": 2.0, "transfer_ms": 1.0, "ack_ms": 0.5, "output_delay_ms": 3.0,
                      "mode": "sync", "disk_mode": "replicated", "something_new": [1, 2]})
    lines += [{"sync": 20 + index, "time": 102.0 + index, "trigger": "timer", "pages": 5, "mode": "cow"}
              for index in range(3)]
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    result = run_pykvm("ft", "report", str(metrics))
    assert result.returncode == 0, result.stderr.decode()
    summary = (tmp_path / "summary.md").read_text()
    assert "| sync/replicated | 10 | net 10 | 100.0 / 100.0 | 45 / 90 / 90 | 1.5 / 1.5 | 2.0 / 2.0 | 3.0 / 3.0 |" in summary
    assert "| cow | 3 | timer 3 | 1000.0 / 1000.0 |" in summary
    assert {path.name for path in _pngs(tmp_path)} == set(PLOTS)


@pytest.mark.nokvm
@pytest.mark.parametrize("content, said", [
    ('{"sync": 1, "time": 1.0, "pages": 3}\nthis is not json\n', "m.jsonl:2: not a JSON line"),
    ("[1, 2]\n", "m.jsonl:1: a JSON line but not an object"),
    ('{"hello": "world"}\n', "no sync records"),
    (b"\xff\xfe\x00binary", "cannot read"),
    ('{"sync": 1, "time": 1.0, "trigger": "full", "pages": 3}\n', "only the full copy"),
])
def test_report_refuses_what_is_not_a_metrics_file(tmp_path, content, said):
    metrics = tmp_path / "m.jsonl"
    metrics.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = run_pykvm("ft", "report", str(metrics), "-o", str(tmp_path / "out"))
    err = result.stderr.decode()
    assert result.returncode == 2 and err.count("\n") == 1 and said in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.nokvm
def test_report_of_a_missing_file(tmp_path):
    result = run_pykvm("ft", "report", str(tmp_path / "none.jsonl"))
    assert result.returncode == 2 and result.stderr.decode().count("\n") == 1


@requires_kvm
@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_iozone_writes_reach_the_disk(tmp_path, guest_images, workload):
    """What the guest reports as written is on its disk: in buffered mode every write up to the
    last fsync, in sync mode every write. Record n (from 1) fills slot (n - 1) mod 4096 of the
    16 MiB file with the u64s n ^ i."""
    trial = run_trial(workload, "none", 2, tmp_path, keep_disks=True)
    writes, _, fsyncs = trial.session.totals
    durable = fsyncs * 3000 if workload.name == "buffered" else writes
    assert durable >= 2 and trial.session.reports, trial.session.totals
    disk = (tmp_path / f"{workload.name}-none" / "primary.img").read_bytes()
    index = np.arange(512, dtype=np.uint64)
    written = min(durable, 4096)  # slots written at least once
    for slot in sorted({0, 1, written // 2, written - 1, (durable - 1) % 4096}):
        last = durable - (durable - 1 - slot) % 4096  # the last durable write to this slot
        expected = (np.uint64(last) ^ index).tobytes()
        assert disk[slot * 4096:(slot + 1) * 4096] == expected, f"slot {slot}: write {last}"
    assert not any(disk[written * 4096:16 << 20])  # no write beyond them
