"""Example UGRO job: DDP training of a small MLP on generated data, with checkpoints and resume.

Run it any of these ways::

    python examples/train_ddp.py --steps 50                       # one process, no torchrun
    torchrun --nnodes=1 --nproc_per_node=2 examples/train_ddp.py --steps 50
    ugroctl submit --name demo --nodes 2 --torchrun -- examples/train_ddp.py --steps 400

Backend: nccl when CUDA is available (one GPU per local rank), gloo on CPU.
Every rank builds the same data and model from ``--seed``; a DistributedSampler
gives each rank its share, so the loss falls the same way on every run.

UGRO integration, through ``ugro_metrics`` (a no-op outside UGRO):

* ``step``, ``loss`` (mean over the last ``--log-every`` steps and all ranks),
  ``throughput`` (samples/s, all ranks) and ``lr`` are reported every
  ``--log-every`` steps and at the last step.
* Rank 0 saves ``step-000400.pt`` (model, optimizer, step, args) into
  ``--checkpoint-dir`` (default ``$UGRO_CHECKPOINT_DIR``) every
  ``--checkpoint-every`` steps, at the last step, and when UGRO asks
  (``ugroctl checkpoint``): written to a temp file, fsynced, renamed.
* Resume order: ``--resume PATH``, else ``$UGRO_RESUME_FROM``, else with
  ``--resume-latest`` the newest ``step-*.pt`` in the checkpoint directory.
  Only rank 0 reads the file (it may exist only on rank 0's node) and
  broadcasts it; the run then continues with the next step and prints
  ``resumed from step N``. A checkpoint of step N holds the state after N
  optimizer steps.

Fault injection for tests: ``--fail-at-step N`` exits 1 on ``--fail-rank``
when step N is reached, before it runs (steps 1..N-1 are done);
``--hang-at-step N`` makes every rank stop there and sleep until killed;
with ``--fail-once`` both happen only on the first attempt (``UGRO_ATTEMPT``
unset or 1). ``--sleep-per-step`` slows each step down.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

CHECKPOINT_NAME = re.compile(r"step-(\d+)\.pt\Z")


def _load_ugro_metrics() -> ModuleType:
    """The helper from the installed package, else a copy beside this script (or in the repo)."""
    try:
        from exporters import ugro_metrics

        return ugro_metrics
    except ImportError:
        pass
    here = Path(__file__).resolve().parent
    for candidate in (here / "ugro_metrics.py", here.parent / "exporters" / "ugro_metrics.py"):
        if candidate.is_file():
            spec = importlib.util.spec_from_file_location("ugro_metrics", candidate)
            if spec is not None and spec.loader is not None:
                module = importlib.util.module_from_spec(spec)
                sys.modules["ugro_metrics"] = module
                spec.loader.exec_module(module)
                return module
    sys.exit(
        "train_ddp.py: cannot import ugro_metrics: install ugro, or copy "
        "exporters/ugro_metrics.py next to this script"
    )


ugro_metrics = _load_ugro_metrics()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=32, help="samples per rank per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=64, help="MLP hidden width")
    p.add_argument("--samples", type=int, default=4096, help="size of the generated data set")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-every", type=int, default=1, help="report metrics every N steps")
    p.add_argument("--checkpoint-every", type=int, default=100, help="0: only at the end")
    p.add_argument("--checkpoint-dir", type=Path, default=ugro_metrics.checkpoint_dir())
    p.add_argument("--resume", type=Path, default=None, help="checkpoint file to resume from")
    p.add_argument("--resume-latest", action="store_true", help="resume from the newest one")
    p.add_argument("--sleep-per-step", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--fail-at-step", type=int, default=None, metavar="N")
    p.add_argument("--fail-rank", type=int, default=0)
    p.add_argument("--fail-once", action="store_true", help="inject faults on attempt 1 only")
    p.add_argument("--hang-at-step", type=int, default=None, metavar="N")
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None)
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS")
    args = p.parse_args(argv)
    if args.steps < 0 or args.batch_size < 1 or args.log_every < 1 or args.checkpoint_every < 0:
        p.error("--steps >= 0, --batch-size >= 1, --log-every >= 1, --checkpoint-every >= 0")
    return args


class Dist:
    """Rank, world and device; a world of one when not started by torchrun."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.enabled = "RANK" in os.environ and "LOCAL_RANK" in os.environ
        self.rank = int(os.environ.get("RANK", "0")) if self.enabled else 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.enabled else 0
        self.world = int(os.environ.get("WORLD_SIZE", "1")) if self.enabled else 1
        cuda = torch.cuda.is_available()
        self.backend = args.backend or ("nccl" if cuda else "gloo")
        if self.backend == "nccl":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.enabled:
            dist.init_process_group(self.backend, timeout=timedelta(seconds=args.dist_timeout))

    def mean(self, value: float) -> float:
        """The mean of value over all ranks (a collective: every rank must call it)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's obj on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def exit(self, code: int) -> NoReturn:
        """Leave the process group and end the process with code."""
        if self.enabled:
            dist.barrier()  # everyone waits for rank 0's last checkpoint
            dist.destroy_process_group()
            # Skip interpreter finalization: a gloo worker thread may still be
            # dropping the last collective's tensors, which needs the GIL, and
            # doing that during finalization aborts the process ("terminate
            # called without an active exception", SIGABRT; seen here about
            # once in 15 runs; pytorch/pytorch#179291).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        sys.exit(code)


def say(d: Dist, *parts: object) -> None:
    if d.rank == 0:
        print(*parts, flush=True)


def make_data(args: argparse.Namespace) -> TensorDataset:
    """A fixed nonlinear regression problem: y = x·w + 0.5·tanh(x·v) + noise."""
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.samples, 16, generator=g)
    w, v = torch.randn(16, 1, generator=g), torch.randn(16, 1, generator=g)
    y = x @ w + 0.5 * torch.tanh(x @ v) + 0.05 * torch.randn(args.samples, 1, generator=g)
    return TensorDataset(x, y)


def newest_checkpoint(directory: Path | None) -> Path | None:
    if directory is None or not directory.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := CHECKPOINT_NAME.match(p.name)) and p.is_file()
    ]
    return max(found)[1] if found else None


def load_resume_state(args: argparse.Namespace, d: Dist) -> dict[str, Any] | None:
    """Rank 0 reads the checkpoint to resume from, if any, and every rank gets it."""
    state: dict[str, Any] | None = None
    error: str | None = None
    if d.rank == 0:
        path = args.resume or ugro_metrics.resume_from()
        if path is None and args.resume_latest:
            path = newest_checkpoint(args.checkpoint_dir)
        if path is not None:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                state["path"] = str(path)
            except (OSError, RuntimeError, ValueError) as exc:
                error = f"cannot resume from {path}: {exc}"
    error, state = d.broadcast((error, state))
    if error:
        print(f"train_ddp.py: {error}", file=sys.stderr, flush=True)
        d.exit(1)
    return state


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    args: argparse.Namespace,
) -> Path:
    """Write step-NNNNNN.pt atomically: temp file, fsync, rename, fsync the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:06d}.pt"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    ugro_metrics.saved_checkpoint(final, step)
    return final


