"""Write prometheus/tests/alerts.test.yml: a firing and a quiet case for every alert.

    python3 prometheus/tests/generate_alert_tests.py > prometheus/tests/alerts.test.yml

promtool 2.42 wants every annotation of a firing alert spelled out; they are
rendered here from the rule file (``$labels.x`` and the given ``$value`` text),
so editing an annotation means re-running this, not hand-editing 40 strings.
promtool then checks the rendering as well as the firing.
"""

import re
import sys
from pathlib import Path

import yaml

RULES_FILE = Path(__file__).resolve().parent.parent / "rules" / "ugro-alerts.rules.yml"
U = {"job": "ugrod", "instance": "127.0.0.1:9327"}


def lab(name, **kw):
    d = {**kw}
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in d.items()) + "}"


def ug(name, **kw):
    return lab(name, **kw, **U)


GPU = dict(node="gpu1", gpu="0", UUID="GPU-1111")
DCGM = dict(
    **GPU,
    modelName="NVIDIA L40S",
    job="ugro-gpu",
    instance="10.0.0.2:9400",
    pci_bus_id="00000000:01:00.0",
    device="nvidia0",
)

tests = []


def case(name, series, evals, interval="1m"):
    tests.append(
        {
            "name": name,
            "interval": interval,
            "input_series": [{"series": s, "values": v} for s, v in series],
            "alert_rule_test": [
                {"eval_time": t, "alertname": a, "exp_alerts": [finish(a, x) for x in e]}
                for t, a, e in evals
            ],
        }
    )


RULES = yaml.safe_load(RULES_FILE.read_text())["groups"][0]["rules"]


def render(text, labels, value):
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
    return re.sub(r"\{\{ \$value[^}]*\}\}", lambda m: value, text)


def alert(labels, value=""):
    return {"exp_labels": labels, "value": value}


def finish(name, a):
    rule = [
        r
        for r in RULES
        if r["alert"] == name and r["labels"]["severity"] == a["exp_labels"]["severity"]
    ]
    assert len(rule) == 1, (name, a)
    ann = {
        k: render(v.strip(), a["exp_labels"], a["value"]) for k, v in rule[0]["annotations"].items()
    }
    return {"exp_labels": a["exp_labels"], "exp_annotations": ann}


