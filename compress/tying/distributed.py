"""Fine-tuning across processes with torch.distributed, as launched by `torchrun` (one or many machines).

`finetune_` and `SoftTie` use this module; nothing here changes a single-process run. Under
`torchrun` (which sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) `finetune_` joins the process
group (`session()`), checks that every rank planned the same (`same_bytes`), and then:

* every rank draws the same global batch from the same seeded permutation and trains on its own
  disjoint part of it (`Group.shard`); the model is wrapped in DistributedDataParallel, or sharded
  with FSDP2 (`fully_shard`) when `FinetuneConfig.fsdp` is set;
* `SoftTie` computes its penalty on the rows each rank owns (its FSDP shard, or the same row chunk
  of a DDP replica) and all-reduces the per-cluster sufficient statistics (sums, squares, counts,
  mixture responsibilities), so centres, assignments and the mixture prior are the same on every rank
  after every step;
* a step that raises on one rank raises on every rank (`Group.agree`), and only rank 0 writes files
  and shows the progress bar (`is_main`).

Collectives run on CPU tensors with the gloo backend; the fine-tuning itself runs on CPU.

    >>> with session() as group:          # world of 1 outside torchrun
    ...     group.rank, group.world
    (0, 1)
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import CompressError, Option, UnsupportedModelError

BACKEND = "gloo"
_MESSAGE_BYTES = 2048  # room for one failing rank's error message in `agree`


class RankFailedError(CompressError):
    """Another rank of a distributed run failed; the message is its error (same exit code)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Group:
    """This process's place in the run: `rank` of `world` (a world of 1 does no collectives)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's disjoint part of a global batch of sample indices (contiguous, sizes differ by <= 1)."""
        return idx.tensor_split(self.world)[self.rank] if self.active else idx

    def rows(self, rows: int) -> slice:
        """The first-axis rows this rank owns: FSDP2's `Shard(0)` chunking (`torch.chunk`)."""
        if not self.active:
            return slice(0, rows)
        size = -(-rows // self.world)
        return slice(min(self.rank * size, rows), min((self.rank + 1) * size, rows))

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place (every rank gets the same bits)."""
        if self.active:
            dist.all_reduce(t)
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `t` with rank `src`'s `t`."""
        if self.active:
            dist.broadcast(t, src)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on some rank."""
        return bool(self.all_reduce_(torch.tensor([float(flag)], dtype=torch.float64)).item() > 0)

    def agree(self, error: BaseException | None, values: Sequence[float], where: str) -> list[float]:
        """Sum `values` over ranks, first checking that no rank failed.

        Call it on every rank at the same point, with the exception this rank caught (or None). When
        some rank failed, every rank raises: the failing rank its own exception, the others a
        `RankFailedError` carrying the first failing rank's message and exit code.
        """
        if not self.active:
            if error is not None:
                raise error
            return list(values)
        t = torch.tensor([float(error is not None), *values], dtype=torch.float64)
        dist.all_reduce(t)
        if t[0] > 0:
            self._raise_together(error, where)
        return t[1:].tolist()

    def _raise_together(self, error: BaseException | None, where: str) -> None:
        local = _encode_error(error)
        seen = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(seen, local)
        if error is not None:
            raise error
        for rank, blob in enumerate(seen):
            failed = _decode_error(blob)
            if failed is not None:
                code, text = failed
                raise RankFailedError(f"rank {rank} failed {where}: {text}", code)


def _encode_error(error: BaseException | None) -> torch.Tensor:
    """[failed, exit code, length, utf-8 bytes...] in a fixed-size uint8 tensor (no pickle)."""
    out = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    if error is None:
        return out
    text = f"{type(error).__name__}: {error}" if not isinstance(error, CompressError) else str(error)
    raw = text.splitlines()[0].encode("utf-8", "replace")[: _MESSAGE_BYTES - 4] if text else b"?"
    out[0], out[1] = 1, max(1, min(int(getattr(error, "exit_code", 1)), 255))
    out[2], out[3] = len(raw) // 256, len(raw) % 256
    out[4:4 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return out


def _decode_error(blob: torch.Tensor) -> tuple[int, str] | None:
    if int(blob[0]) == 0:
        return None
    n = int(blob[2]) * 256 + int(blob[3])
    return int(blob[1]), bytes(blob[4:4 + n].tolist()).decode("utf-8", "replace")


def current() -> Group:
    """The group of the initialized default process group (a world of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def launched() -> bool:
    """True in a process that torchrun started as one of several workers (WORLD_SIZE > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def under_launcher() -> bool:
    """True in a process started by torchrun (or another launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main() -> bool:
    """True on rank 0 (and in a plain single process): the one rank that writes files and prints.

    >>> is_main()
    True
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


@contextlib.contextmanager
def session(timeout: datetime.timedelta | None = None) -> Iterator[Group]:
    """The process group for a block: the existing one, a new one when torchrun launched this process
    (destroyed at the end of the block), or a world of 1.

    Args:
        timeout: how long a collective waits for a missing rank before it fails (torch's default:
            30 minutes for gloo).

    >>> with session() as group:
    ...     group.world
    1
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() != BACKEND:
            raise UnsupportedModelError(f"fine-tuning runs on CPU with the {BACKEND} backend; the process group "
                                        f"uses {dist.get_backend()}: initialize it with backend='{BACKEND}'")
        yield current()
        return
    if not launched():
        yield Group()
        return
    if not dist.is_available():
        raise UnsupportedModelError("this torch build has no torch.distributed; run one process (no ",
                                    Option("nproc"), ")")
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(BACKEND, **kwargs)
    try:
        yield current()
        dist.barrier()
    finally:
        # DDP reducers and FSDP states sit in reference cycles that hold the process group and its
        # pending work; left for interpreter shutdown, gloo aborted the process (SIGABRT) on exit
        gc.collect()
        dist.destroy_process_group()


def same_bytes(blob: bytes, group: Group) -> bytes | None:
    """Make sure every rank holds rank 0's `blob`; returns None when all ranks had the same bytes,
    else rank 0's bytes (on every rank).

    `finetune_` sends its plan as JSON: `analyze` is deterministic, so ranks on identical machines
    compute identical plans, and this proves it with a SHA-256 digest; a rank whose plan differs
    (other CPU, other library build) adopts rank 0's.

    >>> same_bytes(b"plan", Group()) is None
    True
    """
    if not group.active:
        return None
    digest = torch.frombuffer(bytearray(hashlib.sha256(blob).digest()), dtype=torch.uint8)
    digests = [torch.empty_like(digest) for _ in range(group.world)]
    dist.all_gather(digests, digest)
    if all(torch.equal(d, digests[0]) for d in digests):
        return None
    size = group.broadcast_(torch.tensor([len(blob)], dtype=torch.int64))
    buf = torch.zeros(int(size), dtype=torch.uint8)
    if group.main:
        buf.copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
    group.broadcast_(buf)
    return bytes(buf.tolist())


@torch.no_grad()
def copy_unsharded_(dst: torch.nn.Module, src: torch.nn.Module, group: Group) -> None:
    """Copy the trained weights of `src` (an FSDP2-sharded copy of `dst`) into `dst`, whole, on every
    rank; buffers (e.g. batch-norm statistics, kept per rank) come from rank 0.

    Example::

        copy_unsharded_(model, sharded_copy, current())
    """
    from torch.distributed.tensor import DTensor

    for name, p in src.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        dst.get_parameter(name).copy_(full)
    for name, b in src.named_buffers():
        target = dst.get_buffer(name)
        target.copy_(b)
        group.broadcast_(target)


def relaunch(args: Sequence[str], nproc: int, module: str) -> int:
    """Run `python -m <module> <args>` as `nproc` processes on this machine under torchrun; returns
    its exit code (non-zero when any rank failed).

    Example::

        relaunch(["tie", "model.pt2", "--data", "data.pt"], nproc=4, module="cli")
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", module, *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        return subprocess.run(command, env=env, check=False).returncode
    except KeyboardInterrupt:
        return 130


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
