"""Clustering one checkpoint tensor, in this process or in a pool of worker processes.

Each worker opens the shard itself by path and name, so no tensor data is pickled to it; it
returns the codebook's raw bytes and the packed indices, nothing the size of the tensor.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import re
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..codebook import bits_for
from ..errors import CompressError
from ..granularity import Granularity
from ..io.checkpoint import read_tensor
from ..packing import pack_bits
from ..tying import Settings, check_finite, cluster_tensor, nearest_labels

_CHUNK = 1 << 20  # elements per step when assigning labels (bounds the temporaries)
_PACK_CHUNK = 1 << 16  # a multiple of 8: chunks pack to whole bytes, so their concatenation is exact
# A worker's peak: imports, then about 56 bytes per element of the tensor it clusters (k-means in
# float64: values, sorted copy, two prefix sums, distinct values, labels). Measured 1.1 GiB for 16.8M.
WORKER_BASE = 256 << 20
WORKER_BYTES = 56


@dataclass(frozen=True)
class Job:
    """One tensor to cluster: where it is stored and the settings it gets."""

    name: str
    file: str
    stored: str
    settings: Settings


@dataclass
class Clustered:
    """A clustered tensor, compact: the codebook's raw bytes (weight dtype) and the packed indices."""

    codebook: bytes
    groups: int
    k: int
    bits: int
    grain: Granularity
    packed: np.ndarray
    rms_error: float
    max_error: float
    peak_rss: int

    def summary(self) -> Clustered:
        """The same numbers without the bytes (kept for the report once the shard has them)."""
        return Clustered(b"", self.groups, self.k, self.bits, self.grain, np.zeros(0, np.uint8), self.rms_error,
                         self.max_error, self.peak_rss)


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core already


def cluster_job(job: Job) -> Clustered:
    """Open the shard by path, read one tensor, cluster it: nothing large crosses the process boundary."""
    return cluster_one(job.name, read_tensor(job.file, job.stored), job.settings)


def cluster_one(name: str, w: torch.Tensor, settings: Settings) -> Clustered:
    """`cluster_tensor`'s shared values, then `merge_`'s nearest-value indices, packed."""
    check_finite(name, w)
    c = cluster_tensor(w, settings, name=name)
    centers = torch.from_numpy(c.centers).to(w.dtype)
    del c.labels  # merge_ assigns every weight to its nearest stored value instead
    labels, sq, worst = _nearest(w, centers, c.grain)
    bits = bits_for(c.k)
    packed = _pack(labels, bits)
    del labels
    raw = centers.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    n = max(w.numel(), 1)
    return Clustered(raw, int(centers.shape[0]), c.k, bits, c.grain, packed, math.sqrt(sq / n), worst, peak_rss())


def _nearest(w: torch.Tensor, centers: torch.Tensor, grain: Granularity) -> tuple[np.ndarray, float, float]:
    """`nearest_labels` a block of rows at a time (same result, bounded temporaries), as uint8, with the
    squared and the largest error of the stored values."""
    rows = w.shape[0] if w.ndim else 1
    flat = w.reshape(rows, -1)
    cols, k = flat.shape[1], centers.shape[1]
    step = max(1, min(_CHUNK // max(cols, 1), _CHUNK // k))  # nearest_labels makes [rows, k] mid tables
    if grain.kind == "group":
        step = max(grain.size, step // grain.size * grain.size)  # whole groups per block
    labels = np.empty(rows * cols, dtype=np.uint8)
    sq, worst = 0.0, 0.0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        part = flat[r0:r1]
        c = centers[grain.block_of(r0, r1)]
        lab = nearest_labels(part, c, grain)
        stored = c.reshape(-1)[(lab + grain.row_offsets(tuple(part.shape), k)).reshape(-1)]
        diff = stored.double() - part.reshape(-1).double()
        if diff.numel():
            sq += float(diff.square().sum())
            worst = max(worst, float(diff.abs().max()))
        labels[r0 * cols: r1 * cols] = lab.reshape(-1).numpy()
    return labels, sq, worst


def _pack(labels: np.ndarray, bits: int) -> np.ndarray:
    """`pack_bits` in chunks of whole bytes (it makes an [n, bits] int64 table of the whole input)."""
    if bits == 8 or labels.size <= _PACK_CHUNK:
        return pack_bits(labels, bits)
    return np.concatenate([pack_bits(labels[i:i + _PACK_CHUNK], bits) for i in range(0, labels.size, _PACK_CHUNK)])


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (VmHWM; ru_maxrss where /proc is absent)."""
    with contextlib.suppress(OSError, AttributeError):
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class _Deferred:
    """A job run in this process when its result is wanted (workers=1)."""

    def __init__(self, job: Job):
        self._job = job

    def result(self) -> Clustered:
        return cluster_job(self._job)


@contextlib.contextmanager
def submitter(workers: int) -> Iterator[Callable[[Job], Any]]:
    """`submit(job) -> future`; with several workers a spawn-context process pool, torn down on error."""
    if workers == 1:
        yield _Deferred
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)
    try:
        yield lambda job: pool.submit(cluster_job, job)
    except BrokenProcessPool as e:
        pool.shutdown(wait=True, cancel_futures=True)
        raise CompressError("a worker process died while clustering (out of memory? a script that starts "
                            "workers needs `if __name__ == \"__main__\":`); nothing was written; retry with "
                            "fewer workers (workers=1 clusters in this process)") from e
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def in_order(jobs: list[tuple[Any, Job | None]], submit: Callable[[Job], Any], window: int
             ) -> Iterator[tuple[Any, Clustered | None]]:
    """Yield (item, clustered or None) in the given order, with at most `window` jobs in flight."""
    pending: deque = deque()
    todo = iter(jobs)
    in_flight = 0
    while True:
        while in_flight < window:
            nxt = next(todo, None)
            if nxt is None:
                break
            item, job = nxt
            future = None
            if job is not None:
                future = submit(job)
                in_flight += 1
            pending.append((item, future))
        if not pending:
            return
        item, future = pending.popleft()
        if future is None:
            yield item, None
        else:
            in_flight -= 1
            yield item, future.result()
