"""Running one stage as one of several processes (several GPUs, several CPU processes, several machines).

Design
------
`hat train RECIPE --nproc-per-node N` re-runs itself through torch's elastic launcher
(`python -m torch.distributed.run ... -m hatcli train RECIPE ...`, which is what `torchrun` does):
N worker processes per machine, each a complete `hat train` that finds the launcher's environment
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) and joins one process group
(`init_from_env`): NCCL on GPUs, gloo on CPU. The launcher runs as a subprocess, so a crashing
worker takes the launcher down, never the `hat` process that reports the failure.

Every rank computes; rank 0 alone writes logs, metrics files and checkpoints (`is_main`), and the
others wait for it at a `barrier` where a file must exist before they read it. Data is sharded per
rank (so `data.batch_size` is per process), gradients are averaged by DistributedDataParallel and
evaluation counts are summed with `all_reduce_sum`, so every rank reports the same metrics.

Calibration is where plain data parallelism is not enough: each rank's observers see only its own
shard, so each would end with its own activation ranges and its own scales, and the checkpoint
would hold rank 0's. `sync_observers` all-reduces the observed ranges (MIN of the minimums, MAX of
the maximums) and the clipping observers' threshold sums and counts (SUM), and recomputes the
fake-quant scales, so every rank holds exactly the scales one
process would have computed from all the batches. (HAT cannot calibrate under DDP; this is what
it lacks.)

Every helper here is a no-op in a single process, so callers need no `if distributed:`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from hatcli.errors import HatError, UsageError

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""Variables the launcher sets in every worker; all must be present to join a process group."""

STATUS_DIR_ENV = "HAT_LAUNCH_STATUS_DIR"
"""Set by `launch` for its workers: each writes `rank-<RANK>` holding its exit code there
(`hatcli.__main__`, which the launcher runs)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank, the number of processes, its rank on this machine."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1


SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, backend=None)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched() -> bool:
    """Whether this process was started by the launcher as one of several workers."""
    return all(name in os.environ for name in LAUNCH_ENV) and _env_int("WORLD_SIZE", 1) > 1


def backend_for(device: str = "auto") -> str:
    """The process-group backend for `device`: nccl when it is a GPU, else gloo."""
    if not device.startswith("cpu") and torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the launcher's process group if this process is a launched worker; idempotent.

    `device` is the recipe's (`auto`, `cpu`, `cuda`): NCCL (with this process bound to GPU
    `LOCAL_RANK`) when CUDA is there and the device is not `cpu`, else gloo. Outside a launch
    (no `WORLD_SIZE` > 1 with `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) nothing
    happens and the single-process `DistInfo(0, 1, 0, None)` comes back.
    """
    if _initialized():
        return current()
    if not launched():
        return SINGLE
    if not dist.is_available():
        raise HatError("this torch build has no torch.distributed; run with --nproc-per-node 1")
    rank, world_size, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    backend = backend_for(device)
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise HatError(f"local rank {local_rank} has no GPU (this machine has {torch.cuda.device_count()}); "
                           f"lower --nproc-per-node")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return current()


def current() -> DistInfo:
    """This process's place in the initialized process group, or the single-process `DistInfo`."""
    if not _initialized():
        return SINGLE
    rank = dist.get_rank()
    return DistInfo(rank=rank, world_size=dist.get_world_size(), local_rank=_env_int("LOCAL_RANK", rank),
                    backend=str(dist.get_backend()))


def is_main() -> bool:
    """Whether this is rank 0 (always true in a single process)."""
    return current().is_main


def local_device(device: str = "auto") -> torch.device:
    """The device this process computes on: its own GPU (`cuda:LOCAL_RANK`) or the CPU."""
    if device.startswith("cpu") or not torch.cuda.is_available():
        return torch.device("cpu")
    if device.startswith("cuda:"):
        return torch.device(device)
    return torch.device("cuda", current().local_rank if _initialized() else 0)


