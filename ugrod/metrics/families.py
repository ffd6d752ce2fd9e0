"""Metric families computed from ugrod's state, cached samples and RuntimeStats (pure).

Each function appends ``ugrod.metrics.exposition`` families to ``out``; nothing here
does I/O, imports prometheus_client or reads a clock (``now`` is passed in).
``ugrod.metrics.collector.UgroCollector`` calls them at scrape time. Only starting and
running jobs get a ``job_name`` label (``active_jobs``), and jobs that ended in
the last ``ENDED_KEEP_S`` (``ugro_job_ended_timestamp_seconds``: alerts name the
job and why); ``job`` stays Prometheus's own target label, so no
``honor_labels`` is needed. The catalog with types and labels is docs/metrics.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

from ugrod.core.state import ACTIVE, WAITING, JobState, NodeHealth, NodeState, State
from ugrod.core.tally import FAILURE_REASONS, OUTCOMES
from ugrod.metrics.exposition import AnyFamily, Family, HistogramFamily
from ugrod.metrics.runtime_stats import (
    BREAKER_STATES,
    ENDED_KEEP_S,
    Counter,
    Histogram,
    RuntimeStats,
)

JOB_PHASES = (JobState.STARTING, JobState.RUNNING)
CURRENT = (JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.RETRYING)
# The training job's name is ``job_name``: ``job`` is Prometheus's own target label.
JOB = ("job_name", "owner")
NODE = ("node",)
GPU = ("node", "gpu", "UUID", "model_name")
USER_HZ = 100.0  # /proc/stat ticks per second on every Linux build that matters
# Other numbers a job reports (its own names, e.g. grad_norm, learning_rate) are exported as
# ugro_job_training_value{name=...}: at most this many names per job, in the order reported.
MAX_VALUE_NAMES = 32
_OWN_KEYS = frozenset({"step", "loss", "throughput", "ts"})


class GpuSampleView(Protocol):
    """One GPU as last sampled (``ugrod.core.gpus.GpuSample`` satisfies it); None = no value."""

    @property
    def index(self) -> int: ...
    @property
    def uuid(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def util_percent(self) -> float | None: ...
    @property
    def memory_used_bytes(self) -> int | None: ...
    @property
    def memory_total_bytes(self) -> int | None: ...
    @property
    def temperature_c(self) -> float | None: ...
    @property
    def power_w(self) -> float | None: ...
    @property
    def error(self) -> str | None: ...


class NodeSampleView(Protocol):
    """A node's latest health sample as the monitor caches it (``ugrod.core.gpus.NodeSample``)."""

    @property
    def ts(self) -> float: ...
    @property
    def latency_ms(self) -> float | None: ...
    @property
    def gpus(self) -> Sequence[GpuSampleView]: ...
    @property
    def gpu_error(self) -> str | None: ...
    @property
    def smi_s(self) -> float | None: ...
    @property
    def load(self) -> Sequence[float]: ...
    @property
    def cpu_count(self) -> int | None: ...
    @property
    def cpu_ticks(self) -> tuple[int, int] | None: ...
    @property
    def mem_total_bytes(self) -> int | None: ...
    @property
    def mem_percent(self) -> float | None: ...
    @property
    def disk_total_bytes(self) -> int | None: ...
    @property
    def disk_avail_bytes(self) -> int | None: ...
    @property
    def disk_percent(self) -> float | None: ...


def gauge(name: str, doc: str, labelnames: Sequence[str] = ()) -> Family:
    return Family(name, doc, "gauge", labelnames)


def single(name: str, doc: str, value: float) -> Family:
    fam = gauge(name, doc)
    fam.add((), value)
    return fam


def counters(name: str, doc: str, labelnames: Sequence[str],
              series: Sequence[tuple[tuple[str, ...], Counter]]) -> Family:
    fam = Family(name, doc, "counter", labelnames)
    for values, c in series:
        fam.add(values, c.value)
    return fam


# ---- jobs ---------------------------------------------------------------

