"""The framework integrations are importable and inert without UGRO, transformers,
lightning or torch; job specs and job files take the progress and stop settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ugrod.config import schema as cfgmod
from ugrod.core import jobspec

ROOT = Path(__file__).resolve().parents[2]

INERT = r"""
import sys
for name in ("transformers", "lightning", "torch", "pytorch_lightning"):
    sys.modules[name] = None  # import fails as if not installed
from types import SimpleNamespace as NS
from exporters import ugro_hf, ugro_lightning, ugro_torch, ugro_metrics
cb = ugro_hf.UgroCallback()
args = NS(output_dir="out", learning_rate=1e-3, num_train_epochs=1,
          per_device_train_batch_size=4, world_size=1, seed=0)
state = NS(is_world_process_zero=True, global_step=3, max_steps=10)
control = NS(should_save=False)
cb.on_train_begin(args, state, control, model=None)
cb.on_log(args, state, control, logs={"loss": 0.5, "train/acc": 0.25, "note": "x"})
cb.on_step_end(args, state, control)
cb.on_save(args, state, control)
log = ugro_lightning.UgroLogger()
log.log_metrics({"train/loss": 0.5}, step=3)
log.log_hyperparams({"lr": 0.1, "opt": {"name": "sgd"}})
trainer = NS(strategy=NS(reduce_boolean_decision=lambda d, all=False: d),
             default_root_dir=".", global_step=3, save_checkpoint=lambda p: print("SAVED", p))
ugro_lightning.UgroCallback().on_train_batch_end(trainer, None, None, None, 0)
print("should_save", control.should_save, "agree", ugro_torch.should_checkpoint())
print("torch imported", sys.modules.get("torch") is not None)
"""


def run(env: dict[str, str], where: Path) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("UGRO_")}
    script = where / "train.py"
    script.write_text(INERT)
    res = subprocess.run([sys.executable, str(script)], cwd=where, env={**base, **env,
                         "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_inert_outside_ugro_and_without_the_frameworks(tmp_path: Path) -> None:
    out = run({}, tmp_path)
    assert "should_save False agree False" in out and "SAVED" not in out
    assert "torch imported False" in out
    assert [p.name for p in tmp_path.iterdir()] == ["train.py"]  # nothing written


def test_without_the_frameworks_under_ugro_they_report_and_save_on_request(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "rank-0"
    run_dir.mkdir()
    (run_dir / "checkpoint.request").write_text("1\n")
    out = run({"UGRO_JOB_DIR": str(run_dir), "UGRO_METRICS_FILE": str(run_dir / "m.jsonl"),
               "UGRO_CHECKPOINT_DIR": str(tmp_path / "ck"), "RANK": "0"}, tmp_path)
    # one request: the Trainer callback saw it first; the Lightning callback saw no new one
    assert "should_save True" in out and "SAVED" not in out
    lines = [json.loads(x) for x in (run_dir / "m.jsonl").read_text().splitlines()]
    params = [x for x in lines if x.get("event") == "params"]
    assert params[0]["learning_rate"] == 1e-3 and len(params[0]["code_sha256"]) == 64
    assert params[1]["lr"] == 0.1 and params[1]["opt_name"] == "sgd"
    metrics = [x for x in lines if "event" not in x]
    assert metrics[0]["loss"] == 0.5 and metrics[0]["train_acc"] == 0.25
    assert "note" not in metrics[0]
    assert metrics[1]["train_loss"] == 0.5 and metrics[1]["step"] == 3
    (ck,) = [x for x in lines if x.get("event") == "checkpoint"]
    assert ck["path"].endswith("out/checkpoint-3") and ck["rank"] == 0


CONFIG = cfgmod.builtin("head")


def spec(**kw: object) -> object:
    return jobspec.build(jobspec.SubmitBody(argv=["train.py"], nodes=2, **kw), CONFIG, 2)


def test_progress_and_stop_settings_in_a_job_spec() -> None:
    s = spec(progress=["hf,kv"], progress_rank=1, loss_key="val/loss", stop_grace_s=30)
    assert s.progress.formats == ("hf", "kv") and s.progress.rank == 1  # type: ignore[attr-defined]
    assert s.progress.loss_key == "val/loss" and s.stop_grace_s == 30  # type: ignore[attr-defined]
    assert spec().progress is None  # type: ignore[attr-defined]
    assert spec(checkpoints="out/checkpoint-*").checkpoints == "out/checkpoint-*"  # type: ignore[attr-defined]
    assert spec(progress=["none"]).progress.formats == ()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("kw", "message"), [
    ({"progress": ["xml"]}, "unknown progress format 'xml'"),
    ({"progress_rank": 2}, "progress_rank must be a node rank of the job: 0..1"),
    ({"loss_key": "///"}, "loss_key '///' is not a metric name"),
    ({"stop_grace_s": 0.0}, "stop_grace_s must be 0.1 s .. 1 hour"),
    ({"stop_grace_s": 1e9}, "stop_grace_s must be 0.1 s .. 1 hour"),
    ({"checkpoints": "a\nb"}, "checkpoints must be one glob pattern"),
    ({"checkpoints": "x" * 2000}, "checkpoints must be one glob pattern"),
])
def test_bad_progress_or_stop_settings_are_refused(kw: dict[str, object], message: str) -> None:
    with pytest.raises(jobspec.SpecError, match=message.replace(".", r"\.")):
        spec(**kw)


def test_job_file_keys() -> None:
    from ugroctl import jobfile

    body = jobfile.parse("command: [train.py]\nprogress: [hf, tqdm]\nprogress_rank: 0\n"
                         "loss_key: train/loss\nstop_grace_s: 20\n", "job.yaml")
    assert body["progress"] == ["hf", "tqdm"] and body["loss_key"] == "train/loss"
    assert body["stop_grace_s"] == 20.0 and body["progress_rank"] == 0


HEARTBEAT = r"""
import sys
for name in ("transformers", "lightning", "torch", "pytorch_lightning"):
    sys.modules[name] = None
from types import SimpleNamespace as NS
from exporters import ugro_hf, ugro_lightning
state = NS(is_world_process_zero=False, global_step=7, max_steps=10)
ugro_hf.UgroCallback().on_step_end(NS(), state, NS(should_save=False))
trainer = NS(strategy=NS(reduce_boolean_decision=lambda d, all=False: d), is_global_zero=False,
             default_root_dir=".", global_step=8, save_checkpoint=lambda p: None)
ugro_lightning.UgroCallback().on_train_batch_end(trainer, None, None, None, 0)
"""


def test_on_other_ranks_the_integrations_write_a_heartbeat_of_the_step(tmp_path: Path) -> None:
    # The job's progress by each node's own path (ugrod/core/node_loss.py): rank 1's
    # callbacks report its step; at most one line a second.
    run_dir = tmp_path / "rank-1"
    run_dir.mkdir()
    script = tmp_path / "beat.py"
    script.write_text(HEARTBEAT)
    base = {k: v for k, v in os.environ.items() if not k.startswith("UGRO_")}
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={
                             **base, "PYTHONPATH": str(ROOT), "RANK": "1", "LOCAL_RANK": "0",
                             "UGRO_JOB_DIR": str(run_dir),
                             "UGRO_METRICS_FILE": str(run_dir / "m.jsonl")})
    assert res.returncode == 0, res.stderr
    (beat,) = [json.loads(x) for x in (run_dir / "m.jsonl").read_text().splitlines()]
    assert (beat["event"], beat["step"], beat["rank"]) == ("heartbeat", 7, 1)