def barrier() -> None:
    """Wait until every rank gets here."""
    if not _initialized() or dist.get_world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if not _initialized() or dist.get_world_size() == 1:
        return tensor
    if dist.get_backend() == "nccl" and not tensor.is_cuda:  # NCCL reduces GPU tensors only
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=op)
        tensor.copy_(on_gpu)
    else:
        dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place; returns it (unchanged in a single process)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum of `tensor` over all ranks, in place; returns it."""
    return _all_reduce(tensor, dist.ReduceOp.MIN)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of `tensor` over all ranks, in place; returns it."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s `obj` on every rank (any picklable object); `obj` itself in a single process."""
    if not _initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def destroy() -> None:
    """Leave the process group (safe when there is none)."""
    if _initialized():
        dist.destroy_process_group()


# -- calibration -----------------------------------------------------------------------------------


def _is_observer(module: torch.nn.Module) -> bool:
    """A min/max observer: `min_val`/`max_val` tensors (per tensor: 0-d; per channel: 1-d, empty at first)."""
    return isinstance(getattr(module, "min_val", None), torch.Tensor) and isinstance(
        getattr(module, "max_val", None), torch.Tensor)


def _is_fake_quant(module: torch.nn.Module) -> bool:
    """A fake-quant wrapper: an observer in `activation_post_process` and its own `scale`/`zero_point`."""
    return (isinstance(getattr(module, "activation_post_process", None), torch.nn.Module)
            and isinstance(getattr(module, "scale", None), torch.Tensor)
            and isinstance(getattr(module, "zero_point", None), torch.Tensor)
            and callable(getattr(module, "calculate_qparams", None)))


def _has_clip_stats(module: torch.nn.Module) -> bool:
    """A clipping observer (`hatcli.quant.observers`): running `clip_sum` / `clip_count` of its
    per-batch thresholds, to be summed over ranks."""
    return isinstance(getattr(module, "clip_sum", None), torch.Tensor) and isinstance(
        getattr(module, "clip_count", None), torch.Tensor)


def find_observers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every min/max observer in `module`, named, in module order (the same order on every rank)."""
    return [(name, m) for name, m in module.named_modules() if _is_observer(m)]


def _has_range(observer: torch.nn.Module) -> bool:
    lo, hi = observer.min_val, observer.max_val
    return lo.numel() > 0 and bool(torch.isfinite(lo).any() or torch.isfinite(hi).any())


def _refresh_fake_quants(module: torch.nn.Module, synced: set[int]) -> None:
    """Recompute scale/zero point of every fake-quant wrapper whose observer was synced, exactly as
    the wrapper's own forward does (resize the buffers when the shape changed)."""
    for m in module.modules():
        if not _is_fake_quant(m) or id(m.activation_post_process) not in synced:
            continue
        scale, zero_point = m.calculate_qparams()
        scale, zero_point = scale.to(m.scale.device), zero_point.to(m.zero_point.device)
        if m.scale.shape != scale.shape:
            m.scale.resize_(scale.shape)
        if m.zero_point.shape != zero_point.shape:
            m.zero_point.resize_(zero_point.shape)
        m.scale.copy_(scale)
        m.zero_point.copy_(zero_point)