def jobs(state: State, now: float, rt: RuntimeStats, out: list[AnyFamily]) -> None:
    """Current job counts and the queue; lifetime totals (``state.tally``); histograms."""
    counts = dict.fromkeys(CURRENT, 0)
    waiting = held = 0
    oldest: float | None = None
    gpu_seconds = dict(state.tally.gpu_seconds)
    for job_id in state.active:
        job = state.jobs[job_id]
        counts[job.state] += 1
        if job.state in WAITING:
            if job.held:
                held += 1
                continue
            waiting += 1
            since = job.ended_at if job.state is JobState.RETRYING and job.ended_at \
                else job.submitted_at
            if oldest is None or since < oldest:
                oldest = since
        elif job.started_at is not None and job.placement:
            n = job.gpu_count
            if n:  # the running attempt's GPU-seconds so far (added to the tally at its end)
                gpu_seconds[job.owner] = (gpu_seconds.get(job.owner, 0.0)
                                          + n * max(now - job.started_at, 0.0))
    by_state = gauge("ugro_jobs",
                      "Jobs in each current state now (queued, starting, running, retrying; "
                      "zeros included). Lifetime totals: ugro_jobs_finished_total.", ("state",))
    for st, n in counts.items():
        by_state.add((st.value,), float(n))
    out.append(by_state)
    out.append(single("ugro_queue_length",
                       "Jobs waiting to be placed (queued or retrying), held jobs excepted.",
                       float(waiting)))
    out.append(single("ugro_jobs_held", "Waiting jobs on hold (ugroctl hold).", float(held)))
    out.append(single("ugro_queue_oldest_wait_seconds",
                       "How long the longest-waiting job (not held) has waited; 0 if none.",
                       max(now - oldest, 0.0) if oldest is not None else 0.0))
    wait = HistogramFamily("ugro_job_wait_seconds",
                           "Time jobs waited in the queue, observed when placed (since "
                           "submission, or since the failed attempt for a retry).")
    wait.add((), rt.job_wait)
    run = HistogramFamily("ugro_job_run_seconds",
                          "Run time of ended attempts (placement to end).")
    run.add((), rt.job_run)
    out.append(wait)
    out.append(run)
    tally = state.tally
    total("ugro_jobs_finished_total",
          "Jobs that ended, by outcome (succeeded, failed, cancelled), since the log began.",
          "outcome", tally.finished, OUTCOMES, out)
    total("ugro_job_attempt_failures_total",
          "Attempts that ended without success, by reason (oom, exit, lost, stalled, "
          "cancelled, time_limit), retried ones included.",
          "reason", tally.attempt_failures, FAILURE_REASONS, out)
    total("ugro_job_retries_total",
          "Attempts that failed and left their job waiting to be retried.",
          None, {"": tally.retries}, ("",), out)
    total("ugro_job_resumes_total", "Failed or cancelled jobs queued again (ugroctl resume).",
          None, {"": tally.resumes}, ("",), out)
    total("ugro_gpu_allocated_seconds_total",
          "GPU-seconds held by each owner's jobs (ended attempts plus running ones so far).",
          "owner", gpu_seconds, sorted(gpu_seconds), out)
    ended = gauge("ugro_job_ended_timestamp_seconds",
                   f"When a job (or its attempt, outcome retrying) ended, Unix time; kept "
                   f"{ENDED_KEEP_S / 60:.0f} minutes after the end, with why it ended.",
                   (*JOB, "outcome", "reason"))
    horizon = now - ENDED_KEEP_S
    for end in rt.recent_ends.values():
        if end.ended_at >= horizon:
            ended.add((end.job, end.owner, end.outcome, end.reason), end.ended_at)
    out.append(ended)


def total(name: str, doc: str, label: str | None, table: Mapping[str, float],
          keys: Sequence[str], out: list[AnyFamily]) -> None:
    """A counter family from a tally table: one series per key (zeros included)."""
    fam = Family(name, doc, "counter", (label,) if label else ())
    for key in keys:
        fam.add((key,) if label else (), float(table.get(key, 0)))
    out.append(fam)

