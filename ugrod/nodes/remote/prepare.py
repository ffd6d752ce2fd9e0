"""Readies a node for the rank wrapper: ``python3 -I -S -c TEXT WRAPPER_PATH DIR...``.

Makes the given directories (the work dir's .ugro and jobs/), then prints this
interpreter's real path (past any pyenv/conda shim, which would cost every wrapper call
another shell) and the installed wrapper's sha256, or "missing" (the head uploads it
when it differs). When the wrapper can run ranks as other users (root, or ugrod's
service account with CAP_SETUID/CAP_SETGID) the work dir and jobs/ are 0711: owners
reach their own run dirs (0700, theirs) and list nothing. Otherwise everything is 0700.
Standard library only.
"""

import hashlib
import os
import sys


def can_switch_users() -> bool:
    """Root, or both CAP_SETUID and CAP_SETGID in effect."""
    with open("/proc/self/status") as f:
        caps = [ln for ln in f if ln.startswith("CapEff:")]
    return os.geteuid() == 0 or bool(caps and int(caps[0].split()[1], 16) & 0xC0 == 0xC0)


def main(args: "list[str]") -> None:
    wrapper, dirs = args[0], args[1:]
    os.umask(0o077)
    switch = can_switch_users()
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o711 if switch and not d.endswith("/.ugro") else 0o700)
    os.chmod(os.path.dirname(dirs[0]), 0o711 if switch else 0o700)
    print(sys.executable)
    try:
        with open(wrapper, "rb") as f:
            print(hashlib.sha256(f.read()).hexdigest())
    except FileNotFoundError:
        print("missing")


if __name__ == "__main__":
    main(sys.argv[1:])