# UgroDaemonDown
case(
    "ugrod target down: fires after 2m",
    [(lab("up", **U), "0x10")],
    [
        ("1m", "UgroDaemonDown", []),
        ("3m", "UgroDaemonDown", [alert({"severity": "critical", **U})]),
    ],
)
case(
    "ugrod never scraped: absent() fires",
    [(lab("up", job="ugro-gpu", instance="10.0.0.2:9400", node="gpu1"), "1x10")],
    [("3m", "UgroDaemonDown", [alert({"severity": "critical", "job": "ugrod"})])],
)
case("ugrod up: quiet", [(lab("up", **U), "1x10")], [("5m", "UgroDaemonDown", [])])
case(
    "ugrod restart shorter than 2m: quiet",
    [(lab("up", **U), "1 0 1 1 1 1")],
    [("3m", "UgroDaemonDown", [])],
)
# UgroNodeDown
case(
    "node unreachable: fires",
    [
        (ug("ugro_node_state", node="gpu1", state="unreachable"), "1x10"),
        (ug("ugro_node_state", node="gpu1", state="healthy"), "0x10"),
    ],
    [
        ("1m", "UgroNodeDown", []),
        (
            "3m",
            "UgroNodeDown",
            [alert({"severity": "critical", "node": "gpu1", "state": "unreachable", **U})],
        ),
    ],
)
case(
    "node reachable again within 2m: quiet",
    [(ug("ugro_node_state", node="gpu1", state="unreachable"), "1 0 0 0 0 0")],
    [("4m", "UgroNodeDown", [])],
)
# UgroNodeUnhealthy
case(
    "node unhealthy 5m: fires",
    [(ug("ugro_node_state", node="gpu1", state="unhealthy"), "1x10")],
    [
        ("4m", "UgroNodeUnhealthy", []),
        (
            "6m",
            "UgroNodeUnhealthy",
            [alert({"severity": "warning", "node": "gpu1", "state": "unhealthy", **U})],
        ),
    ],
)
case(
    "node healthy: quiet",
    [
        (ug("ugro_node_state", node="gpu1", state="unhealthy"), "0x10"),
        (ug("ugro_node_state", node="gpu1", state="healthy"), "1x10"),
    ],
    [("6m", "UgroNodeUnhealthy", [])],
)
# UgroGpuTooHot
case(
    "exporter GPU at 87 C: warning and critical",
    [(lab("DCGM_FI_DEV_GPU_TEMP", **DCGM), "87x10")],
    [
        ("1m", "UgroGpuTooHot", []),
        (
            "6m",
            "UgroGpuTooHot",
            [
                alert({"severity": "warning", **GPU}, "87"),
                alert({"severity": "critical", **GPU}, "87"),
            ],
        ),
    ],
)
case(
    "ugrod's sample at 82 C without exporter: warning only",
    [(ug("ugro_gpu_temperature_celsius", **GPU, model_name="NVIDIA L40S"), "82x10")],
    [("6m", "UgroGpuTooHot", [alert({"severity": "warning", **GPU}, "82")])],
)
case(
    "exporter wins over ugrod's older sample; 70 C: quiet",
    [
        (lab("DCGM_FI_DEV_GPU_TEMP", **DCGM), "70x10"),
        (ug("ugro_gpu_temperature_celsius", **GPU, model_name="NVIDIA L40S"), "90x10"),
    ],
    [("6m", "UgroGpuTooHot", [])],
)
# UgroDiskNearlyFull
case(
    "disk 93 %: warning after 10m",
    [(ug("ugro_node_disk_used_ratio", node="gpu1"), "0.93x15")],
    [
        ("6m", "UgroDiskNearlyFull", []),
        ("11m", "UgroDiskNearlyFull", [alert({"severity": "warning", "node": "gpu1", **U}, "93%")]),
    ],
)
case(
    "disk 97 %: critical after 5m",
    [(ug("ugro_node_disk_used_ratio", node="gpu1"), "0.97x15")],
    [("6m", "UgroDiskNearlyFull", [alert({"severity": "critical", "node": "gpu1", **U}, "97%")])],
)
case(
    "disk 50 %: quiet",
    [(ug("ugro_node_disk_used_ratio", node="gpu1"), "0.5x15")],
    [("12m", "UgroDiskNearlyFull", [])],
)
# UgroJobFailed: one alert per failed job, naming it and why (series kept 30 min)
JF = dict(job_name="t9", owner="alice", **U)
case(
    "a job fails: fires for 10 minutes, naming the job and reason",
    [(lab("ugro_job_ended_timestamp_seconds", outcome="failed", reason="oom", **JF),
      "_ _ 120x20")],
    [
        ("1m", "UgroJobFailed", []),
        ("5m", "UgroJobFailed", [alert({"severity": "warning", "outcome": "failed",
                                        "reason": "oom", **JF})]),
        ("12m", "UgroJobFailed", []),
    ],
)
case(
    "a job succeeds, another is retried: quiet",
    [
        (lab("ugro_job_ended_timestamp_seconds", outcome="succeeded", reason="", **JF), "120x20"),
        (lab("ugro_job_ended_timestamp_seconds", outcome="retrying", reason="exit",
             **{**JF, "job_name": "t10"}), "120x20"),
    ],
    [("5m", "UgroJobFailed", [])],
)
# UgroJobStalled
J1 = dict(job_name="t1", owner="alice", **U)
J2 = dict(job_name="t2", owner="bob", **U)
case(
    "watchdog flags a stalled job: fires",
    [(lab("ugro_job_stalled", **J1), "0 0 1 1 1 1 1 1 1 1 1")],
    [
        ("6m", "UgroJobStalled", []),
        ("8m", "UgroJobStalled", [alert({"severity": "warning", **J1})]),
    ],
)
case(
    "running job silent for 30 minutes: fires",
    [
        (lab("ugro_job_training_last_report_timestamp_seconds", **J2), "0x50"),
        (lab("ugro_job_state", state="running", **J2), "1x50"),
        (lab("ugro_job_stalled", **J2), "0x50"),
    ],
    [
        ("33m", "UgroJobStalled", []),
        ("40m", "UgroJobStalled", [alert({"severity": "warning", **J2})]),
    ],
)
case(
    "job reporting every minute: quiet",
    [
        (lab("ugro_job_training_last_report_timestamp_seconds", **J2), "0+60x50"),
        (lab("ugro_job_state", state="running", **J2), "1x50"),
        (lab("ugro_job_stalled", **J2), "0x50"),
    ],
    [("45m", "UgroJobStalled", [])],
)
# UgroJobsWaitingWhileGpusIdle
case(
    "job waits while a GPU is free: fires",
    [
        (ug("ugro_queue_oldest_wait_seconds"), "0+60x60"),
        (ug("ugro_gpu_allocated", **GPU, model_name="NVIDIA L40S"), "0x60"),
        (ug("ugro_node_state", node="gpu1", state="healthy"), "1x60"),
    ],
    [
        ("20m", "UgroJobsWaitingWhileGpusIdle", []),
        ("35m", "UgroJobsWaitingWhileGpusIdle", [alert({"severity": "warning", **U}, "35m 0s")]),
    ],
)
case(
    "job waits but every GPU is allocated: quiet",
    [
        (ug("ugro_queue_oldest_wait_seconds"), "0+60x60"),
        (ug("ugro_gpu_allocated", **GPU, model_name="NVIDIA L40S"), "1x60"),
        (ug("ugro_node_state", node="gpu1", state="healthy"), "1x60"),
    ],
    [("35m", "UgroJobsWaitingWhileGpusIdle", [])],
)
case(
    "free GPU is on a drained node: quiet",
    [
        (ug("ugro_queue_oldest_wait_seconds"), "0+60x60"),
        (ug("ugro_gpu_allocated", **GPU, model_name="NVIDIA L40S"), "0x60"),
        (ug("ugro_node_state", node="gpu1", state="healthy"), "0x60"),
        (ug("ugro_node_state", node="gpu1", state="draining"), "1x60"),
    ],
    [("35m", "UgroJobsWaitingWhileGpusIdle", [])],
)


