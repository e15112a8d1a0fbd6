"""Memory of streaming a checkpoint bigger than memory: `tie_checkpoint` and `audit` as the checkpoint grows.

For each size a sharded safetensors checkpoint is made on the fly (shards of about 1 GB, the largest
tensor fixed at 4096x4096 fp32 = 64 MiB; per layer that weight, a 4096x1024 bf16 weight and an fp32
bias, plus an int64 tensor), then, each in a FRESH Python process:

- `compress.stream.tie_checkpoint` (4 bits per tensor, the default `TieConfig`, all cores);
- `compress.stream.audit_checkpoint` (the audit with tensors read one map at a time);
- `compress.audit.audit(compress.io.load(...))`, the audit as the CLI runs it today (up to
  `--baseline-max` GB): io.load keeps one memory map per shard open, so every page read stays
  resident.

Peak resident memory is VmHWM of each process (and of the largest worker process for the tie);
"after imports" is the same process's peak before it opens the checkpoint. The goal: flat as the
checkpoint grows. The checkpoints are written under `--dir` (default /tmp, free space checked
first) and deleted after each size.

    python bench/stream_memory.py                      # sizes 0.25, 1, 4 GB (about 10 minutes)
    python bench/stream_memory.py --sizes 0.25,1       # fewer sizes
    python bench/stream_memory.py --quick              # 0.05 and 0.2 GB, 16 MiB largest tensor
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from _common import Table, Target, finish, parse_args, run_child

from compress.units import format_iec

FLAT_GOAL = 1.25  # peak at the largest size <= this times the peak at the smallest

_TIE = r"""
import resource, time
from compress.tying import TieConfig
from compress.pipeline import tie_checkpoint
_, after_imports = rss_bytes()
start = time.perf_counter()
r = tie_checkpoint(ARGS["index"], ARGS["out"], TieConfig(bits=ARGS["bits"]), workers=ARGS["workers"])
seconds = time.perf_counter() - start
_, peak = rss_bytes()
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
largest = max(t.bytes_before for t in r.tensors)
print(json.dumps({"seconds": seconds, "peak_rss": peak, "after_imports": after_imports,
                  "worker_peak_rss": r.worker_peak_rss_bytes, "children_maxrss": children,
                  "workers": r.workers, "shards_out": len(r.shards), "bytes_before": r.bytes_before,
                  "bytes_after": r.bytes_after, "largest_bytes": largest,
                  "clustered": sum(t.action == "cluster" for t in r.tensors),
                  "rms_error_max": max(t.rms_error for t in r.tensors if t.rms_error is not None)}))
"""

_AUDIT = r"""
import time
from compress.auditing import AuditConfig, audit
from compress.io import load
from compress.io import open_checkpoint
_, after_imports = rss_bytes()
start = time.perf_counter()
loaded = open_checkpoint(ARGS["index"]) if ARGS["streamed"] else load(ARGS["index"])
report = audit(loaded, AuditConfig(bits=tuple(ARGS["bits"])), progress=False)
seconds = time.perf_counter() - start
_, peak = rss_bytes()
print(json.dumps({"seconds": seconds, "peak_rss": peak, "after_imports": after_imports,
                  "tensor_bytes": report.totals.bytes, "tensors": report.totals.tensors}))