def active_jobs(state: State, training: Mapping[str, Mapping[str, float]],
                out: list[AnyFamily]) -> None:
    """Per starting/running job: the only series with a ``job`` label."""
    phase = gauge("ugro_job_state",
                   "Active job's state as a state-set (starting, running): 1 = current.",
                   (*JOB, "state"))
    stalled = gauge("ugro_job_stalled",
                     "1 when the watchdog found the job's step counter stopped, else 0.", JOB)
    start = gauge("ugro_job_start_timestamp_seconds",
                   "When the job's current attempt was placed, Unix time.", JOB)
    step = gauge("ugro_job_training_step", "Latest training step the job reported.", JOB)
    loss = gauge("ugro_job_training_loss", "Latest training loss the job reported.", JOB)
    tput = gauge("ugro_job_training_throughput",
                  "Latest throughput the job reported (its own unit, e.g. samples/s).", JOB)
    report = gauge("ugro_job_training_last_report_timestamp_seconds",
                    "When the job last reported training metrics, Unix time.", JOB)
    other = gauge("ugro_job_training_value",
                  f"Latest value of another number the job reported, by name "
                  f"(at most {MAX_VALUE_NAMES} names a job).", (*JOB, "name"))
    other_add = other.rows.append
    alloc = gauge("ugro_job_gpu_allocation",
                   "1 per GPU an active job holds: join GPU metrics on (node, gpu).",
                   ("job_name", "node", "gpu", "UUID", "rank"))
    # Hot loop (1,000s of jobs): bound appends instead of method calls.
    keyed = ((step.rows.append, "step"), (loss.rows.append, "loss"),
             (tput.rows.append, "throughput"), (report.rows.append, "ts"))
    phase_add, stalled_add = phase.rows.append, stalled.rows.append
    start_add, alloc_add = start.rows.append, alloc.rows.append
    isfinite = math.isfinite
    running = JobState.RUNNING
    starting_v, running_v = (ph.value for ph in JOB_PHASES)
    uuids_of: dict[str, dict[int, str]] = {}  # node -> GPU index -> uuid, built once a scrape
    for job_id in state.active:
        job = state.jobs[job_id]
        if job.state not in ACTIVE:
            continue
        owner = job.owner
        labels = (job_id, owner)
        is_running = job.state is running
        phase_add(((job_id, owner, starting_v), 0.0 if is_running else 1.0))
        phase_add(((job_id, owner, running_v), 1.0 if is_running else 0.0))
        stalled_add((labels, 1.0 if job.stalled else 0.0))
        if job.started_at is not None:
            start_add((labels, job.started_at))
        values = training.get(job_id)
        if values:
            for add, key in keyed:
                v = values.get(key)
                if isinstance(v, int | float) and isfinite(v):
                    add((labels, float(v)))
            n = 0
            for name, v in values.items():
                if name in _OWN_KEYS or not isinstance(v, int | float) or not isfinite(v):
                    continue
                other_add(((job_id, owner, name), float(v)))
                n += 1
                if n == MAX_VALUE_NAMES:
                    break
        for p in job.placement:
            if not p.gpus:
                continue
            uuids = p.gpu_uuids
            if len(uuids) < len(p.gpus):
                known = uuids_of.get(p.node)
                if known is None:
                    node = state.nodes.get(p.node)
                    known = uuids_of[p.node] = (
                        {g.index: g.uuid for g in node.gpus} if node is not None else {})
                uuids = tuple(known.get(g, "") for g in p.gpus)
            rank = str(p.rank)
            for g, uuid in zip(p.gpus, uuids, strict=False):
                alloc_add(((job_id, p.node, str(g), uuid, rank), 1.0))
    out.extend((phase, stalled, start, step, loss, tput, report, other, alloc))


# ---- nodes --------------------------------------------------------------