# UgroEventLogFsyncSlow
def fsync(rates):
    return [(ug("ugro_event_log_fsync_seconds_bucket", le=le), f"0+{r}x40") for le, r in rates]


case(
    "fsync p99 around 250 ms: fires",
    fsync([("0.001", 0), ("0.05", 0), ("0.25", 10), ("+Inf", 10)]),
    [
        ("10m", "UgroEventLogFsyncSlow", []),
        ("20m", "UgroEventLogFsyncSlow",
         [alert({"severity": "warning", "instance": U["instance"]}, "248ms")]),
    ],
)
case(
    "fsync under 1 ms: quiet",
    fsync([("0.001", 10), ("0.05", 10), ("0.25", 10), ("+Inf", 10)]),
    [("20m", "UgroEventLogFsyncSlow", [])],
)
case(
    "idle log (no batches): quiet",
    fsync([("0.001", 0), ("0.05", 0), ("0.25", 0), ("+Inf", 0)]),
    [("20m", "UgroEventLogFsyncSlow", [])],
)
# UgroGpuExporterFailing
E = dict(job="ugro-gpu", instance="10.0.0.2:9400", node="gpu1")
case(
    "exporter not scraped: fires",
    [(lab("up", **E), "0x10")],
    [
        ("3m", "UgroGpuExporterFailing", []),
        ("6m", "UgroGpuExporterFailing", [alert({"severity": "warning", **E})]),
    ],
)
case(
    "exporter scraped but its collection hangs (last success 1, up 0): fires",
    [
        (lab("up", **E), "1x10"),
        (lab("ugro_gpu_exporter_collect_success", **E), "1x10"),
        (lab("ugro_gpu_exporter_up", **E), "0x10"),
    ],
    [("6m", "UgroGpuExporterFailing", [alert({"severity": "warning", **E})])],
)
case(
    "exporter up and reading: quiet",
    [(lab("up", **E), "1x10"), (lab("ugro_gpu_exporter_up", **E), "1x10")],
    [("6m", "UgroGpuExporterFailing", [])],
)
case(
    "hung exporter's GPU series withdrawn: ugrod's fresh sample takes over",
    [
        (lab("DCGM_FI_DEV_GPU_TEMP", **DCGM), "70 70 70 stale"),
        (ug("ugro_gpu_temperature_celsius", **GPU, model_name="NVIDIA L40S"), "90x20"),
    ],
    [
        ("2m", "UgroGpuTooHot", []),
        ("12m", "UgroGpuTooHot", [alert({"severity": "warning", **GPU}, "90"),
                                  alert({"severity": "critical", **GPU}, "90")]),
    ],
)
# UgroDaemonRestartLoop
case(
    "ugrod started 3 times in 30 minutes: fires",
    [(ug("ugro_daemon_last_start_timestamp_seconds"), "100 100 400 400 700 700 1000 1000")],
    [
        ("3m", "UgroDaemonRestartLoop", []),
        ("7m", "UgroDaemonRestartLoop", [alert({"severity": "warning", **U}, "3")]),
    ],
)
case(
    "one restart: quiet",
    [(ug("ugro_daemon_last_start_timestamp_seconds"), "100 100 400x10")],
    [("10m", "UgroDaemonRestartLoop", [])],
)
# GPU faults, named by node and GPU
GU = dict(**GPU, model_name="NVIDIA L40S")
case(
    "GPU fell off the bus: fires critical",
    [(ug("ugro_gpu_present", **GU), "1 1 0 0 0 0 0")],
    [
        ("2m", "UgroGpuMissing", []),
        ("4m", "UgroGpuMissing", [alert({"severity": "critical", **GU, **U})]),
    ],
)
case("GPU listed: quiet", [(ug("ugro_gpu_present", **GU), "1x10")], [("5m", "UgroGpuMissing", [])])
case(
    "GPU requires reset (ugrod's sample): fires critical",
    [(ug("ugro_gpu_error", **GU), "0 1 1 1 1")],
    [("3m", "UgroGpuError", [alert({"severity": "critical", **GPU})])],
)
case(
    "GPU error reported by the exporter: fires critical",
    [(lab("ugro_gpu_exporter_gpu_error", error="GPU requires reset", **DCGM), "1x5")],
    [("3m", "UgroGpuError", [alert({"severity": "critical", **GPU})])],
)
case("GPU without error: quiet", [(ug("ugro_gpu_error", **GU), "0x10")],
     [("5m", "UgroGpuError", [])])
