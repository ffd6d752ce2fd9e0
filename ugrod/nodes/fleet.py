"""The fleet: every node's agent and connection, host keys, GPU inventory, rendezvous addresses.

One object owns the agents (one per node, plus one per remote account that
``users:`` maps an owner to) and their transports; everyone else asks it for the
agent a job's ranks use on a node (``agent_for``) and never keeps the table. The
config's nodes become events here (``reconcile``), and a reload swaps the agents
of changed nodes in place (``reconfigure``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import msgspec

from ugrod.config import schema as cfgmod
from ugrod.core import events as ev
from ugrod.core import health
from ugrod.core.commands import Refused
from ugrod.core.state import Job
from ugrod.nodes import host_keys, inventory
from ugrod.nodes.agent import NodeAgent
from ugrod.nodes.transport.base import Transport
from ugrod.nodes.transport.local import LocalTransport
from ugrod.store.ledger import Ledger

logger = logging.getLogger("ugrod.nodes.fleet")

INVENTORY_WAIT_S = 0.25  # of start-up, at most, for the nodes' first GPU inventory
INVENTORY_SUBMIT_WAIT_S = 12.0  # a submit's wait for it (each node's own limit is 8 s)
LOCAL_INVENTORY_WAIT_S = 2.0  # for this machine's own (nvidia-smi answers in ~0.1 s)


class HealthChecks(Protocol):
    """What the fleet asks of the health monitor (ugrod/loops/monitor.py)."""

    async def check_now(self, name: str) -> None: ...

    async def suspect(self, name: str, why: str) -> None: ...

    async def check(self, name: str, *, deep: bool = False) -> list[dict[str, Any]]: ...

    def view(self, name: str) -> dict[str, Any] | None: ...

    def set_nodes(self, agents: Mapping[str, NodeAgent],
                  transports: Mapping[str, Transport]) -> None: ...


class Fleet:
    """The nodes as ugrod reaches them."""

    def __init__(self, ledger: Ledger, config: cfgmod.Config, state_dir: Path, *,
                 switches_users: bool) -> None:
        self._ledger = ledger
        self.config = config
        self._state_dir = state_dir
        self._switches_users = switches_users
        self._agents: dict[str, NodeAgent] = {}
        # (node, remote user, identity file) -> agent, for owners mapped under users:
        self._account_agents: dict[tuple[str, str, str], NodeAgent] = {}
        self._transports: dict[str, Transport] = {}
        self.health: HealthChecks | None = None  # set once the monitor runs
        self._inventory_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._build_agents()

    # ---- agents ---------------------------------------------------------------------

    @property
    def agents(self) -> Mapping[str, NodeAgent]:
        """Each node's own agent, by node name (a live view: a reload changes it in place)."""
        return self._agents

    @property
    def transports(self) -> Mapping[str, Transport]:
        """Each node's own transport, by node name (a live view)."""
        return self._transports

    def agent(self, node: str) -> NodeAgent | None:
        """The node's own agent (None: no such node)."""
        return self._agents.get(node)

    def agent_for(self, job: Job, node: str) -> NodeAgent:
        """The agent ``job``'s ranks use on ``node``: the node's own, or one logged in as
        the account ``users:`` maps the job's owner to on that node (KeyError: no node)."""
        default = self._agents[node]
        try:
            cfg = self.config.node(node)
        except KeyError:
            return default
        account = self.config.remote_account(job.owner, node) if cfg.transport == "ssh" \
            else None
        if account is None or (account.user == cfg.user and account.identity_file in (
                None, cfg.identity_file)):
            return default
        identity = account.identity_file or cfg.identity_file
        key = (node, account.user, str(identity))
        agent = self._account_agents.get(key)
        if agent is None:
            spec = msgspec.structs.replace(self._ledger.state.nodes[node].spec,
                                           user=account.user)
            agent = self._account_agents[key] = self._agent(spec, identity_file=identity,
                                                            register=False)
        return agent

    def job_agent(self, job: Job, node: str) -> NodeAgent | None:
        """``agent_for``, or None when ``node`` has no agent (not in the config any more)."""
        return self.agent_for(job, node) if node in self._agents else None

    def _build_agents(self) -> None:
        for spec in self.config.node_specs():
            if spec.name not in self._agents:
                self._agents[spec.name] = self._agent(spec)

    def _agent(self, spec: ev.NodeSpec, *, identity_file: Path | None = None,
               register: bool = True) -> NodeAgent:
        transport: Transport
        node_cfg = self.config.node(spec.name)
        if spec.transport == "local":
            transport = LocalTransport(spec.name)
        else:
            from ugrod.nodes.transport.ssh import SshTransport
            transport = SshTransport(
                spec.name, spec.host, spec.port, spec.user,
                known_hosts=Path(self.config.cluster.known_hosts).expanduser(),
                identity_file=identity_file or node_cfg.identity_file,
                keepalive_s=self.config.cluster.ssh_keepalive_s)
        if register:
            self._transports[spec.name] = transport
        work_dir = spec.work_dir
        if spec.transport == "local" and self.config.source is None:
            # Ranks of other users must reach their run dirs: not inside the 0700 state
            # dir then, but beside it (made 0711; each run dir is its owner's, 0700).
            work_dir = str(self._state_dir / "work") if not self._switches_users else \
                str(self._state_dir.parent / f"{self._state_dir.name}-work")
        return NodeAgent(transport, work_dir, spec.python, clean_env=spec.transport == "local",
                         cgroups=self.config.cluster.cgroups)

    # ---- the config's nodes ---------------------------------------------------------

    async def reconcile(self, config: cfgmod.Config) -> dict[str, list[str]]:
        """Turn the config's nodes into node_added/updated/removed events.

        Refused (nothing recorded) when the config drops a node that runs jobs.
        """
        state = self._ledger.state
        wanted = {s.name: s for s in config.node_specs()}
        events: list[ev.Event] = []
        added, changed, removed, refused = [], [], [], []
        for name, spec in wanted.items():
            node = state.nodes.get(name)
            if node is None:
                events.append(ev.NodeAdded(node=spec))
                if spec.transport == "ssh":  # honest until its first check says otherwise
                    events.append(ev.NodeHealthChanged(node=name, health="unreachable",
                                                       reason=health.NOT_CONTACTED))
                added.append(name)
            elif node.spec != spec:
                events.append(ev.NodeUpdated(node=spec))
                changed.append(name)
        for name in state.nodes:
            if name not in wanted:
                busy = state.jobs_on(name)
                if busy:
                    refused.append(f"{name} (runs {', '.join(busy)})")
                else:
                    events.append(ev.NodeRemoved(node=name))
                    removed.append(name)
        if refused:
            raise Refused("conflict", "cannot remove nodes that run jobs: " + "; ".join(refused)
                          + ". Drain them and wait for the jobs to end.")
        if events:
            await self._ledger.record(ev.DAEMON, *events)
        return {"added": added, "changed": changed, "removed": removed}

    async def reconfigure(self, config: cfgmod.Config, changes: Mapping[str, list[str]]) -> None:
        """After ``reconcile(config)``: new agents for added and changed nodes, removed
        ones closed; their GPUs read and their health checked. Running jobs keep theirs."""
        self.config = config
        # Mapped accounts may have changed: new agents are made on next use (the old ones
        # keep serving nothing; their connections close when idle or at stop).
        for name in changes["removed"]:
            self._agents.pop(name, None)
            t = self._transports.pop(name, None)
            if t is not None:
                await t.close()
        for name in changes["changed"]:
            self._agents.pop(name, None)
            t = self._transports.pop(name, None)
            if t is not None and not self._ledger.state.jobs_on(name):
                await t.close()
        self._build_agents()
        if self.health is not None:
            self.health.set_nodes(self._agents, self._transports)
        await self.inventory()
        for name in (*changes["added"], *changes["changed"]):
            self.check_soon(name)

    # ---- GPU inventory --------------------------------------------------------------

    async def first_inventory(self) -> None:
        """Start-up's inventory: this machine's own GPUs are read before serving (no network:
        a submit then always sees them); other nodes get a moment (most answer in it, so
        a submit right after start sees their GPUs) and go on in the background."""
        self._inventory_task = asyncio.get_running_loop().create_task(
            self.inventory(local=False))
        local = asyncio.get_running_loop().create_task(self.inventory(local=True))
        await asyncio.wait({local}, timeout=LOCAL_INVENTORY_WAIT_S)
        await asyncio.wait({self._inventory_task}, timeout=INVENTORY_WAIT_S)
        if not local.done():  # a hung nvidia-smi here: it goes on in the background
            self._keep(local)

    async def inventory_known(self) -> None:
        """Wait, bounded, for the nodes' first GPU inventory if it is still going on.

        ugrod serves before slow nodes have answered; a GPU job checked before then
        would be refused as one that can never fit (and ``launch`` would count no GPU
        node), so submits in the first seconds wait for it, other requests do not.
        """
        task = self._inventory_task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=INVENTORY_SUBMIT_WAIT_S)

    async def inventory(self, local: bool | None = None) -> None:
        """Read each node's GPUs with nvidia-smi at first contact (a few seconds at most).

        ``local``: only the nodes on the local transport (True) or only the others (False).
        """
        names = [n for n in list(self._agents) if local is None or local == isinstance(
            self._transports.get(n), LocalTransport)]
        results = await asyncio.gather(*(self._inventory_one(n) for n in names))
        events = [e for e in results if e is not None]
        if events:
            await self._ledger.record(ev.DAEMON, *events)

    async def _inventory_one(self, name: str) -> ev.Event | None:
        node = self._ledger.state.nodes.get(name)
        transport = self._transports.get(name)
        if node is None or transport is None:
            return None
        return await inventory.read(node, transport)

    # ---- health, on demand ----------------------------------------------------------

    def check_soon(self, name: str) -> None:
        """Have the monitor probe ``name`` now, in the background: the log (and the
        planner) learn whether it answers before the next sweep."""
        if self.health is not None:
            self._keep(asyncio.get_running_loop().create_task(self.health.check_now(name)))

    def suspect(self, name: str, why: str) -> None:
        """Something other than a check (a launch) could not reach ``name``: it takes no
        new work until a check passes, and one runs now, in the background."""
        if self.health is not None:
            self._keep(asyncio.get_running_loop().create_task(self.health.suspect(name, why)))

    def node_view(self, name: str) -> Mapping[str, Any] | None:
        """What the monitor knows of a node now (None: not monitored)."""
        return self.health.view(name) if self.health is not None else None

    async def check_node(self, name: str, *, deep: bool) -> list[dict[str, Any]]:
        """``ugroctl health NODE [--deep]``: the checks, run now."""
        if self.health is None:
            raise Refused("unavailable", "health monitoring is not running")
        return await self.health.check(name, deep=deep)

    # ---- rendezvous -----------------------------------------------------------------

    def node_host(self, node: str) -> str:
        """The node's address ("" for a node not in the log)."""
        n = self._ledger.state.nodes.get(node)
        return n.spec.host if n is not None else ""

    def rendezvous_host(self, node: str) -> str:
        """cluster.master_ip when rank 0 is on the master node, else that node's address."""
        cluster = self.config.cluster
        spec = self._ledger.state.nodes[node].spec
        try:
            cfg = self.config.node(node)
        except KeyError:
            return spec.host
        if cluster.master_ip and (cfg.rank == 0 or cfg.role == "master"):
            return cluster.master_ip
        return spec.host

    def rendezvous_order(self, ranks: tuple[ev.RankPlacement, ...]
                         ) -> tuple[ev.RankPlacement, ...]:
        """Ranks renumbered by their nodes' sorted addresses (torchrun's c10d order)."""
        order = sorted(ranks, key=lambda r: (self.node_host(r.node), r.node))
        return tuple(msgspec.structs.replace(r, rank=i) for i, r in enumerate(order))

    async def with_port(self, job: Job, placement: ev.JobPlaced) -> ev.JobPlaced:
        """The placement with its rendezvous host, and a free port reserved on rank 0's node
        (torchrun jobs; callers own the deadline).

        torchrun's c10d rendezvous ranks the nodes by their sorted addresses and
        ignores --node_rank; ranks are renumbered in that order here, so node_rank,
        the global rank 0 (metrics, checkpoints) and the rendezvous host agree.
        """
        if job.spec.torchrun and len(placement.ranks) > 1:
            placement = msgspec.structs.replace(
                placement, ranks=self.rendezvous_order(placement.ranks))
        rank0 = next(r for r in placement.ranks if r.rank == 0)
        host = self.rendezvous_host(rank0.node)
        if not job.spec.torchrun:
            return msgspec.structs.replace(placement, rdzv_host=host)
        lo, hi = self.config.cluster.rdzv_port_range
        port = await self._agents[rank0.node].free_port(lo, hi)
        return msgspec.structs.replace(placement, rdzv_host=host, rdzv_port=port)

    # ---- host keys ------------------------------------------------------------------

    async def host_key(self, name: str) -> dict[str, Any]:
        """The key node ``name`` offers now, beside what known_hosts records for it."""
        return await host_keys.offered(name, self._ledger.state.nodes[name].spec,
                                       Path(self.config.cluster.known_hosts).expanduser())

    async def trust_host_key(self, name: str, line: str) -> dict[str, Any]:
        """Record the key ``line`` (as ``host_key`` showed it) and reconnect to the node."""
        current = await self.host_key(name)
        if current["line"] != line:
            raise Refused("conflict", f"node {name}'s host key changed while you were "
                          f"deciding; run `ugroctl nodes trust {name}` again")
        from ugrod.nodes.transport import ssh
        ssh.trust(Path(current["known_hosts"]), line)
        transport = self._transports.get(name)
        if isinstance(transport, ssh.SshTransport):
            await transport.close()
            transport.forget_failures()
        # Reconnect now, not at the next sweep: the answer says whether it worked, and the
        # log (hence `nodes`, `health` and the planner) knows before the command returns.
        if self.health is not None:
            await self.health.check_now(name)
        node = self._ledger.state.nodes.get(name)
        return {"node": name, "trusted": current["fingerprint"],
                "state": node.state.value if node is not None else None,
                "health_reason": node.health_reason if node is not None else ""}

    # ---- stopping -------------------------------------------------------------------

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop_tasks(self) -> None:
        """Cancel inventories and checks still going on."""
        pending = [*self._background, *([self._inventory_task] if self._inventory_task else [])]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        """Close every connection (ranks keep running: they outlive the daemon)."""
        for transport in [*self._transports.values(),
                          *(a.transport for a in self._account_agents.values())]:
            with contextlib.suppress(Exception):  # one failing close keeps no other open
                await transport.close()
