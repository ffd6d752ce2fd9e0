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
# UgroJobFailed
case(
    "a job fails: fires for the next 10 minutes",
    [(ug("ugro_jobs_finished_total", outcome="failed"), "2 2 2 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3")],
    [
        ("2m", "UgroJobFailed", []),
        ("5m", "UgroJobFailed", [alert({"severity": "warning", "outcome": "failed", **U}, "1")]),
        ("15m", "UgroJobFailed", []),
    ],
)
case(
    "successes and an unchanged failure count: quiet",
    [
        (ug("ugro_jobs_finished_total", outcome="failed"), "4x20"),
        (ug("ugro_jobs_finished_total", outcome="succeeded"), "0+1x20"),
    ],
    [("10m", "UgroJobFailed", [])],
)
# UgroJobStalled
J1 = dict(job="t1", owner="alice", instance=U["instance"])
J2 = dict(job="t2", owner="bob", instance=U["instance"])
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
        ("20m", "UgroEventLogFsyncSlow", [alert({"severity": "warning"}, "248ms")]),
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
    "exporter up but cannot read GPUs: fires",
    [(lab("up", **E), "1x10"), (lab("ugro_gpu_exporter_collect_success", **E), "0x10")],
    [("6m", "UgroGpuExporterFailing", [alert({"severity": "warning", **E})])],
)
case(
    "exporter up and reading: quiet",
    [(lab("up", **E), "1x10"), (lab("ugro_gpu_exporter_collect_success", **E), "1x10")],
    [("6m", "UgroGpuExporterFailing", [])],
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
