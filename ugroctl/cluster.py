"""Commands about the cluster: health, nodes (and trusting their host keys), drain,
undrain, reload; and those that work without the daemon: replay, prometheus-config."""

from __future__ import annotations

import sys
import time

import click

from ugroctl import render
from ugroctl.base import (
    UgroGroup,
    cli,
    ctl,
    emit,
    examples,
    fail,
    json_option,
    user_time,
    want_json,
)
from ugroctl.client import (
    EXIT_FAILED,
    Client,
    seg,
)


@cli.command(epilog=examples("ugroctl health", "ugroctl health --watch",
                              "ugroctl health gpu1 --deep"))
@click.argument("node", required=False)
@click.option("--deep", is_flag=True, help="Also the readiness checks: python, import torch, "
                                           "CUDA, free disk.")
@click.option("--watch", is_flag=True, help="Refresh the table in place until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              metavar="S", help="Seconds between refreshes with --watch.")
@json_option
def health(node: str | None, deep: bool, watch: bool, interval: float, as_json: bool) -> None:
    """Show node health (status, score, GPUs, alerts), or check one node now."""
    client = ctl().client
    as_json = want_json(as_json)
    if watch:
        if node or deep or as_json:
            raise click.UsageError("--watch shows the table only (no NODE, --deep or --json)")
        _watch(client, interval)
        return
    if node is None and not deep:
        doc = client.get("/v1/nodes")
        emit(doc, as_json, lambda: render.health_table(doc.get("nodes") or [], time.time()))
        return
    names = [node] if node else [n["name"] for n in client.get("/v1/nodes").get("nodes") or []]
    docs = [client.post(f"/v1/nodes/{seg(n)}/check", {"deep": deep}) for n in names]
    if as_json:
        click.echo(render.dump_json(docs[0] if node else {"checks": docs}))
    else:
        click.echo("\n\n".join(render.checks_table(d) for d in docs))
    if any(not c.get("ok") for d in docs for c in d.get("checks") or []):
        raise click.exceptions.Exit(EXIT_FAILED)


def _watch(client: Client, interval: float) -> None:
    tty = sys.stdout.isatty()
    try:
        while True:
            doc = client.get("/v1/nodes")
            text = render.health_table(doc.get("nodes") or [], time.time())
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")
            click.echo(f"{time.strftime('%H:%M:%S')}  every {interval:g}s, Ctrl-C to stop"
                       f"\n\n{text}\n")
            time.sleep(interval)
    except KeyboardInterrupt:
        pass


@cli.group(cls=UgroGroup, invoke_without_command=True,
           epilog=examples("ugroctl nodes", "ugroctl nodes trust gpu1"))
@json_option
@click.pass_context
def nodes(ctx: click.Context, as_json: bool) -> None:
    """List the cluster's nodes: address, state, GPUs, labels, jobs."""
    if ctx.invoked_subcommand is not None:
        return
    doc = ctl().client.get("/v1/nodes")
    emit(doc, want_json(as_json), lambda: render.nodes_table(doc.get("nodes") or [],
                                                             doc.get("cluster")))


@nodes.command("trust", epilog=examples("ugroctl nodes trust gpu1"))
@click.argument("node")
@click.option("-y", "--yes", is_flag=True,
              help="Trust without asking (only if you checked the fingerprint another way).")
@json_option
def nodes_trust(node: str, yes: bool, as_json: bool) -> None:
    """Show the SSH host key NODE offers and, if you say so, record it in known_hosts."""
    client = ctl().client
    key = client.get(f"/v1/nodes/{seg(node)}/hostkey")
    status = key.get("status")
    where = f"{render.clean(key.get('host'))}:{render.clean(key.get('port'))}"
    click.echo(f"node {render.clean(node)} ({where}) offers this host key:\n"
               f"  {render.clean(key.get('fingerprint'))}  ({render.clean(key.get('key_type'))})",
               err=True)
    if status == "trusted":
        click.echo(f"it is already in {render.clean(key.get('known_hosts'))}: nothing to do",
                   err=True)
        if as_json:
            click.echo(render.dump_json(key))
        return
    if status == "changed":
        olds = [k for k in key.get("known_keys") or [] if isinstance(k, dict)]
        old_text = "\n".join(f"  {render.clean(k.get('fingerprint'))}  "
                             f"({render.clean(k.get('key_type'))})" for k in olds) or \
            f"  {render.clean(key.get('known_fingerprint'))}"
        click.echo(f"WARNING: the host key of {render.clean(node)} CHANGED.\n"
                   f"old (in {render.clean(key.get('known_hosts'))}):\n{old_text}\n"
                   f"new (offered now):\n  {render.clean(key.get('fingerprint'))}  "
                   f"({render.clean(key.get('key_type'))})\n"
                   f"Someone may be impersonating the node, or it was reinstalled: compare "
                   f"the new fingerprint with the node's own before you replace the old key.",
                   err=True)
    if not yes:
        if not sys.stdin.isatty():
            fail("not trusting a host key without confirmation: check the fingerprint on the "
                 "node (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) and rerun with --yes")
        question = ("Replace the old key with the new one?" if status == "changed"
                    else "Trust this key?")
        if not click.confirm(question, default=False, err=True):
            fail("not trusted; nothing changed")
    # Send back the very line that was shown: ugrod refuses it if the node's key
    # changed in between, so what is trusted is what the user saw.
    doc = client.post(f"/v1/nodes/{seg(node)}/trust", {"line": key.get("line")})

    def said() -> str:
        text = (f"trusted {render.clean(node)}'s key {render.clean(doc.get('trusted'))} "
                f"(recorded in {render.clean(key.get('known_hosts'))})")
        state = doc.get("state")
        if state in ("healthy", "degraded"):
            return f"{text}\n{render.clean(node)} is reachable: {render.clean(state)}"
        if state:
            why = f": {render.clean(doc.get('health_reason'))}" if doc.get("health_reason") \
                else ""
            return f"{text}\n{render.clean(node)} is still {render.clean(state)}{why}"
        return text
    emit(doc, want_json(as_json), said)


@cli.command(epilog=examples("ugroctl drain gpu1 --reason 'replacing fan'"))
@click.argument("node")
@click.option("--reason", default="", metavar="TEXT", help="Why (shown in health and nodes).")
@json_option
def drain(node: str, reason: str, as_json: bool) -> None:
    """Stop placing new work on a node; jobs already running there finish."""
    doc = ctl().client.post(f"/v1/nodes/{seg(node)}/drain", {"reason": reason})
    emit(doc, want_json(as_json), lambda: f"{render.clean(node)}: draining (running jobs "
                                           f"finish; `ugroctl undrain {render.clean(node)}` "
                                           f"to end)")


@cli.command(epilog=examples("ugroctl undrain gpu1"))
@click.argument("node")
@json_option
def undrain(node: str, as_json: bool) -> None:
    """Let a drained node take new work again."""
    doc = ctl().client.post(f"/v1/nodes/{seg(node)}/undrain")
    emit(doc, want_json(as_json), lambda: f"{render.clean(node)}: accepting work")


@cli.command(epilog=examples("ugroctl reload"))
@json_option
def reload(as_json: bool) -> None:
    """Re-read cluster.yaml: add and remove nodes without touching running jobs."""
    doc = ctl().client.post("/v1/reload")
    emit(doc, want_json(as_json), lambda: render.reload_view(doc))


# ---- without the daemon ------------------------------------------------------------------


@cli.command(epilog=examples("ugroctl replay --until 1200", "ugroctl replay --until "
                              "2026-01-20T14:00 --state-dir /var/lib/ugro",
                              "ugroctl replay --until 2h --json"))
@click.option("--until", required=True, metavar="SEQ|TIME",
              help="Last event to apply: a sequence number, a time, or an age (2h).")
@click.option("--state-dir", type=click.Path(file_okay=False), envvar="UGRO_STATE_DIR",
              metavar="DIR", help="ugrod's state directory [env UGRO_STATE_DIR; default: "
                                  "the config's, else ugrod's default].")
@json_option
def replay(until: str, state_dir: str | None, as_json: bool) -> None:
    """Show the cluster as it was at a past moment, read straight from the event log.

    Works with ugrod stopped: nothing is written.
    """
    from ugroctl import replaying

    try:
        doc = replaying.state_at(until, state_dir, user_time, ctl().config)
    except replaying.OfflineError as exc:
        fail(str(exc))
    emit(doc, want_json(as_json), lambda: replaying.describe(doc))


@cli.command("prometheus-config", epilog=examples(
    "ugroctl prometheus-config > /etc/prometheus/prometheus.yml",
    "ugroctl prometheus-config --alertmanager http://127.0.0.1:9093 "
    "--rules-out /etc/prometheus/ugro --runbook-base https://wiki.lan/ugro/operations.md",
    "ugroctl prometheus-config --config /etc/ugro/cluster.yaml --exporter-port 9400"))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="UGRO_CONFIG",
              metavar="FILE", help="cluster.yaml [env UGRO_CONFIG; default "
                                   "/etc/ugro/cluster.yaml when present, else this machine].")