def nodes(state: State, samples: Mapping[str, NodeSampleView],
          scores: Mapping[str, float | None], rt: RuntimeStats, out: list[AnyFamily]) -> None:
    """Node state, breaker, alerts and health checks; then what each node's sample says."""
    st = gauge("ugro_node_state", "Node state as a state-set: 1 for the current state.",
                ("node", "state"))
    info = gauge("ugro_node_info", "Static facts about a node (always 1).",
                  ("node", "host", "transport"))
    score = gauge("ugro_node_health_score", "Node health score, 0-100 (>= 80 healthy).", NODE)
    breaker = gauge("ugro_node_circuit_breaker_state",
                     "Node's circuit breaker as a state-set (closed, half-open, open).",
                     ("node", "state"))
    success = gauge("ugro_node_last_check_success_timestamp_seconds",
                     "When a health check of the node last succeeded, Unix time.", NODE)
    alerts = gauge("ugro_node_alert", "Active node alerts (1 per alert).",
                    ("node", "alert", "severity"))
    gpu_count = gauge("ugro_node_gpus", "GPUs the node has (inventory, else config).", NODE)
    last_dur = gauge("ugro_health_check_last_duration_seconds",
                      "How long the node's last health check took.", NODE)
    checks: list[tuple[tuple[str, ...], Counter]] = []
    failures: list[tuple[tuple[str, ...], Counter]] = []
    sampled: list[tuple[str, NodeSampleView]] = []
    node_states = [(s, s.value) for s in NodeState]
    for name, node in state.nodes.items():
        labels = (name,)
        current = node.state
        for s, state_name in node_states:
            st.add((name, state_name), 1.0 if s is current else 0.0)
        info.add((name, node.spec.host, node.spec.transport), 1.0)
        gpu_count.add(labels, float(len(node.gpus)))
        value = scores.get(name)
        if value is None:
            value = node.score
        if value is not None:
            score.add(labels, float(value))
        b = rt.breakers.get(name)
        if b is None:
            b = "open" if node.health is NodeHealth.UNREACHABLE else "closed"
        for s2 in BREAKER_STATES:
            breaker.add((name, s2), 1.0 if s2 == b else 0.0)
        ok_ts = rt.health_last_success.get(name)
        if ok_ts is not None:
            success.add(labels, ok_ts)
        for a in node.alerts:
            alerts.add((name, a.alert, a.severity), 1.0)
        if name in rt.health_checks:
            checks.append((labels, rt.health_checks[name]))
            failures.append((labels, rt.health_failures[name]))
            last_dur.add(labels, rt.health_last_duration.get(name, 0.0))
        sample = samples.get(name)
        if sample is not None:
            sampled.append((name, sample))
    out.extend((st, info, score, breaker, success, alerts, gpu_count, last_dur))
    out.append(counters("ugro_health_checks_total", "Health checks run, per node.", NODE,
                         checks))
    out.append(counters("ugro_health_check_failures_total",
                         "Health checks that failed (no answer, or unreadable), per node.",
                         NODE, failures))
    dur = HistogramFamily("ugro_health_check_duration_seconds",
                          "Duration of health checks, all nodes.")
    dur.add((), rt.health_duration)
    out.append(dur)
    node_samples(sampled, out)

def node_samples(sampled: Sequence[tuple[str, NodeSampleView]],
                 out: list[AnyFamily]) -> None:
    """What the latest cached probe of each node said (absent values: no series)."""
    ts = gauge("ugro_node_sample_timestamp_seconds",
                "Time of the node's latest cached health sample, Unix time.", NODE)
    lat = gauge("ugro_node_check_latency_seconds",
                 "Round-trip time of the node's last health probe.", NODE)
    smi_ok = gauge("ugro_node_gpu_query_ok",
                    "1 when the node's last nvidia-smi query was readable, else 0.", NODE)
    smi_s = gauge("ugro_node_gpu_query_duration_seconds",
                   "How long the node's last nvidia-smi query took.", NODE)
    cpu = Family("ugro_node_cpu_seconds_total",
                 "CPU time since boot, all CPUs, by mode (busy, idle); /proc/stat at "
                 "USER_HZ=100.", "counter", ("node", "mode"))
    cpus = gauge("ugro_node_cpus", "CPUs the node has.", NODE)
    load1 = gauge("ugro_node_load1", "1-minute load average.", NODE)
    mem_total = gauge("ugro_node_memory_total_bytes", "Node memory installed.", NODE)
    mem = gauge("ugro_node_memory_used_ratio", "Node memory in use (total - available), 0-1.",
                 NODE)
    disk_size = gauge("ugro_node_disk_size_bytes",
                       "Size of the filesystem holding the node's work dir.", NODE)
    disk_avail = gauge("ugro_node_disk_avail_bytes",
                        "Space left to users on the filesystem holding the work dir.", NODE)
    disk = gauge("ugro_node_disk_used_ratio",
                  "Use of the filesystem holding the node's work dir, 0-1 (df's Use%).", NODE)
    for name, sample in sampled:
        labels = (name,)
        ts.add(labels, sample.ts)
        if sample.latency_ms is not None:
            lat.add(labels, sample.latency_ms / 1000.0)
        smi_ok.add(labels, 0.0 if sample.gpu_error else 1.0)
        if sample.smi_s is not None:
            smi_s.add(labels, sample.smi_s)
        if sample.cpu_ticks is not None:
            total, idle = sample.cpu_ticks
            cpu.add((name, "busy"), (total - idle) / USER_HZ)
            cpu.add((name, "idle"), idle / USER_HZ)
        if sample.cpu_count is not None:
            cpus.add(labels, float(sample.cpu_count))
        if sample.load:
            load1.add(labels, float(sample.load[0]))
        if sample.mem_total_bytes is not None:
            mem_total.add(labels, float(sample.mem_total_bytes))
        for fam, pct in ((mem, sample.mem_percent), (disk, sample.disk_percent)):
            if pct is not None:
                fam.add(labels, pct / 100.0)
        if sample.disk_total_bytes is not None:
            disk_size.add(labels, float(sample.disk_total_bytes))
        if sample.disk_avail_bytes is not None:
            disk_avail.add(labels, float(sample.disk_avail_bytes))
    out.extend((ts, lat, smi_ok, smi_s, cpu, cpus, load1, mem_total, mem, disk_size,
                disk_avail, disk))

