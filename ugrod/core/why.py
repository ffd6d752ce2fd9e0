"""One sentence per event, for `ugroctl why`: the history of a job's decisions, from the log."""

from __future__ import annotations

from collections.abc import Mapping

from ugrod.core import codec, time_limits
from ugrod.core import events as ev


def _at(ts: float | None) -> str:
    return codec.format_ts(ts)[11:16] + " UTC" if ts is not None else "?"


def _checkpoint(path: str, steps: Mapping[str, int | None]) -> str:
    """'step 400 (/ckpt/step-400.pt)' when an earlier checkpoint_saved gave its step."""
    step = steps.get(path)
    return f"step {step} ({path})" if step is not None else path


def explain(record: ev.Record, steps: Mapping[str, int | None] | None = None) -> str:
    """What happened, in words; pure (the time comes from the event).

    ``steps``: checkpoint path -> training step, from the job's earlier checkpoint_saved
    events, so a resume says which step it continues from.
    """
    e, who = record.event, record.actor.user
    steps = steps or {}
    match e:
        case ev.JobSubmitted(spec=s):
            gpus = f", {s.gpus_per_node} GPU(s) per node" if s.gpus_per_node else ", CPU only"
            vram = f" ≥ {s.min_vram_bytes / 2**30:.0f} GB" if s.min_vram_bytes else ""
            extra = f", after {', '.join(s.after)}" if s.after else ""
            extra += f", after any end of {', '.join(s.after_any)}" if s.after_any else ""
            extra += f", only if {', '.join(s.after_failed)} fails" if s.after_failed else ""
            extra += f", time limit {time_limits.show(s.time_limit_s)}" \
                if s.time_limit_s else ""
            held = " (held)" if e.held else ""
            return (f"submitted by {who}: {s.nodes} node(s){gpus}{vram}, priority "
                    f"{e.priority}{extra}{held}")
        case ev.JobWaiting(reason=reason):
            return f"waiting: {reason}"
        case ev.JobPlaced(attempt=a, ranks=ranks):
            where = ", ".join(f"{r.node}" + (f" (GPU {','.join(map(str, r.gpus))})" if r.gpus
                                             else "") for r in ranks)
            resume = f", resuming from {_checkpoint(e.resume_from, steps)}" \
                if e.resume_from else ""
            return f"attempt {a} placed on {where}{resume}" + (f": {e.reason}" if e.reason
                                                                 else "")
        case ev.RankStarted(rank=r, node=n, pid=pid):
            return f"rank {r} started on {n} (pid {pid})"
        case ev.JobRunning(attempt=a):
            return f"attempt {a}: every rank is running"
        case ev.RankExited(rank=r, node=n, exit_code=c):
            return f"rank {r} on {n} exited with code {c}"
        case ev.JobStopping(outcome=o, reason=reason):
            return f"stopping ({o}): {reason}"
        case ev.JobEnded(outcome=o, reason=reason):
            step = f" at step {e.last_step}" if e.last_step is not None else ""
            retry = f"; retry at {_at(e.retry_at)}" if e.retry_at is not None else ""
            resume = f" from {_checkpoint(e.resume_from, steps)}" \
                if e.resume_from and e.retry_at else ""
            return f"attempt {e.attempt} {o}{step}: {reason}{retry}{resume}"
        case ev.JobCancelRequested(reason=reason):
            return f"cancelled before it started: {reason}"
        case ev.JobPrioritySet(priority=p):
            return f"priority set to {p} by {who}"
        case ev.JobHeld():
            return f"held by {who}"
        case ev.JobReleased():
            return f"released by {who}"
        case ev.JobResumed(resume_from=r):
            changed = ", ".join(f"{k}={v}" for k, v in e.spec.params.items())
            return (f"resumed by {who}" + (f" from {_checkpoint(r, steps)}" if r
                                           else " from scratch")
                    + (f" with {changed}" if changed else ""))
        case ev.CheckpointRequested():
            return f"checkpoint requested by {who}"
        case ev.CheckpointSaved(path=p, step=s):
            return f"checkpoint saved: {p}" + (f" (step {s})" if s is not None else "")
        case ev.CheckpointCopied(name=name, node=n, path=p, size_bytes=size, step=s):
            return (f"checkpoint copied to the head as checkpoints/{name} from {n}:{p} "
                    f"({size / 2**20:.1f} MiB" + (f", step {s})" if s is not None else ")")
                    + ", verified")
        case ev.CheckpointCopyFailed(path=p, node=n, reason=reason, retry_in_s=retry):
            where = f"{n}:{p}" if n else p
            again = f"; retry in {retry:.0f} s" if retry is not None else "; not retried"
            return f"checkpoint copy of {where} failed ({e.failures} in a row): {reason}{again}"
        case ev.CheckpointPruned(names=names, reason=reason):
            return f"checkpoint copies removed from the head: {', '.join(names)}" + (
                f" ({reason})" if reason else "")
        case ev.CheckpointStaged(attempt=a, source=src, paths=paths, step=s):
            put = ", ".join(f"{n}:{p}" for n, p in sorted(paths.items()))
            at = f"step {s} " if s is not None else ""
            return f"attempt {a} resumes from {at}({src}), put on {put}"
        case ev.JobStalled(step=s, idle_s=idle):
            return f"stalled: no step advance for {idle:.0f} s (last step {s})" + (
                f"; stacks in {e.stacks}" if e.stacks else "")
        case ev.JobProgressed(step=s):
            return "progressing again" + (f" at step {s}" if s is not None else "")
        case ev.RankFenced(attempt=a, rank=r, node=n, pids=pids):
            return (f"rank {r} of attempt {a} was found running on {n} although its attempt "
                    f"had ended: fenced (killed{f', {pids} processes' if pids else ''}) "
                    f"before its GPUs were used again")
        case ev.SweepCreated(sweep=name):
            return f"created as a trial of sweep {name}"
    return e.kind.replace("_", " ")
