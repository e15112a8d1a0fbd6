"""How fast `compress audit` is, and how much memory it takes, on the real all-MiniLM-L6-v2.

Each timed run is a fresh Python process that opens the 90.8 MB safetensors file (lazily, through
`compress.io.load`, or `safetensors.safe_open` behind a small mapping when io.py is absent), audits
every tensor with the default `AuditConfig`, and reports its wall time and peak resident memory
(VmHWM). The baseline is the same process's peak after its imports, before the file is opened, so
"audit memory" is what the audit itself added. Compared with the file size and the largest tensor.

    python bench/audit_speed.py              # 5 runs, writes bench/out/audit_speed.json
    python bench/audit_speed.py --quick      # 2 runs on samples/digits_mlp.pt2
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from _common import SAMPLES, Table, Target, finish, minilm_path, parse_args, run_child

from compress.units import format_bytes, format_iec

GOAL_SECONDS = 10.0
GOAL_MEMORY_TIMES_LARGEST = 4.0

_CHILD = r"""
import resource
import time
from collections.abc import Mapping
from pathlib import Path

import numpy, torch
from compress.auditing import AuditConfig, audit


class _SafeOpenMapping(Mapping):
    # fallback when compress.io is missing: one tensor read per lookup
    def __init__(self, path):
        from safetensors import safe_open
        self._f = safe_open(str(path), "pt")
        self._keys = list(self._f.keys())

    def __getitem__(self, name):
        return self._f.get_tensor(name)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


class _Loaded:
    def __init__(self, path):
        self.path, self.kind, self.tensors, self.aliases = path, "safetensors", _SafeOpenMapping(path), {}


def cpu():
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


_, baseline = rss_bytes()
path = Path(ARGS["path"])
start, cpu_start = time.perf_counter(), cpu()
try:
    from compress.io import load
    loaded, how = load(path), "compress.io.load"
except ImportError:
    loaded, how = _Loaded(path), "safetensors.safe_open"
report = audit(loaded, AuditConfig(), progress=False)
seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
_, peak = rss_bytes()
largest = max(report.tensors, key=lambda t: t.bytes)
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "audit_seconds": report.seconds,
                  "peak_rss": peak,
                  "baseline_rss": baseline, "loader": how, "parameters": report.totals.parameters,
                  "tensor_bytes": report.totals.bytes, "tensors": report.totals.tensors,
                  "largest_name": largest.name, "largest_bytes": largest.bytes,
                  "projected": [[p.bits, p.bytes] for p in report.totals.projected]}))
"""


def _model(quick: bool) -> Path:
    if quick:
        return SAMPLES / "digits_mlp.pt2"
    found = sorted(minilm_path().rglob("*.safetensors"))
    if not found:
        raise SystemExit(f"no .safetensors file under {minilm_path()}")
    return found[0]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    path = _model(args.quick)
    repeat = 2 if args.quick else args.repeat
    runs = [run_child(_CHILD, {"path": str(path)}) for _ in range(repeat)]
    first = runs[0]
    wall = [r["seconds"] for r in runs]
    peak = statistics.median(r["peak_rss"] for r in runs)
    added = statistics.median(r["peak_rss"] - r["baseline_rss"] for r in runs)
    largest = first["largest_bytes"]

    table = Table("audit_speed", f"compress audit on {path.name} ({repeat} runs, fresh process each)",
                  ["model", "file", "largest tensor", "parameters", "median wall", "runs", "median CPU",
                   "peak RSS", "audit memory", "audit memory / largest"])
    cpu = statistics.median(r["cpu_seconds"] for r in runs)
    table.add(path.name, format_bytes(path.stat().st_size), f"{first['largest_name']} {format_iec(largest)}",
              f"{first['parameters']:,}", f"{statistics.median(wall):.2f} s",
              f"{min(wall):.2f}-{max(wall):.2f} s", f"{cpu:.2f} s",
              format_iec(peak), format_iec(added), f"{added / largest:.1f}x")
    table.notes.append(f"wall and CPU (user + system): open the file and audit it; CPU time is the steadier "
                       f"number on a shared machine. "
                       f"loader: {first['loader']}; audit memory = peak RSS minus the peak after imports "
                       f"({format_iec(statistics.median(r['baseline_rss'] for r in runs))}).")

    targets = [
        Target("audit time", f"< {GOAL_SECONDS:g} s of CPU",
               f"{cpu:.2f} s CPU, {statistics.median(wall):.2f} s wall", cpu < GOAL_SECONDS,
               "CPU time: the wall time depends on what else the machine runs"),
        Target("audit memory", f"<= {GOAL_MEMORY_TIMES_LARGEST:g}x the largest tensor",
               f"{added / largest:.1f}x", added / largest <= GOAL_MEMORY_TIMES_LARGEST,
               "the peak is inside compress.kmeans.kmeans_1d (float64 sorted copy and prefix sums)"),
    ]
    results = {"path": str(path), "file_bytes": path.stat().st_size, "runs": runs,
               "median_s": statistics.median(wall), "median_cpu_s": cpu, "median_peak_rss": peak,
               "median_audit_memory": added}
    finish("audit_speed", started, args, [table], results, targets=targets)
    for t in targets:
        print(f"target {t.name}: goal {t.goal}, measured {t.measured}: {'met' if t.met else 'NOT met'}")


if __name__ == "__main__":
    main()