def gpus(state: State, samples: Mapping[str, NodeSampleView],
         out: list[AnyFamily]) -> None:
    """Per GPU: allocation from state, and the latest sampled values."""
    util = gauge("ugro_gpu_utilization_ratio", "GPU utilisation (nvidia-smi), 0-1.", GPU)
    used = gauge("ugro_gpu_memory_used_bytes", "GPU memory in use.", GPU)
    total = gauge("ugro_gpu_memory_total_bytes", "GPU memory installed.", GPU)
    temp = gauge("ugro_gpu_temperature_celsius", "GPU temperature.", GPU)
    power = gauge("ugro_gpu_power_watts", "GPU power draw.", GPU)
    error = gauge("ugro_gpu_error",
                   "1 when nvidia-smi reports the GPU as failed (needs reset...), else 0.",
                   GPU)
    allocated = gauge("ugro_gpu_allocated",
                       "1 when an active job holds the GPU, else 0 (from ugrod's state).",
                       GPU)
    present = gauge("ugro_gpu_present",
                     "1 when the node's last readable nvidia-smi listed the GPU, 0 when it "
                     "did not (fell off the bus); absent while nvidia-smi fails.", GPU)
    held = state.allocations()
    alloc_add = allocated.rows.append
    util_add, used_add, total_add = util.rows.append, used.rows.append, total.rows.append
    temp_add, power_add, error_add = temp.rows.append, power.rows.append, error.rows.append
    for name, node in state.nodes.items():
        for g in node.gpus:
            alloc_add(((name, str(g.index), g.uuid, g.model),
                       1.0 if (name, g.index) in held else 0.0))
        sample = samples.get(name)
        if sample is None:
            continue
        if not sample.gpu_error:
            listed = {gs.uuid for gs in sample.gpus} | {str(gs.index) for gs in sample.gpus}
            for g in node.gpus:
                seen = (g.uuid or str(g.index)) in listed
                present.add((name, str(g.index), g.uuid, g.model), 1.0 if seen else 0.0)
        for gs in sample.gpus:
            labels = (name, str(gs.index), gs.uuid, gs.name)
            if gs.util_percent is not None:
                util_add((labels, gs.util_percent / 100.0))
            if gs.memory_used_bytes is not None:
                used_add((labels, float(gs.memory_used_bytes)))
            if gs.memory_total_bytes is not None:
                total_add((labels, float(gs.memory_total_bytes)))
            if gs.temperature_c is not None:
                temp_add((labels, float(gs.temperature_c)))
            if gs.power_w is not None:
                power_add((labels, float(gs.power_w)))
            error_add((labels, 1.0 if gs.error else 0.0))
    out.extend((util, used, total, temp, power, error, allocated, present))

# ---- ugrod itself -----------------------------------------------------------

