"""Trust, played by two real users against a real ugrod: jobs run as their owners, nobody
reaches what is not theirs, and a rank's processes cannot outlive it.

The second user, ``ugro-other``, is created by scripts/test.sh (the tests run as root).
Its commands run through ``setpriv`` with one extra capability, CAP_DAC_READ_SEARCH,
only because this machine's Python lives under root's 0700 home: it reads files, it
grants nothing on ugrod's socket (the peer's uid is what ugrod checks).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Ugrod, _kill_leftovers, served

OTHER = "ugro-other"
PY = sys.executable
AS_OTHER = ["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", "--init-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"]
SECRET = "hunter2-s3cret"

# A stdlib-only HTTP client over the Unix socket (a job runs the system's python3).
CLIENT = """\
import http.client, json, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(sys.argv[1])
for spec in sys.argv[2:]:
    method, path = spec.split(" ", 1)
    c = C("localhost", timeout=10)
    c.request(method, path, body=b"{}" if method == "POST" else None)
    r = c.getresponse()
    if "follow" in path:  # the live stream: read it up to the job's start
        body = b""
        while b"job_running" not in body:
            body += r.readline()
    else:
        body = r.read()
    print(json.dumps({"req": spec, "status": r.status, "body": body.decode(errors="replace")}))
    sys.stdout.flush()
"""


def other() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(OTHER)
    except KeyError:
        raise AssertionError(f"no user {OTHER}: run scripts/test.sh, which creates it") \
            from None


def as_other(d: Ugrod, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = d.env | {"HOME": other().pw_dir, "USER": OTHER, "LOGNAME": OTHER}
    return subprocess.run([*AS_OTHER, *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd="/")


def ctl_other(d: Ugrod, *args: str) -> subprocess.CompletedProcess[str]:
    return as_other(d, PY, "-m", "ugroctl.cli", *args)


def api_other(d: Ugrod, *requests: str) -> list[dict[str, object]]:
    res = as_other(d, PY, "-c", CLIENT, str(d.socket), *requests)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def wait_for(check, timeout_s: float = 20.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout_s} s")


def trust_config(base: Path, *, cgroups: bool = True) -> Path:
    cfg = base / "cluster.yaml"
    cfg.write_text(f"""cluster:
  socket_group: {OTHER}
  cgroups: {"true" if cgroups else "false"}
nodes:
  head:
    transport: local
    work_dir: {base}/work
metrics:
  enabled: false