N1 = dict(node="gpu1", **U)
case(
    "nvidia-smi failing on a GPU node: fires critical",
    [(ug("ugro_node_gpu_query_ok", node="gpu1"), "0x10"), (ug("ugro_node_gpus", node="gpu1"), "2x10")],
    [
        ("1m", "UgroGpuQueryFailing", []),
        ("3m", "UgroGpuQueryFailing", [alert({"severity": "critical", **N1})]),
    ],
)
case(
    "node without GPUs: quiet",
    [(ug("ugro_node_gpu_query_ok", node="gpu1"), "0x10"), (ug("ugro_node_gpus", node="gpu1"), "0x10")],
    [("5m", "UgroGpuQueryFailing", [])],
)
case(
    "XID 79 reported: fires critical",
    [(lab("DCGM_FI_DEV_XID_ERRORS", **DCGM), "0 0 79 79")],
    [("2m", "UgroGpuXid", [alert({"severity": "critical", **DCGM}, "79")])],
)
case("no XID: quiet", [(lab("DCGM_FI_DEV_XID_ERRORS", **DCGM), "0x5")], [("3m", "UgroGpuXid", [])])
case(
    "double-bit ECC errors: fires critical",
    [(lab("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", **DCGM), "0 2 2")],
    [("2m", "UgroGpuEccDoubleBit", [alert({"severity": "critical", **DCGM}, "2")])],
)
case("no ECC errors: quiet", [(lab("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", **DCGM), "0x5")],
     [("3m", "UgroGpuEccDoubleBit", [])])
