"""sd_notify(3) in a few lines of stdlib: tell systemd ugrod is ready, reloading or stopping.

``Type=notify`` units wait for ``READY=1`` on the datagram socket named by
``$NOTIFY_SOCKET``; ugrod sends it once its control socket listens, so
``systemctl start ugrod`` returns only when ``ugroctl`` can connect. Outside
systemd (no ``NOTIFY_SOCKET``) every call is a no-op returning False.
"""

from __future__ import annotations

import os
import socket


def notify(*fields: str, env: dict[str, str] | None = None) -> bool:
    """Send ``KEY=VALUE`` lines to systemd; True if sent, False when not under systemd.

    Raises OSError if the socket is named but cannot be reached (a broken
    unit setup worth seeing, not hiding).
    """
    environ = os.environ if env is None else env
    address = environ.get("NOTIFY_SOCKET", "")
    if not address or not fields:
        return False
    if address[0] == "@":  # abstract namespace socket
        address = "\0" + address[1:]
    elif address[0] != "/":
        raise OSError(f"NOTIFY_SOCKET {address!r} is neither a path nor an abstract socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall("\n".join(fields).encode())
    return True


def notify_ready(status: str = "") -> bool:
    """READY=1 (call once the control socket listens)."""
    return notify("READY=1", f"MAINPID={os.getpid()}",
                  *([f"STATUS={status}"] if status else []))


def notify_reloading() -> bool:
    """RELOADING=1 at the start of a SIGHUP reload; follow with ``notify_ready()``."""
    return notify("RELOADING=1")


def notify_stopping() -> bool:
    """STOPPING=1 when a clean shutdown starts."""
    return notify("STOPPING=1")


def notify_status(text: str) -> bool:
    """A one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={text}")