""")
    return cfg


@pytest.fixture
def root_ugrod(short_tmp: Path) -> Iterator[Ugrod]:
    """A root ugrod whose socket ugro-other may use (socket_group) and reach (0711 dirs)."""
    other()
    short_tmp.chmod(0o711)
    with served(Ugrod(short_tmp, config=trust_config(short_tmp)), short_tmp) as d:
        yield d


def test_a_root_ugrod_runs_the_job_as_its_owner_with_a_clean_environment(
        root_ugrod: Ugrod) -> None:
    d, pw = root_ugrod, other()
    res = ctl_other(d, "submit", "--name", "mine", "--env", f"TOKEN={SECRET}", "--",
                    "sh", "-c", "id -u; id -g; echo HOME=$HOME USER=$USER LOGNAME=$LOGNAME; "
                    "echo PATH=$PATH; env; umask")
    assert res.returncode == 0, res.stderr
    job = d.wait_job("mine")
    assert job["state"] == "succeeded" and job["owner"] == OTHER, job["reason"]
    log = ctl_other(d, "logs", "mine")
    assert log.returncode == 0, log.stderr
    lines = log.stdout.splitlines()
    assert lines[0] == str(pw.pw_uid) and lines[1] == str(pw.pw_gid)  # not root's 0
    assert f"HOME={pw.pw_dir} USER={OTHER} LOGNAME={OTHER}" in lines
    assert f"TOKEN={SECRET}" in lines and lines[-1] == "0077"
    leaked = [ln for ln in lines if ln.split("=")[0] in ("UGRO_SOCKET", "UGRO_STATE_DIR",
                                                         "PYTHONPATH", "UGRO_CONFIG")]
    assert not leaked, leaked  # ugrod's own environment stays ugrod's
    # Files: the state dir is 0700, the socket 0660 with the configured group, the
    # central job dir 0700, and the rank's run dir on the node is the owner's, 0700.
    assert stat.S_IMODE(d.state_dir.stat().st_mode) == 0o700
    sock = d.socket.stat()
    assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_gid == grp.getgrnam(OTHER).gr_gid
    central = d.state_dir / "jobs" / "mine"
    assert stat.S_IMODE(central.stat().st_mode) == 0o700
    assert stat.S_IMODE((central / "rank_0.log").stat().st_mode) == 0o600
    run_dir = d.base / "work" / "jobs" / "mine" / "attempt-1" / "rank-0"
    st = run_dir.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (pw.pw_uid, 0o700)
    for f in ("spec.json", "rank.log", "pid", "exit_code"):
        fst = (run_dir / f).stat()
        assert (fst.st_uid, stat.S_IMODE(fst.st_mode)) == (pw.pw_uid, 0o600), f


def test_another_user_cannot_change_roots_job_drain_nodes_or_read_its_secrets(
        root_ugrod: Ugrod) -> None:
    d = root_ugrod
    # ugro-other follows the event stream from now on: the job's events come live (or, if
    # it connects late, in the history part; both are redacted the same way).
    seq = d.api("GET", "/v1/ping")[1]["seq"]
    follower = subprocess.Popen(
        [*AS_OTHER, PY, "-c", CLIENT, str(d.socket), f"GET /v1/events?follow=1&after={seq}"],
        env=d.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    d.ctl("submit", "--name", "rootjob", "--env", f"DB_PASSWORD={SECRET}", "--", "sh", "-c",
          "echo log-$DB_PASSWORD; exec sleep 300", check=True)
    d.wait_job("rootjob", ("running",))
    live, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    streamed = json.loads(live)
    assert streamed["status"] == 200 and '"job_submitted"' in streamed["body"], streamed
    assert '"DB_PASSWORD":"<redacted>"' in streamed["body"] and SECRET not in live
    assert SECRET in d.ctl("status", "--json", "rootjob", check=True).stdout  # root sees it
    wait_for(lambda: SECRET in d.ctl("logs", "rootjob").stdout, what="root's log line")

    cancel = ctl_other(d, "cancel", "rootjob")
    assert cancel.returncode != 0 and "may cancel job rootjob" in cancel.stderr, cancel.stderr
    drain = ctl_other(d, "drain", "head")
    assert drain.returncode != 0 and "only root may drain nodes" in drain.stderr, drain.stderr
    assert d.api("GET", "/v1/jobs/rootjob")[1]["job"]["state"] == "running"
    assert d.api("GET", "/v1/nodes")[1]["nodes"][0]["drained"] is False

    for args in (("status", "--json", "rootjob"), ("status", "--json"), ("why", "--json",
                 "rootjob"), ("events", "--json"), ("events", "--json", "--job", "rootjob"),
                 ("queue", "--json")):
        res = ctl_other(d, *args)
        assert res.returncode == 0, (args, res.stderr)
        assert SECRET not in res.stdout, args
    shown = json.loads(ctl_other(d, "status", "--json", "rootjob").stdout)
    assert shown["spec"]["env"] == {"DB_PASSWORD": "<redacted>"}  # the key, not the value
    for args in (("logs", "rootjob"), ("results", "rootjob")):
        res = ctl_other(d, *args)
        assert res.returncode != 0 and SECRET not in res.stdout + res.stderr, args
        assert "only root (the owner)" in res.stderr, res.stderr
    answers = api_other(d, "GET /v1/jobs", "GET /v1/jobs/rootjob", "GET /v1/events",
                        "GET /v1/jobs/rootjob/why", "GET /v1/jobs/rootjob/logs",
                        "GET /v1/jobs/rootjob/results", "GET /v1/events?follow=1")
    assert [a["status"] for a in answers] == [200, 200, 200, 200, 403, 403, 200]
    assert all(SECRET not in str(a["body"]) for a in answers)
    assert "DB_PASSWORD" in str(answers[-1]["body"])  # the stream shows the key only
    d.ctl("cancel", "rootjob", check=True)
    assert d.wait_job("rootjob")["state"] == "cancelled"


def test_a_job_that_calls_the_socket_acts_as_its_owner_not_as_ugrod(root_ugrod: Ugrod) -> None:
    d = root_ugrod
    d.ctl("submit", "--name", "victim", "--", "sleep", "300", check=True)
    d.wait_job("victim", ("running",))
    res = ctl_other(d, "submit", "--name", "attacker", "--", "python3", "-c", CLIENT,
                    str(d.socket), "POST /v1/jobs/victim/cancel", "POST /v1/nodes/head/drain",
                    "POST /v1/reload")
    assert res.returncode == 0, res.stderr
    assert d.wait_job("attacker")["state"] == "succeeded"
    answers = [json.loads(line) for line in d.ctl("logs", "attacker", check=True)
               .stdout.splitlines()]
    assert [a["status"] for a in answers] == [403, 403, 403], answers
    assert d.api("GET", "/v1/jobs/victim")[1]["job"]["state"] == "running"
    assert d.api("GET", "/v1/nodes")[1]["nodes"][0]["drained"] is False
    events = d.ctl_json("events", "--job", "victim")
    events = events["events"] if isinstance(events, dict) else events
    assert [e for e in events if e["type"] in ("job_stopping", "job_cancel_requested")] == []
    d.ctl("cancel", "victim", check=True)


def test_a_development_ugrod_admits_only_its_own_user(short_tmp: Path) -> None:
    pw = other()
    short_tmp.chmod(0o711)
    base = short_tmp / "dev"
    base.mkdir()
    os.chown(base, pw.pw_uid, pw.pw_gid)
    d = Ugrod(base)
    argv = [*AS_OTHER, PY, "-m", "ugrod.cli", "--log-level", "info"]
    env = d.env | {"HOME": pw.pw_dir, "USER": OTHER, "LOGNAME": OTHER}
    d._err = open(d.stderr_path, "ab")  # noqa: SIM115
    d.proc = subprocess.Popen(argv, env=env, stdout=d._err, stderr=d._err, cwd="/")
    try:
        wait_for(lambda: d.socket.exists() and ctl_other(d, "status").returncode == 0,
                 what="the development ugrod answering its user")
        assert "development mode" in d.log()
        os.chmod(d.socket, 0o666)  # even when the file lets everyone connect
        res = d.ctl("status")
        assert res.returncode != 0
        assert "runs as ugro-other in development mode" in res.stderr, res.stderr
        assert "accepts only ugro-other, not root" in res.stderr, res.stderr
        res = ctl_other(d, "submit", "--name", "dev1", "--wait", "--", "sh", "-c", "id -u")
        assert res.returncode == 0, res.stderr
        assert ctl_other(d, "logs", "dev1").stdout == f"{pw.pw_uid}\n"
    finally:
        d.stop()


@pytest.mark.parametrize("cgroups", [True, False], ids=["cgroup", "subreaper"])
def test_processes_cannot_escape_their_rank(short_tmp: Path, cgroups: bool) -> None:
    d = Ugrod(short_tmp, config=trust_config(short_tmp, cgroups=cgroups))
    d.start()
    try:
        # The main process exits at once; the sleep it started must not survive it.
        d.ctl("submit", "--name", "bg", "--", "sh", "-c", "sleep 1013 & exit 0", check=True)
        job = d.wait_job("bg")
        assert job["state"] == "succeeded", job
        assert "rank 0 left 1 process" in job["reason"] and "killed" in job["reason"], job
        assert not _cmdline_pids(b"sleep\x001013")
        # A grandchild in its own session with an empty environment: gone after cancel.
        d.ctl("submit", "--name", "esc", "--", "sh", "-c",
              "setsid env -i sleep 1017 & exec sleep 300", check=True)
        d.wait_job("esc", ("running",))
        escaped = wait_for(lambda: _cmdline_pids(b"sleep\x001017"), what="the grandchild")
        assert os.getsid(escaped[0]) == escaped[0]  # its own session, no UGRO_* in its env
        assert b"UGRO" not in Path(f"/proc/{escaped[0]}/environ").read_bytes()
        d.ctl("cancel", "esc", check=True)
        assert d.wait_job("esc")["state"] == "cancelled"
        assert not _cmdline_pids(b"sleep\x001017")
        cg = d.base / "work" / "jobs" / "esc" / "attempt-1" / "rank-0" / "cgroup"
        assert bool(cg.read_text().strip()) is cgroups
    finally:
        d.stop()
        _kill_leftovers(short_tmp)


def _cmdline_pids(needle: bytes) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmd = Path(f"/proc/{name}/cmdline").read_bytes()
                state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if needle in cmd and state != "Z":
                found.append(int(name))
    return found


def test_a_service_ugrod_with_setuid_setgid_runs_jobs_as_their_owners(short_tmp: Path) -> None:
    """ugrod as a service account holding CAP_SETUID+CAP_SETGID (as systemd/ugrod.service
    gives it): jobs run as their owners with no capability left, and the account itself
    has no rights on the socket."""
    pw, svc = other(), pwd.getpwnam("ugro-svc")
    short_tmp.chmod(0o711)
    base = short_tmp / "svc"
    base.mkdir(mode=0o711)
    base.chmod(0o711)  # owners pass through to the work dir, whatever the umask
    os.chown(base, svc.pw_uid, svc.pw_gid)
    cfg = trust_config(base)
    d = Ugrod(base, config=cfg)
    caps = "+setuid,+setgid,+dac_read_search"
    # A member of the socket's group (systemd: SupplementaryGroups=), as it must be to
    # give the socket to that group.
    argv = ["setpriv", "--reuid=ugro-svc", "--regid=ugro-svc",
            f"--groups={svc.pw_gid},{grp.getgrnam(OTHER).gr_gid}",
            f"--inh-caps={caps}", f"--ambient-caps={caps}", "--",
            PY, "-m", "ugrod.cli", "--config", str(cfg), "--grace", "3"]
    d._err = open(d.stderr_path, "ab")  # noqa: SIM115
    d.proc = subprocess.Popen(argv, env=d.env | {"HOME": "/"}, stdout=d._err,
                              stderr=d._err, cwd="/")
    try:
        wait_for(lambda: d.socket.exists() and d.ctl("status").returncode == 0,
                 what="the service ugrod answering")
        assert "service mode" in d.log()
        res = ctl_other(d, "submit", "--name", "svc1", "--wait", "--", "sh", "-c",
                        "id -u; grep -E '^Cap(Inh|Prm|Eff|Amb)' /proc/self/status; "
                        "sleep 1019 & exit 0")
        assert res.returncode == 0, (res.stderr + d.ctl("--json", "status", "svc1").stdout
                                     + d.log())
        lines = ctl_other(d, "logs", "svc1").stdout.splitlines()
        assert lines[0] == str(pw.pw_uid)
        assert [ln.split()[1] for ln in lines[1:5]] == ["0000000000000000"] * 4, lines
        job = d.ctl_json("status", "svc1")
        assert "rank 0 left 1 process" in job["reason"]  # its supervisor is a subreaper
        assert not _cmdline_pids(b"sleep\x001019")
        own = subprocess.run(["setpriv", "--reuid=ugro-svc", "--regid=ugro-svc",
                              "--init-groups", f"--inh-caps={caps}", f"--ambient-caps={caps}",
                              "--", PY, "-m", "ugroctl.cli", "status"], env=d.env,
                             capture_output=True, text=True, timeout=60, cwd="/")
        assert own.returncode != 0 and "service account" in own.stderr, own.stderr
    finally:
        d.stop()
        _kill_leftovers(short_tmp)


def test_check_config_reports_a_bad_users_mapping(short_tmp: Path) -> None:
    cfg = short_tmp / "cluster.yaml"
    cfg.write_text("nodes:\n  gpu1: {ip: 10.0.0.1, user: shared}\n"
                   "users:\n  alice: {nodes: {gpu2: {user: alice}}, identity_file: /k}\n")
    res = subprocess.run([PY, "-m", "ugrod.cli", "--check-config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert (f"{cfg}: users.alice.nodes.gpu2: no node named 'gpu2'; did you mean 'gpu1'?"
            in res.stderr), res.stderr
    assert f"{cfg}: users.alice: missing 'user'" in res.stderr, res.stderr


def test_ssh_jobs_run_as_the_account_mapped_to_their_owner_in_private_files(
        short_tmp: Path) -> None:
    """users: maps ugro-other to its own account on a real sshd node; root's jobs use the
    node's (shared) user. The node's files are 0600 in 0700 directories."""
    from tests.sshd_nodes import start_sshd_nodes

    pw = other()
    short_tmp.chmod(0o711)
    root = short_tmp / "sshd"  # sshd reads authorized_keys as the user logging in
    cluster = start_sshd_nodes(root, count=1)
    try:
        root.chmod(0o711)
        (root / "authorized_keys").chmod(0o644)
        node = cluster[0]
        work = f"~/ugro-t{os.getpid()}"
        cfg = short_tmp / "cluster.yaml"
        cfg.write_text(f"""cluster:
  socket_group: {OTHER}
  known_hosts: {cluster.known_hosts}