def main(argv: list[str] | None = None) -> NoReturn:
    args = parse_args(argv)
    torch.set_num_threads(1)
    d = Dist(args)
    faults_armed = not args.fail_once or ugro_metrics.attempt() == 1

    torch.manual_seed(args.seed)
    data = make_data(args)
    core = nn.Sequential(nn.Linear(16, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 1))
    core.to(d.device)
    opt = torch.optim.Adam(core.parameters(), lr=args.lr)
    step = 0
    resumed = load_resume_state(args, d)
    if resumed is not None:
        core.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        step = int(resumed["step"])
        say(d, f"resumed from step {step} ({resumed['path']})")
    model: nn.Module = core
    if d.enabled:
        on_gpu = d.device.type == "cuda"
        model = DistributedDataParallel(core, device_ids=[d.local_rank] if on_gpu else None)

    sampler: DistributedSampler[int] = DistributedSampler(
        data, num_replicas=d.world, rank=d.rank, shuffle=True, seed=args.seed, drop_last=True
    )
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    per_epoch = len(loader)
    if per_epoch == 0:
        say(d, "train_ddp.py: --samples too small for --batch-size x world size")
        d.exit(2)
    loss_fn = nn.MSELoss()
    say(
        d,
        f"training: world {d.world}, backend {d.backend}, {per_epoch} steps/epoch, "
        f"steps {step + 1}..{args.steps}",
    )

    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    loss_value = float("nan")
    while step < args.steps:
        epoch, skip = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        # after a resume, skip the batches this epoch already saw
        for x, y in itertools.islice(loader, skip, None):
            next_step = step + 1
            if faults_armed and next_step == args.fail_at_step and d.rank == args.fail_rank:
                print(
                    f"train_ddp.py: failing at step {next_step} as asked (--fail-at-step)",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)  # no clean shutdown: like a crash, peers see a dead rank
            if faults_armed and next_step == args.hang_at_step:
                print(
                    f"train_ddp.py: rank {d.rank} hanging at step {next_step} as asked "
                    "(--hang-at-step)",
                    file=sys.stderr,
                    flush=True,
                )
                while True:
                    time.sleep(3600)
            x, y = x.to(d.device), y.to(d.device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            step = next_step
            window_loss += float(loss.item())
            window_steps += 1
            if args.sleep_per_step > 0:
                time.sleep(args.sleep_per_step)

            if step % args.log_every == 0 or step == args.steps:
                loss_value = d.mean(window_loss / window_steps)
                elapsed = time.perf_counter() - window_start
                throughput = window_steps * args.batch_size * d.world / max(elapsed, 1e-9)
                ugro_metrics.report(step=step, loss=loss_value, throughput=throughput, lr=args.lr)
                say(
                    d,
                    f"step {step}/{args.steps} loss {loss_value:.5f} "
                    f"throughput {throughput:.1f} samples/s",
                )
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()

            # every rank calls it (installs the SIGUSR1 handler); only rank 0 gets True
            asked = ugro_metrics.checkpoint_requested()
            if d.rank == 0 and args.checkpoint_dir is not None:
                due = args.checkpoint_every > 0 and step % args.checkpoint_every == 0
                if due or asked or step == args.steps:
                    path = save_checkpoint(args.checkpoint_dir, step, core, opt, args)
                    say(d, f"checkpoint {path}" + (" (requested)" if asked else ""))
            elif asked:
                say(d, "checkpoint requested, but there is no --checkpoint-dir")
            if step >= args.steps:
                break

    say(d, f"done: {step} steps, final loss {loss_value:.5f}")
    d.exit(0)


if __name__ == "__main__":
    main()
