"""Commands that work without the daemon: ``replay`` (state at a past moment, straight
from the event log) and ``prometheus-config`` (a scrape config from cluster.yaml).

They import the daemon's own log, events, state and config modules, so only
these commands pay for them (msgspec, yaml). ``replay`` opens the log read-only:
no lock, no repair, nothing written, so it works beside a running ugrod too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ugroctl import render

if TYPE_CHECKING:
    from ugrod.config.schema import Config


class OfflineError(Exception):
    """Why the command could not do its work (for people)."""


def load_config(path: str | None) -> Config:
    """cluster.yaml as ugrod reads it: FILE, else $UGRO_CONFIG, else /etc/ugro/cluster.yaml
    when present, else the built-in one-node cluster."""
    from ugrod.config import loading
    from ugrod.config import schema as cfgmod
    from ugrod.config.paths import ROOT_CONFIG

    chosen = path or os.environ.get("UGRO_CONFIG") or None
    if chosen is None and ROOT_CONFIG.exists():
        chosen = str(ROOT_CONFIG)
    try:
        return loading.load(chosen) if chosen is not None else cfgmod.builtin()
    except cfgmod.ConfigError as exc:
        raise OfflineError(str(exc)) from None


def state_dir_for(flag: str | None, config: str | None = None) -> Path:
    """ugrod's state directory: --state-dir, else $UGRO_STATE_DIR, else the config's, else
    the default (as ugrod resolves it)."""
    from ugrod.config import schema as cfgmod

    if flag:
        return Path(flag)
    try:
        cfg = load_config(config)
    except OfflineError:
        cfg = None
    return cfgmod.resolve_paths(cfg, env=os.environ)[0]


def state_at(until: str, state_dir: str | None,
             parse_time: Callable[[str, float], float],
             config: str | None = None) -> dict[str, Any]:
    """Apply the log's events up to a seq (all digits) or a time; the state as the API shows
    it, plus the seq and time of the last event applied."""
    import time

    text = until.strip()
    until_seq: int | None = None
    until_ts: float | None = None
    if text.isdigit():
        until_seq = int(text)
    else:
        try:
            until_ts = parse_time(text, time.time())
        except ValueError as exc:  # click.BadParameter is a ValueError too
            raise OfflineError(str(getattr(exc, "message", exc))) from None
    directory = state_dir_for(state_dir, config)
    if not (directory / "events").is_dir():
        raise OfflineError(f"no event log in {directory} (pass --state-dir DIR: the "
                           f"directory ugrod runs with)")
    from ugrod.core import codec
    from ugrod.core import events as ev
    from ugrod.core import render_json as rj
    from ugrod.core import state as st
    from ugrod.store import log as evlog

    state = st.State()
    last_ts: float | None = None
    try:
        log = evlog.EventLog.open(directory, readonly=True)
    except (evlog.LogError, OSError) as exc:
        raise OfflineError(f"cannot open the event log in {directory}: {exc}") from None
    try:
        if until_seq is not None:
            state = _from_snapshot(directory, until_seq, state)
        for batch in log.read(after_seq=state.seq):
            for line in batch:
                record = codec.decode(line)
                if until_seq is not None and record.seq > until_seq:
                    break
                if until_ts is not None and record.ts > until_ts:
                    break
                state = st.apply(state, record)
                last_ts = record.ts
            else:
                continue
            break
    except (evlog.LogError, ev.EventError, st.InvalidEvent, OSError) as exc:
        raise OfflineError(f"cannot replay the event log in {directory}: {exc}") from None
    finally:
        log.close_sync()
    jobs = sorted(state.jobs.values(), key=lambda j: j.submit_seq)
    held = rj.held_gpus(state)
    node_docs = [rj.node(n, state.jobs_on(n.name), None, held.get(n.name, ()))
                 for n in sorted(state.nodes.values(), key=lambda n: n.name)]
    return {
        "state_dir": str(directory),
        "until": {"seq": until_seq, "time": rj.iso(until_ts)},
        "seq": state.seq,
        "last_event_at": rj.iso(last_ts),
        "jobs": [rj.job(j) for j in jobs],
        "nodes": node_docs,
        "cluster": rj.cluster_summary(node_docs),
    }


def _from_snapshot(directory: Path, until_seq: int, empty: Any) -> Any:
    """The newest snapshot when it is not past ``until_seq`` (saves replaying old events)."""
    from ugrod.core import state as st
    from ugrod.store import log as evlog
    from ugrod.store.snapshots import read_latest_snapshot

    try:
        snap = read_latest_snapshot(directory)
    except (evlog.LogError, OSError):
        return empty
    if snap is None or snap[0] > until_seq:
        return empty
    try:
        return st.from_snapshot(snap[1])
    except ValueError:
        return empty


def describe(doc: dict[str, Any]) -> str:
    """The replayed state for people: where it stops, then jobs and nodes.

    "3m ago" in the tables counts back from the replayed moment (the time asked for,
    else the last event applied), not from now: it is that moment being shown.
    """
    when = doc.get("last_event_at")
    moment = render.parse_time((doc.get("until") or {}).get("time")) \
        or render.parse_time(when) or 0.0
    head = (f"state after event {doc['seq']}"
            + (f" ({render._clock(when)})" if when else "")
            + f", replayed from {render.clean(doc['state_dir'])}"
            + f"; times are relative to {render._clock(moment)}")
    return "\n\n".join([head, render.jobs_table(doc["jobs"], moment),
                        render.nodes_table(doc["nodes"], doc.get("cluster"))])


def prometheus_config(path: str | None, rules_dir: str | None, exporter_port: int | None,
                      interval: str | None, *, alertmanagers: Sequence[str] = (),
                      rules_out: str | None = None, runbook_base: str | None = None
                      ) -> tuple[str, str | None]:
    """prometheus.yml for the cluster in cluster.yaml (ugrod.setup.prometheus_config writes it),
    and the file it describes (None: the built-in one-node cluster); with ``rules_out``,
    the rule files are written there too."""
    from ugrod.setup import prometheus_config as pc

    cfg = load_config(path)
    kwargs: dict[str, Any] = {"alertmanagers": alertmanagers}
    if rules_dir:
        kwargs["rules_dir"] = rules_dir
    if exporter_port is not None:
        kwargs["exporter_port"] = exporter_port
    if interval:
        kwargs["scrape_interval"] = interval
    try:
        text = pc.scrape_config(cfg, **kwargs)
        base: dict[str, str] = {"runbook_base": runbook_base} if runbook_base else {}
        if rules_out is not None:
            pc.write_rules(cfg, Path(rules_out), **base)
        elif runbook_base is not None:
            raise pc.ScrapeConfigError("--runbook-base goes into the rule files: "
                                       "add --rules-out DIR")
        return text, (str(cfg.source) if cfg.source else None)
    except pc.ScrapeConfigError as exc:
        where = f"{cfg.source}: " if getattr(cfg, "source", None) else ""
        raise OfflineError(f"{where}{exc}") from None
    except OSError as exc:
        raise OfflineError(f"--rules-out {rules_out}: {exc.strerror or exc}") from None
