"""A node's SSH host key as it offers it now, beside what known_hosts records for it.

``ugroctl nodes trust NODE`` shows this and, once the person has compared the
fingerprint, records the line (``trust``); ugrod never accepts a key on its own.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ugrod.core import events as ev
from ugrod.core.commands import Refused
from ugrod.nodes.transport.base import TransportError

FETCH_TIMEOUT_S = 10.0


async def offered(name: str, spec: ev.NodeSpec, known_hosts: Path) -> dict[str, Any]:
    """The key ``name`` offers, its status (trusted, changed or new) and the keys known_hosts
    holds for it; Refused when it has no SSH transport or does not answer."""
    if spec.transport != "ssh":
        raise Refused("conflict", f"node {name} uses the local transport: no host key")
    from ugrod.nodes.transport import ssh  # asyncssh: loaded only when SSH is used
    try:
        key_type, fp, line = await ssh.fetch_host_key(spec.host, spec.port, FETCH_TIMEOUT_S)
    except TransportError as exc:
        raise Refused("unavailable", str(exc)) from None
    try:
        known = await asyncio.to_thread(ssh.recorded_keys, known_hosts, spec.host, spec.port)
    except TransportError as exc:
        raise Refused("unavailable", str(exc)) from None
    fingerprints = [k for _, k in known]
    status = "trusted" if fp in fingerprints else "changed" if known else "new"
    return {"node": name, "host": spec.host, "port": spec.port, "key_type": key_type,
            "fingerprint": fp, "line": line, "status": status,
            "known_fingerprint": ", ".join(f"{k} ({t})" for t, k in known) or None,
            "known_keys": [{"key_type": t, "fingerprint": k} for t, k in known],
            "known_hosts": str(known_hosts)}
