"""The lines a failure reason quotes: the worker's own, not torchrun's report about it."""

from __future__ import annotations

from ugrod.loops.ending import OOM_MARKERS, own_lines

# torchrun 2.x (--max_restarts=0) after its worker died of a CUDA out-of-memory error,
# as captured in a rank log (paths shortened).
TORCHRUN_OOM = """\
step 1/10 loss 0.5
Traceback (most recent call last):
  File "train.py", line 3, in <module>
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB
E1122 14:42:40.657000 27337 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] \
failed (exitcode: 1) local_rank: 0 (pid: 28764) of binary: /usr/bin/python3
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "<frozen runpy>", line 88, in _run_code
  File "/usr/lib/python3/site-packages/torch/distributed/run.py", line 1032, in <module>
    main()
  File "/usr/lib/python3/site-packages/torch/distributed/elastic/multiprocessing/errors/\
__init__.py", line 367, in wrapper
    return f(*args, **kwargs)
           ^^^^^^^^^^^^^^^^^^
  File "/usr/lib/python3/site-packages/torch/distributed/run.py", line 1028, in main
    run(args)
  File "/usr/lib/python3/site-packages/torch/distributed/run.py", line 1019, in run
    elastic_launch(
  File "/usr/lib/python3/site-packages/torch/distributed/launcher/api.py", line 194, in __call__
    return launch_agent(
           ^^^^^^^^^^^^^
  File "/usr/lib/python3/site-packages/torch/distributed/launcher/api.py", line 383, in \
launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
oom.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-22_14:42:40
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 28764)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
""".splitlines()


def test_torchrun_report_is_cut_and_the_worker_error_kept() -> None:
    assert own_lines(TORCHRUN_OOM) == TORCHRUN_OOM[:4]
    # the old 20-line tail held only torchrun's report: the OOM went unrecognised
    assert not any(m in line for line in TORCHRUN_OOM[-20:] for m in OOM_MARKERS)
    assert any(m in line for line in own_lines(TORCHRUN_OOM)[-20:] for m in OOM_MARKERS)


def test_plain_logs_are_left_alone() -> None:
    lines = ["step 3", "Traceback (most recent call last):", '  File "x.py", line 1',
             "ValueError: boom"]
    assert own_lines(lines) == lines
    assert own_lines([]) == []


def test_elastic_warnings_are_dropped_without_a_report() -> None:
    lines = ["W1122 12:00:00.000000 1 site-packages/torch/distributed/elastic/agent/server/"
             "api.py:700] Received Signals.SIGTERM death signal, shutting down workers",
             "step 7 loss 0.1"]
    assert own_lines(lines) == ["step 7 loss 0.1"]