@click.option("--rules-dir", metavar="DIR", help="Where the UGRO rule files are installed "
                                                  "[default /etc/prometheus/ugro].")
@click.option("--exporter-port", type=click.IntRange(1, 65535), metavar="PORT",
              help="The nodes' GPU exporter port [default 9400].")
@click.option("--scrape-interval", metavar="DURATION", help="e.g. 15s [default 15s].")
@click.option("--alertmanager", "alertmanagers", multiple=True, metavar="URL",
              help="Send alerts to this Alertmanager (writes the alerting: section; "
                   "repeatable).")
@click.option("--rules-out", type=click.Path(file_okay=False), metavar="DIR",
              help="Also write the rule files there, with cluster.yaml's "
                   "health.thresholds in the alerts.")
@click.option("--runbook-base", metavar="URL",
              help="Absolute URL of docs/operations.md for the alerts' runbook links "
                   "[default file:///opt/ugro/share/doc/ugro/operations.md].")
def prometheus_config(config_path: str | None, rules_dir: str | None,
                      exporter_port: int | None, scrape_interval: str | None,
                      alertmanagers: tuple[str, ...], rules_out: str | None,
                      runbook_base: str | None) -> None:
    """Print a Prometheus config for ugrod and the nodes' GPU exporters.

    Generated from cluster.yaml (works without ugrod running). With --rules-out,
    the recording and alert rules are written too, thresholds from cluster.yaml.
    """
    from ugroctl import replaying

    try:
        text, source = replaying.prometheus_config(
            config_path or ctl().config, rules_dir, exporter_port, scrape_interval,
            alertmanagers=alertmanagers, rules_out=rules_out, runbook_base=runbook_base)
    except replaying.OfflineError as exc:
        fail(str(exc))
    if source is None:
        from ugrod.config.paths import ROOT_CONFIG

        # Said twice: on stderr for the person, and in the file for whoever reads it later.
        note = ("no cluster.yaml given (--config or UGRO_CONFIG) or found at "
                f"{ROOT_CONFIG}: this describes the built-in one-node cluster "
                "(this machine alone)")
        click.echo(f"ugroctl: note: {note}", err=True)
        text = f"# {note}\n{text}"
    click.echo(text, nl=not text.endswith("\n"))
