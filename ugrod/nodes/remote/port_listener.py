"""A short-lived listener for the launch's reach check: ``python3 -c TEXT HOST PORT COUNT``.

Binds HOST:PORT (rank 0's rendezvous port), prints "ready", then accepts and closes up
to COUNT connections, one from each node of the job; 20 s without one ends it. A port
that cannot be bound ends it with a traceback and no "ready". Standard library only.
"""

import socket
import sys


def main(args: "list[str]") -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((args[0], int(args[1])))
    s.listen(64)
    s.settimeout(20)
    print("ready", flush=True)
    for _ in range(int(args[2])):
        try:
            c, _ = s.accept()
            c.close()
        except OSError:
            break


if __name__ == "__main__":
    main(sys.argv[1:])