def daemon(rt: RuntimeStats, out: list[AnyFamily]) -> None:
    """ugrod's own figures: event log, snapshots, API, scheduler."""

    def hist(name: str, doc: str, h: Histogram) -> None:
        fam = HistogramFamily(name, doc)
        fam.add((), h)
        out.append(fam)

    def counter(name: str, doc: str, c: Counter) -> None:
        out.append(counters(name, doc, (), [((), c)]))

    counter("ugro_event_log_appended_events_total",
            "Events appended to the event log since ugrod started.", rt.log_events)
    counter("ugro_event_log_batches_total",
            "Group-committed batches (one write + one fdatasync each).", rt.log_batches)
    counter("ugro_event_log_written_bytes_total",
            "Bytes appended to the event log since ugrod started.", rt.log_bytes)
    counter("ugro_event_log_torn_tail_repairs_total",
            "Torn tails cut off the event log at start-up.", rt.log_torn_tail_repairs)
    counter("ugro_metric_lines_dropped_total",
            "Training metrics lines dropped: too long, nested too deep, not a JSON object, "
            "or with numbers out of range.", rt.metric_lines_dropped)
    hist("ugro_event_log_fsync_seconds", "fdatasync latency per batch.", rt.log_fsync)
    hist("ugro_event_log_batch_events", "Events per group-committed batch.",
         rt.log_batch_events)
    if rt.replay_seconds is not None:
        out.append(single("ugro_event_log_replay_duration_seconds",
                           "How long start-up took to load the snapshot and replay the log.",
                           rt.replay_seconds))
        out.append(single("ugro_event_log_replayed_events", "Events replayed at start-up.",
                           float(rt.replay_events)))
    hist("ugro_snapshot_duration_seconds", "Time to write a state snapshot.",
         rt.snapshot_seconds)
    counter("ugro_snapshot_failures_total", "Snapshots that could not be written.",
            rt.snapshot_failures)
    if rt.snapshot_last_failure is not None:
        out.append(single("ugro_snapshot_last_failure_timestamp_seconds",
                           "When a snapshot last failed to be written, Unix time.",
                           rt.snapshot_last_failure))
    if rt.state_dir_size_bytes is not None and rt.state_dir_avail_bytes is not None:
        out.append(single("ugro_state_dir_filesystem_size_bytes",
                           "Size of the filesystem holding ugrod's state directory.",
                           rt.state_dir_size_bytes))
        out.append(single("ugro_state_dir_filesystem_avail_bytes",
                           "Space left on the filesystem holding ugrod's state directory "
                           "(event log, snapshots, job directories).",
                           rt.state_dir_avail_bytes))
    if rt.snapshot_last_success is not None and rt.snapshot_last_bytes is not None:
        out.append(single("ugro_snapshot_last_success_timestamp_seconds",
                           "When the last snapshot was written, Unix time.",
                           rt.snapshot_last_success))
        out.append(single("ugro_snapshot_size_bytes", "Size of the last snapshot written.",
                           float(rt.snapshot_last_bytes)))
    out.append(counters("ugro_api_requests_total",
                         "API requests answered, by route template, method and status code.",
                         ("route", "method", "code"),
                         [(k, v) for k, v in rt.api_requests.items()]))
    api = HistogramFamily("ugro_api_request_duration_seconds",
                          "API request latency by route template.", ("route",))
    for route, h in rt.api_latency.items():
        api.add((route,), h)
    out.append(api)
    counter("ugro_checkpoint_copied_bytes_total",
            "Checkpoint bytes copied from nodes to the head since ugrod started.",
            rt.checkpoint_copy_bytes)
    counter("ugro_checkpoint_copies_total",
            "Checkpoints copied to the head and verified (sha256 on both ends).",
            rt.checkpoint_copies)
    counter("ugro_checkpoint_copy_failures_total",
            "Checkpoint copies that failed (each is retried with backoff and recorded).",
            rt.checkpoint_copy_failures)
    out.append(single("ugro_checkpoint_copy_stopped",
                      "1 while checkpoint copies are stopped because the head's free space "
                      "would fall below checkpoints.min_free_gb; else 0.",
                      1.0 if rt.checkpoint_copy_stopped else 0.0))
    if rt.checkpoint_head_free_bytes is not None and rt.checkpoint_floor_bytes is not None:
        out.append(single("ugro_checkpoint_head_free_bytes",
                          "Free space where the head keeps checkpoint copies, at the last copy.",
                          rt.checkpoint_head_free_bytes))
        out.append(single("ugro_checkpoint_head_floor_bytes",
                          "The free space checkpoint copies never go below "
                          "(checkpoints.min_free_gb).", rt.checkpoint_floor_bytes))
    hist("ugro_scheduler_tick_duration_seconds",
         "Time one scheduler pass (plan + record) took.", rt.scheduler_ticks)
    counter("ugro_scheduler_placements_total", "Jobs the scheduler placed.",
            rt.scheduler_placements)