@torch.no_grad()
def sync_observers(module: torch.nn.Module) -> int:
    """Give every rank the same observed ranges and activation scales after calibration.

    Call it on every rank, after the calibration batches, on the prepared graph (or its DDP
    wrapper). Each observer's `min_val` becomes the minimum over ranks and `max_val` the maximum,
    and every fake-quant wrapper's `scale`/`zero_point` is recomputed from its observer, so every
    rank ends with the scales one process would have computed from all the ranks' batches
    (derived qparams such as int32 bias scales follow, as they are computed from these at
    conversion). Per-channel observers are included (weight ranges agree anyway: the weights are
    identical). An observer no rank has run (min +inf, or an empty per-channel range) is left as
    it is, on every rank alike; one that only some ranks ran takes those ranks' range.

    Clipping observers (`calibration.observer` = percentile or mse) also hold the running sum and
    count of their per-batch thresholds (`clip_sum`, `clip_count`): these are summed over ranks
    before the scales are recomputed, so the threshold is the mean over every rank's batches.

    Returns the number of observers that hold a range (all of them synced). Three collectives in
    all (four with clipping observers), whatever the model's size. In a single process nothing
    changes.
    """
    observers = find_observers(module)
    if not _initialized() or dist.get_world_size() == 1:
        return sum(1 for _, m in observers if _has_range(m))
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    for name, m in observers:
        if isinstance(getattr(m, "histogram", None), torch.Tensor):
            raise HatError(f"observer `{name}` ({type(m).__name__}) keeps a histogram, which cannot be "
                           f"merged across processes; calibrate with --nproc-per-node 1")

    # 1. every rank must hold the same observers (same graph, same names)
    digest = zlib.crc32("\n".join(f"{n}:{type(m).__name__}" for n, m in observers).encode())
    meta = torch.tensor([len(observers), digest], dtype=torch.int64, device=device)
    both = torch.cat([meta, -meta])
    all_reduce_max(both)
    if not torch.equal(both[:2], -both[2:]):
        raise HatError("the processes built different prepared graphs (observer names differ), so their "
                       "calibration cannot be merged; every rank must build the graph from the same checkpoint")
    if not observers:
        return 0

    # 2. agree on sizes: a per-channel observer a rank never ran is empty there
    sizes = torch.tensor([m.min_val.numel() for _, m in observers], dtype=torch.int64, device=device)
    both = all_reduce_max(torch.cat([sizes, -sizes]))
    largest, smallest = both[: len(observers)].tolist(), (-both[len(observers):]).tolist()
    for (name, _), lo, hi in zip(observers, smallest, largest):
        if lo not in (0, hi):
            raise HatError(f"observer `{name}` has {lo} channels on one process and {hi} on another")
    if not any(largest):
        return 0  # no rank has run any observer

    # 3. one reduction for all ranges: MIN over [mins, -maxs]
    parts = []
    for (_, m), n in zip(observers, largest):
        if m.min_val.numel() == n:
            lo, hi = m.min_val.reshape(-1), m.max_val.reshape(-1)
        else:  # never run here: the identity of min / max
            lo = torch.full((n,), float("inf"))
            hi = torch.full((n,), float("-inf"))
        parts += [lo.to(device, torch.float64), -hi.to(device, torch.float64)]
    flat = all_reduce_min(torch.cat(parts))

    synced: set[int] = set()
    offset = 0
    for (_, m), n in zip(observers, largest):
        lo, hi = flat[offset:offset + n], -flat[offset + n:offset + 2 * n]
        offset += 2 * n
        if n == 0 or not bool(torch.isfinite(lo).any() or torch.isfinite(hi).any()):
            continue  # no rank ran it
        shape = m.min_val.shape if m.min_val.numel() == n else ((n,) if m.min_val.dim() == 1 else ())
        for buffer, values in ((m.min_val, lo), (m.max_val, hi)):
            if buffer.shape != shape:
                buffer.resize_(shape)
            buffer.copy_(values.reshape(shape).to(buffer.device, buffer.dtype))
        synced.add(id(m))

    # 4. clipping observers (percentile, mse): the threshold is a mean over batches, so SUM the
    #    running sums and counts; every rank then holds the mean over all ranks' batches
    clipping = [m for _, m in observers if _has_clip_stats(m)]
    if clipping:
        stats = torch.stack([torch.stack([m.clip_sum.to(device, torch.float64).reshape(()),
                                          m.clip_count.to(device, torch.float64).reshape(())])
                             for m in clipping])
        all_reduce_sum(stats)
        for m, (total, count) in zip(clipping, stats):
            m.clip_sum.copy_(total.to(m.clip_sum.device, m.clip_sum.dtype))
            m.clip_count.copy_(count.to(m.clip_count.device, m.clip_count.dtype))
    _refresh_fake_quants(module, synced)
    return len(synced)


