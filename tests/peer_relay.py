#!/usr/bin/env python3
"""Relay a Unix socket to another one, as whoever runs this: a second user's way in to ugrod.

ugrod learns who is calling from the connecting process (SO_PEERCRED), so a relay
running as user B makes every request that passes through it B's request. Tests
start it as the second local user ``ugro-other`` to drive a real client (the
dashboard) as that user on a box where the test's own Python is not readable by
other users. Standard library only (it runs under the system python3).

Usage: peer_relay.py LISTEN_PATH TARGET_PATH   (prints "ready" once listening)
"""

import contextlib
import os
import socket
import sys
import threading


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def serve(listen: str, target: str) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        srv.bind(listen)
    finally:
        os.umask(old)
    srv.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            up.connect(target)
        except OSError:
            conn.close()
            up.close()
            continue
        threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
        threading.Thread(target=pipe, args=(up, conn), daemon=True).start()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