case(
    "row remapping failed: fires critical",
    [(lab("DCGM_FI_DEV_ROW_REMAP_FAILURE", **DCGM), "0 1 1")],
    [("2m", "UgroGpuRowRemapFailed", [alert({"severity": "critical", **DCGM})])],
)
case("rows remapped fine: quiet", [(lab("DCGM_FI_DEV_ROW_REMAP_FAILURE", **DCGM), "0x5")],
     [("3m", "UgroGpuRowRemapFailed", [])])
case(
    "hardware thermal slowdown (0x48) for 10 minutes: fires",
    [(lab("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", **DCGM), "72x15")],
    [
        ("5m", "UgroGpuThrottled", []),
        ("12m", "UgroGpuThrottled", [alert({"severity": "warning", **DCGM}, "2")]),
    ],
)
case(
    "idle and power-cap clocks (0x1, 0x4): quiet",
    [(lab("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", **DCGM), "5x15")],
    [("12m", "UgroGpuThrottled", [])],
)
# UgroGpuMemoryNearlyFull
case(
    "GPU memory 97 % for 15 minutes: fires",
    [(lab("DCGM_FI_DEV_FB_USED", **DCGM), "970x20"), (lab("DCGM_FI_DEV_FB_FREE", **DCGM), "30x20")],
    [
        ("10m", "UgroGpuMemoryNearlyFull", []),
        ("16m", "UgroGpuMemoryNearlyFull", [alert({"severity": "warning", **GPU}, "97")]),
    ],
)
case(
    "GPU memory 90 %: quiet",
    [(lab("DCGM_FI_DEV_FB_USED", **DCGM), "900x20"), (lab("DCGM_FI_DEV_FB_FREE", **DCGM), "100x20")],
    [("16m", "UgroGpuMemoryNearlyFull", [])],
)
# UgroGpuAllocatedIdle
JA = dict(job_name="idle", owner="alice", **U)
ALLOC = dict(job_name="idle", node="gpu1", gpu="0", UUID="GPU-1111", rank="0", **U)
case(
    "GPU held by a running job at 1 % for over 30 minutes: fires",
    [
        (lab("DCGM_FI_DEV_GPU_UTIL", **DCGM), "1x50"),
        (lab("ugro_job_gpu_allocation", **ALLOC), "1x50"),
        (lab("ugro_job_start_timestamp_seconds", **JA), "0x50"),
    ],
    [
        ("30m", "UgroGpuAllocatedIdle", []),
        ("40m", "UgroGpuAllocatedIdle", [alert({"severity": "warning", "node": "gpu1", "gpu": "0",
                                                "UUID": "GPU-1111", "job_name": "idle",
                                                "rank": "0"})]),
    ],
)
case(
    "GPU held by a job at 80 %: quiet",
    [
        (lab("DCGM_FI_DEV_GPU_UTIL", **DCGM), "80x50"),
        (lab("ugro_job_gpu_allocation", **ALLOC), "1x50"),
        (lab("ugro_job_start_timestamp_seconds", **JA), "0x50"),
    ],
    [("40m", "UgroGpuAllocatedIdle", [])],
)
# UgroSnapshotsFailing
case(
    "snapshot failing since the last success: fires",
    [
        (ug("ugro_snapshot_last_success_timestamp_seconds"), "60x20"),
        (ug("ugro_snapshot_last_failure_timestamp_seconds"), "_ _ 120x20"),
    ],
    [("14m", "UgroSnapshotsFailing", [alert({"severity": "warning", **U})])],
)
case(
    "failing from the start (no success yet): fires",
    [(ug("ugro_snapshot_last_failure_timestamp_seconds"), "60x20")],
    [("14m", "UgroSnapshotsFailing", [alert({"severity": "warning", **U})])],
)
case(
    "a failure, then a success: quiet",
    [
        (ug("ugro_snapshot_last_failure_timestamp_seconds"), "60x20"),
        (ug("ugro_snapshot_last_success_timestamp_seconds"), "120x20"),
    ],
    [("14m", "UgroSnapshotsFailing", [])],
)
# UgroCheckpointCopyStopped
case(
    "checkpoint copies stopped at the head's disk floor: fires",
    [(ug("ugro_checkpoint_copy_stopped"), "0 1x10")],
    [("2m", "UgroCheckpointCopyStopped", [alert({"severity": "warning", **U})])],
)
case(
    "checkpoint copies going: quiet",
    [(ug("ugro_checkpoint_copy_stopped"), "0x10")],
    [("5m", "UgroCheckpointCopyStopped", [])],
)
# UgroRankProcessesGone
case(
    "rank process missing on a node: fires critical",
    [(ug("ugro_node_alert", node="gpu1", alert="rank_processes", severity="warning"), "1x10")],
    [
        ("1m", "UgroRankProcessesGone", []),
        ("3m", "UgroRankProcessesGone", [alert({"severity": "critical", "node": "gpu1",
                                                "alert": "rank_processes", **U})]),
    ],
)
case(
    "other node alerts: quiet",
    [(ug("ugro_node_alert", node="gpu1", alert="memory", severity="warning"), "1x10")],
    [("5m", "UgroRankProcessesGone", [])],
)