# -- launching -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchOutcome:
    """How a launch on this machine ended.

    `returncode` is the launcher's exit status; `exit_codes` maps the global rank of each local
    worker that finished to its exit code (workers stopped by the launcher after another failed,
    or killed, have none); `nproc` is the number of workers started on this machine.
    """

    returncode: int
    nproc: int
    exit_codes: dict[int, int]

    @property
    def failed(self) -> dict[int, int]:
        """Ranks (on this machine) that exited with an error, and their exit codes."""
        return {rank: code for rank, code in self.exit_codes.items() if code != 0}

    def message(self) -> str:
        """One line for the user: how many processes failed and how."""
        failed, stopped = self.failed, self.nproc - len(self.exit_codes)
        count = len(failed) or (self.nproc - sum(1 for c in self.exit_codes.values() if c == 0))
        text = f"{max(count, 1)} of {self.nproc} processes failed"
        if failed:
            text += " (" + ", ".join(f"rank {r}: exit {c}" for r, c in sorted(failed.items())) + ")"
        if failed and stopped:
            text += f"; {stopped} stopped by the launcher"
        return text + "; see the log above"


def launcher_command(nproc_per_node: int, argv: list[str], nnodes: str = "1", node_rank: int = 0,
                     rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
                     master_port: int | None = None) -> list[str]:
    """The command `launch` runs: `python -m torch.distributed.run ARGS -m hatcli ARGV`."""
    if nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be at least 1, not {nproc_per_node}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc_per_node)]
    single_node = str(nnodes) == "1"
    if single_node and not rdzv_endpoint:
        if master_port is None:
            cmd.append("--standalone")  # a private rendezvous on a free port
        else:  # a fixed port: static rendezvous on this machine
            cmd += ["--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", str(master_port)]
    else:
        if not rdzv_endpoint:
            raise UsageError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the same on every machine)")
        if not re.fullmatch(r"\d+(:\d+)?", str(nnodes)):
            raise UsageError(f"--nnodes must be a number or a range MIN:MAX, not `{nnodes}`")
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id or "hat"]
        if master_port is not None:
            cmd += ["--master-port", str(master_port)]
    return cmd + ["-m", "hatcli", *[str(a) for a in argv]]


def _worker_threads(nproc_per_node: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, nproc_per_node))


def run_launcher(nproc_per_node: int, argv: list[str], nnodes: str = "1", node_rank: int = 0,
                 rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
                 master_port: int | None = None) -> LaunchOutcome:
    """Run `hat ARGV` in `nproc_per_node` processes on this machine; see `launch`. Returns the
    launcher's exit status and each local worker's own exit code."""
    cmd = launcher_command(nproc_per_node, argv, nnodes, node_rank, rdzv_endpoint, rdzv_id, master_port)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(_worker_threads(nproc_per_node)))
    with tempfile.TemporaryDirectory(prefix="hat-launch-") as status_dir:
        env[STATUS_DIR_ENV] = status_dir
        sys.stdout.flush()
        sys.stderr.flush()
        proc = subprocess.Popen(cmd, env=env)
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:  # the launcher got the same Ctrl-C and stops its workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        exit_codes = {}
        for path in Path(status_dir).glob("rank-*"):
            try:
                exit_codes[int(path.name.split("-", 1)[1])] = int(path.read_text().strip())
            except ValueError:
                continue
    return LaunchOutcome(returncode=returncode, nproc=nproc_per_node, exit_codes=exit_codes)


def launch(nproc_per_node: int, argv: list[str], nnodes: str = "1", node_rank: int = 0,
           rdzv_endpoint: str | None = None, rdzv_id: str | None = None, master_port: int | None = None) -> int:
    """Run the hat CLI arguments `argv` (e.g. `["train", "r.toml", "--stage", "float"]`) in
    `nproc_per_node` processes through torch's elastic launcher; return the launcher's exit code.

    One machine by default (a standalone rendezvous on a free port, or static on `master_port`).
    Several machines: the same command on each with `nnodes`, its `node_rank` and the same
    `rdzv_endpoint` (HOST:PORT of one of them) and `rdzv_id` (c10d rendezvous). The launcher is a
    subprocess, so a failing worker cannot take this process down; `OMP_NUM_THREADS` is set for
    the workers to the CPU count divided among them unless it is set already.
    """
    return run_launcher(nproc_per_node, argv, nnodes, node_rank, rdzv_endpoint, rdzv_id, master_port).returncode