"""


def _extra(p) -> None:
    p.add_argument("--sizes", default="0.25,1,4", help="checkpoint sizes in GB, comma separated")
    p.add_argument("--dir", default="/tmp", help="where the checkpoints are written (and deleted)")
    p.add_argument("--workers", type=int, default=None, help="tie workers (default: all cores)")
    p.add_argument("--baseline-max", type=float, default=1.0,
                   help="run the io.load audit only up to this size in GB (it holds every page it reads)")


def _layout(quick: bool) -> dict:
    if quick:
        return {"big": (2048, 2048), "side": (2048, 512), "shard_bytes": 100_000_000}
    return {"big": (4096, 4096), "side": (4096, 1024), "shard_bytes": 1_000_000_000}


def make_checkpoint(folder: Path, total_bytes: float, layout: dict) -> tuple[Path, int, int]:
    """Write a sharded checkpoint of about `total_bytes`; returns (index, bytes, shard count)."""
    import torch
    from safetensors.torch import save_file

    big, side = layout["big"], layout["side"]
    layer_bytes = big[0] * big[1] * 4 + side[0] * side[1] * 2 + big[0] * 4
    layers = max(1, round(total_bytes / layer_bytes))
    gen = torch.Generator().manual_seed(0)
    shards: list[dict] = [{"position_ids": torch.arange(big[0], dtype=torch.int64).reshape(1, -1)}]
    sizes = [big[0] * 8]
    for i in range(layers):
        layer = {f"layers.{i}.mlp.weight": torch.randn(*big, generator=gen) * 0.02,
                 f"layers.{i}.proj.weight": (torch.randn(*side, generator=gen) * 0.02).to(torch.bfloat16),
                 f"layers.{i}.mlp.bias": torch.randn(big[0], generator=gen) * 0.01}
        nbytes = sum(t.numel() * t.element_size() for t in layer.values())
        if sizes[-1] + nbytes > layout["shard_bytes"]:
            shards.append({})
            sizes.append(0)
        shards[-1].update(layer)
        sizes[-1] += nbytes
    weight_map = {}
    folder.mkdir(parents=True)
    for n, tensors in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name))
        weight_map.update({t: name for t in tensors})
        shards[n - 1] = None  # free as we go
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}))
    return index, sum(sizes), len(shards)


def _check_space(where: Path, largest_gb: float) -> None:
    free = shutil.disk_usage(where).free
    need = largest_gb * 1e9 * 1.3 + 1e9
    if free < need:
        raise SystemExit(f"{where}: {free / 1e9:.1f} GB free, the largest checkpoint needs about "
                         f"{need / 1e9:.1f} GB; pass --dir or smaller --sizes")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    started = time.perf_counter()
    sizes = [0.05, 0.2] if args.quick else [float(s) for s in args.sizes.split(",")]
    layout = _layout(args.quick)
    root = Path(args.dir)
    _check_space(root, max(sizes))
    runs = []
    for gb in sizes:
        work = Path(tempfile.mkdtemp(prefix="stream_memory-", dir=root))
        try:
            t0 = time.perf_counter()
            index, nbytes, nshards = make_checkpoint(work / "ckpt", gb * 1e9, layout)
            made = time.perf_counter() - t0
            print(f"{gb:g} GB: {nbytes / 1e9:.2f} GB in {nshards} shards, written in {made:.0f} s", flush=True)
            run = {"size_gb": gb, "bytes": nbytes, "shards": nshards, "write_s": made}
            run["tie"] = run_child(_TIE, {"index": str(index), "out": str(work / "tied"), "bits": 4,
                                         "workers": args.workers}, timeout=1800)
            print(f"  tie {run['tie']['seconds']:.0f} s", flush=True)
            run["audit"] = run_child(_AUDIT, {"index": str(index), "streamed": True, "bits": [4]}, timeout=1800)
            print(f"  audit (streamed) {run['audit']['seconds']:.0f} s", flush=True)
            if gb <= args.baseline_max:
                run["audit_io_load"] = run_child(_AUDIT, {"index": str(index), "streamed": False, "bits": [4]},
                                                 timeout=1800)
                print(f"  audit (io.load) {run['audit_io_load']['seconds']:.0f} s", flush=True)
            runs.append(run)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    tables, targets = _report(runs, layout)
    finish("stream_memory", started, args, tables, {"layout": layout, "runs": runs}, targets=targets)
    for t in targets:
        print(f"target {t.name}: goal {t.goal}, measured {t.measured}: {'met' if t.met else 'NOT met'}")


def _report(runs: list[dict], layout: dict) -> tuple[list[Table], list[Target]]:
    largest = runs[0]["tie"]["largest_bytes"]
    table = Table("stream_memory", f"Peak resident memory while streaming a sharded checkpoint (largest tensor "
                  f"{'x'.join(map(str, layout['big']))} fp32 = {format_iec(largest)}; fresh process per run)",
                  ["checkpoint", "shards", "tie wall", "tie peak (main)", "tie peak (largest worker)",
                   "tie output", "audit wall (streamed)", "audit peak (streamed)", "audit peak (io.load)"])
    for r in runs:
        tie, aud, base = r["tie"], r["audit"], r.get("audit_io_load")
        table.add(f"{r['bytes'] / 1e9:.2f} GB", r["shards"], f"{tie['seconds']:.0f} s", format_iec(tie["peak_rss"]),
                  format_iec(tie["worker_peak_rss"]),
                  f"{format_iec(tie['bytes_after'])} in {tie['shards_out']}", f"{aud['seconds']:.0f} s",
                  format_iec(aud["peak_rss"]), format_iec(base["peak_rss"]) if base else "not run")
    first = runs[0]
    table.notes.append(
        f"tie: 4 bits per tensor, {first['tie']['workers']} worker processes (spawn), at most 2 tensors per "
        f"worker in flight; the main process writes the shards. Peak after imports: main "
        f"{format_iec(first['tie']['after_imports'])}. audit: AuditConfig(bits=(4,)), one process. "
        "Workers' peak is the k-means working set (float64 sorted copy and prefix sums of one tensor).")
    targets = []
    if len(runs) > 1:
        last = runs[-1]
        for label, key, sub in (("tie main process", "tie", "peak_rss"), ("tie worker", "tie", "worker_peak_rss"),
                                ("audit (streamed)", "audit", "peak_rss")):
            a, b = first[key][sub], last[key][sub]
            targets.append(Target(f"{label} memory flat", f"peak at {last['bytes'] / 1e9:.1f} GB <= {FLAT_GOAL}x "
                                  f"the peak at {first['bytes'] / 1e9:.2f} GB",
                                  f"{format_iec(a)} -> {format_iec(b)} ({b / a:.2f}x)", b <= FLAT_GOAL * a))
    return [table], targets


if __name__ == "__main__":
    main()