# UgroStateDiskFilling (predict_linear looks back up to six hours; one is enough here)
def state_disk(avail):
    return [(ug("ugro_state_dir_filesystem_size_bytes"), "1000x80"),
            (ug("ugro_state_dir_filesystem_avail_bytes"), avail)]


case(
    "state dir 95 % used and shrinking 6 / hour (full within a day): warning",
    state_disk("95-0.1x80"),
    [
        ("65m", "UgroStateDiskFilling", [alert({"severity": "warning", **U})]),
    ],
    interval="1m",
)
case(
    "state dir 97 % used: critical (and warning: it still shrinks)",
    state_disk("30-0.04x80"),
    [("65m", "UgroStateDiskFilling", [alert({"severity": "warning", **U}),
                                      alert({"severity": "critical", **U})])],
    interval="1m",
)
case(
    "state dir 92 % used but steady: quiet",
    state_disk("80x80"),
    [("65m", "UgroStateDiskFilling", [])],
    interval="1m",
)
case(
    "state dir 50 % used and shrinking: quiet",
    state_disk("500-0.1x80"),
    [("65m", "UgroStateDiskFilling", [])],
    interval="1m",
)

header = """# Generated by generate_alert_tests.py (edit that, not this).
# promtool test rules prometheus/tests/alerts.test.yml
# A firing and a quiet case for every alert. Annotations are listed in full:
# promtool 2.42 compares every annotation when a rule has any.
"""
sys.stdout.write(header)
doc = {
    "rule_files": ["../rules/ugro-recording.rules.yml", "../rules/ugro-alerts.rules.yml"],
    "evaluation_interval": "1m",
    "tests": tests,
}
yaml.safe_dump(doc, sys.stdout, sort_keys=False, width=200, allow_unicode=True)