nodes:
  n0:
    host: {node.host}
    port: {node.port}
    user: root
    identity_file: {cluster.identity}
    work_dir: {work}
    gpus: []
users:
  {OTHER}:
    user: {OTHER}
metrics:
  enabled: false
""")
        d = Ugrod(short_tmp, config=cfg)
        d.start()
        try:
            res = ctl_other(d, "submit", "--name", "theirs", "--env",
                            f"HF_TOKEN={SECRET}", "--", "sh", "-c", "id -u; echo $HOME")
            assert res.returncode == 0, res.stderr
            job = d.wait_job("theirs", timeout_s=60)
            assert job["state"] == "succeeded", job["reason"] + d.log()
            assert ctl_other(d, "logs", "theirs").stdout == f"{pw.pw_uid}\n{pw.pw_dir}\n"
            d.ctl("submit", "--name", "mine", "--wait", "--", "id", "-u", check=True)
            assert d.ctl("logs", "mine", check=True).stdout == "0\n"  # the node's user
            # An owner with no mapping would run as the node's user, root: refused.
            unmapped = subprocess.run(
                ["setpriv", "--reuid=ugro-svc", "--regid=ugro-svc",
                 f"--groups={grp.getgrnam(OTHER).gr_gid}", "--inh-caps=+dac_read_search",
                 "--ambient-caps=+dac_read_search", "--", PY, "-m", "ugroctl.cli", "submit",
                 "--name", "unmapped", "--wait", "--", "true"],
                env=d.env, capture_output=True, text=True, timeout=60, cwd="/")
            assert unmapped.returncode != 0
            assert "ugro-svc's job would run as root there" in unmapped.stdout + \
                unmapped.stderr, unmapped.stdout + unmapped.stderr
            base = Path(pw.pw_dir) / work[2:]
            rank = base / "jobs" / "theirs" / "attempt-1" / "rank-0"
            for path in (base, base / ".ugro", base / "jobs", base / "jobs" / "theirs",
                         rank.parent, rank):
                st = path.stat()
                assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (pw.pw_uid, 0o700), path
            assert SECRET in (rank / "spec.json").read_text()
            for f in [base / ".ugro" / "rank_wrapper.py", *rank.iterdir()]:
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        finally:
            d.stop()
    finally:
        cluster.close()
        for home in (pw.pw_dir, "/root"):
            subprocess.run(["rm", "-rf", "--", f"{home}/{work[2:]}"], check=False)
