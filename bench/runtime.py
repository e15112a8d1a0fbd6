"""onnxruntime on CPU: session load time, latency and resident memory, fp32 vs the toolkit's ONNX.

For MiniLM (BertModel + mean pooling, exported with dynamo), the CNN sample and every family of the
model zoo (`tests/families/zoo.py`, summarised in a second table): the fp32 ONNX, and
the toolkit's ONNX (`TieConfig(bits=4)`, see `_artifacts.py`) opened three ways: a plain
`onnxruntime.InferenceSession` with default options (what any user of the file gets: onnxruntime
folds the decode into dense weights at load), `compress.runtime.make_session` (the same, plus
returning the memory freed at load to the system), and `make_session(keep_compressed=True)` (the
weights stay codebook + indices; every run decodes them). Each at the benchmark batch and at batch 1.

Every measurement is a fresh Python process: it imports onnxruntime and `compress.runtime`, records
its resident memory, opens the session (timed), runs a few warm-up inferences, then times `--runs`
inferences (median). Memory is what the session added: resident after the runs and the peak
(VmHWM), each minus the process's memory before the session. `--repeat` processes per variant,
interleaved across variants so drift hits all alike; the tables give medians over processes and
every ratio compares numbers of the same run.

    python bench/runtime.py          # ~12 min on 2 cores
    python bench/runtime.py --quick
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import _common as C
import numpy as np

CHILD = r"""
import statistics, time
import numpy as np
import onnx  # make_session's file check imports it lazily: keep import time and memory out of the session's
import onnxruntime
import compress.io.onnx_file
from compress.runtime import make_session
inputs = [np.load(f) for f in ARGS["inputs"]]
base_rss, _ = rss_bytes()
start = time.perf_counter()
if ARGS["plain"]:
    session = onnxruntime.InferenceSession(ARGS["path"], providers=["CPUExecutionProvider"])
else:
    session = make_session(ARGS["path"], "cpu", ARGS["keep_compressed"])
load_s = time.perf_counter() - start
feed = {i.name: a for i, a in zip(session.get_inputs(), inputs)}
for _ in range(ARGS["warmup"]):
    session.run(None, feed)
times = []
for _ in range(ARGS["runs"]):
    t = time.perf_counter()
    session.run(None, feed)
    times.append(time.perf_counter() - t)
rss, peak = rss_bytes()
print(json.dumps({"load_s": load_s, "latency_s": statistics.median(times), "rss": rss - base_rss,
                  "peak": peak - base_rss, "base_rss": base_rss}))
"""

VARIANTS = {  # name -> (file attribute, plain InferenceSession, keep_compressed)
    "fp32": ("fp32_onnx", True, False),
    "ours, plain session": ("onnx", True, False),
    "ours, make_session": ("onnx", False, False),
    "ours, keep_compressed": ("onnx", False, True),
}
BATCHES = ("bench", "1")


@dataclass
class Sample:
    model: str
    batch: str
    variant: str
    load_s: float
    latency_s: float
    rss: int
    peak: int


def measure(built, inputs_files: dict[str, list[str]], repeat: int, runs: int) -> list[Sample]:
    out = []
    for _ in range(repeat):
        for batch, files in inputs_files.items():
            for variant, (attr, plain, keep) in VARIANTS.items():
                args = {"path": str(getattr(built, attr)), "plain": plain, "keep_compressed": keep, "inputs": files,
                        "warmup": 3, "runs": runs}
                d = C.run_child(CHILD, args)
                out.append(Sample(built.name, batch, variant, d["load_s"], d["latency_s"], d["rss"], d["peak"]))
    return out


def _median(samples: list[Sample], model: str, batch: str, variant: str) -> dict[str, float]:
    s = [x for x in samples if x.model == model and x.batch == batch and x.variant == variant]
    return {k: statistics.median(getattr(x, k) for x in s) for k in ("load_s", "latency_s", "rss", "peak")}


def table(samples: list[Sample], built_list, runs: int, repeat: int) -> C.Table:
    t = C.Table("runtime", "onnxruntime CPU: session load, latency and the memory the session adds, as ratios to "
                f"fp32 in the same run (medians over {repeat} fresh processes)",
                ["model", "batch", "variant", "file", "load", "latency", "vs fp32", "resident", "vs fp32", "peak",
                 "vs fp32"])
    for b in built_list:
        for batch in BATCHES:
            shape = b.inputs[0].shape[0] if batch == "bench" else 1
            fp32 = _median(samples, b.name, batch, "fp32")
            for v, (attr, _, _) in VARIANTS.items():
                m = _median(samples, b.name, batch, v)
                t.add(b.name, str(shape), v, C.fmt_bytes(Path(getattr(b, attr)).stat().st_size), C.fmt_s(m["load_s"]),
                      C.fmt_s(m["latency_s"]), f"{m['latency_s'] / fp32['latency_s']:.3f}x", C.fmt_bytes(m["rss"]),
                      f"{m['rss'] / fp32['rss']:.2f}x", C.fmt_bytes(m["peak"]), f"{m['peak'] / fp32['peak']:.2f}x")
    shapes = "; ".join(f"{b.name}: {' + '.join(str(list(x.shape)) for x in b.inputs)}" for b in built_list)
    t.notes = [(f"Latency: median of {runs} runs after 3 warm-up runs, per process. Benchmark inputs {shapes}; "
               "batch 1 is the first row of each. fp32 and 'plain session': onnxruntime.InferenceSession with "
               "default options; 'make_session' and 'keep_compressed': compress.runtime.make_session.")]
    return t


FEATURED = ("digits_cnn", "minilm")  # the targets are set on these; the zoo families are summarised


def _ratios(samples: list[Sample], model: str) -> dict[str, float]:
    """Every targeted quantity of `model` as a ratio to fp32 in the same run."""
    fp32 = {batch: _median(samples, model, batch, "fp32") for batch in BATCHES}
    plain = _median(samples, model, "bench", "ours, plain session")
    keep = {batch: _median(samples, model, batch, "ours, keep_compressed") for batch in BATCHES}
    return {"latency": plain["latency_s"] / fp32["bench"]["latency_s"],
            "resident": plain["rss"] / fp32["bench"]["rss"], "peak": plain["peak"] / fp32["bench"]["peak"],
            "keep latency": keep["bench"]["latency_s"] / fp32["bench"]["latency_s"],
            "keep latency 1": keep["1"]["latency_s"] / fp32["1"]["latency_s"],
            "keep resident": keep["bench"]["rss"] / fp32["bench"]["rss"]}


def _targets_of(name: str, r: dict[str, float]) -> list[C.Target]:
    return [
        C.Target(f"runtime {name}", "plain default session: latency within 5% of fp32 ONNX", f"{r['latency']:.3f}x",
                 r["latency"] <= 1.05),
        C.Target(f"memory {name}", "plain default session: resident and peak within 5% of fp32",
                 f"resident {r['resident']:.2f}x, peak {r['peak']:.2f}x", max(r["resident"], r["peak"]) <= 1.05),
        C.Target(f"compressed-resident {name}",
                 "keep_compressed: <= 2.5x fp32 latency at the bench batch, <= 1.5x at batch 1, resident <= 0.35x",
                 f"{r['keep latency']:.2f}x, {r['keep latency 1']:.2f}x at batch 1, resident {r['keep resident']:.2f}x",
                 r["keep latency"] <= 2.5 and r["keep latency 1"] <= 1.5 and r["keep resident"] <= 0.35),
    ]


def family_table(samples: list[Sample], built_list) -> C.Table:
    t = C.Table("runtime-families", "The model families (tests/families/zoo.py, 4 bits, batch 8): each ratio to "
                "fp32 ONNX in the same run", ["family", "fp32 ONNX", "ours", "plain: latency", "plain: resident",
                                              "plain: peak", "keep_compressed: latency", "at batch 1", "resident"])
    for b in built_list:
        if b.name in FEATURED:
            continue
        r = _ratios(samples, b.name)
        t.add(b.name, C.fmt_bytes(b.fp32_onnx.stat().st_size), C.fmt_bytes(b.onnx.stat().st_size),
              *(f"{r[k]:.2f}x" for k in ("latency", "resident", "peak", "keep latency", "keep latency 1",
                                          "keep resident")))
    t.notes = [("Random-weight models of 0.1-1M parameters: onnxruntime's own session memory is a large part of "
               "every number, so these ratios say more about the graph's form than about the weights.")]
    return t


def targets(samples: list[Sample], built_list) -> list[C.Target]:
    """The targets on each featured model; for the families, each target at its worst family."""
    ratios = {b.name: _ratios(samples, b.name) for b in built_list}
    out = [t for name in FEATURED if name in ratios for t in _targets_of(name, ratios[name])]
    families = {n: r for n, r in ratios.items() if n not in FEATURED}
    if families:
        worst = {k: max(r[k] for r in families.values()) for k in next(iter(families.values()))}
        out += [C.Target(t.name.replace("families", "families (worst)"), t.goal, t.measured, t.met)
                for t in _targets_of("families", worst)]
    return out


def main() -> int:
    args = C.parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--runs", type=int, default=30, help="timed inferences per process"))
    started = time.perf_counter()
    C.quiet()
    from _artifacts import build_family, build_minilm, build_sample
    from families import QUICK as QUICK_FAMILIES

    from tests.families.zoo import FAMILIES

    missing = [why for mod, names in (("tying", ("analyze", "merge_")), ("export.onnx", ("export_onnx",)),
                                      ("export.safetensors", ("export_safetensors",)), ("runtime", ("make_session",)))
               for _, why in [C.toolkit(mod, *names)] if why]
    if missing:
        C.finish("runtime", started, args, [], {}, missing=missing)
        return 1
    repeat, runs = (2, 5) if args.quick else (args.repeat, args.runs)
    samples, built_list = [], []
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
        tmp = Path(tmp)
        builders = [lambda: build_sample("digits_cnn", tmp / "cnn"), lambda: build_minilm(tmp / "minilm")]
        builders += [lambda n=n: build_family(n, tmp / n) for n in (QUICK_FAMILIES if args.quick else FAMILIES)]
        for make in builders:
            with C.stopwatch() as t:
                b = make()
            print(f"built {b.name} in {t[0]:.0f} s", flush=True)
            files = {}
            for batch in BATCHES:
                files[batch] = []
                for i, x in enumerate(b.inputs):
                    files[batch].append(str(tmp / f"{b.name}.{batch}.input{i}.npy"))
                    np.save(files[batch][-1], (x if batch == "bench" else x[:1]).numpy())
            samples += measure(b, files, repeat if b.name in FEATURED else min(repeat, 3), runs)
            built_list.append(b)
        featured = [b for b in built_list if b.name in FEATURED]
        tables = [table(samples, featured, runs, repeat), family_table(samples, built_list)]
        results = {"samples": [asdict(s) for s in samples], "runs": runs, "repeat": repeat,
                   "files": {b.name: {v: Path(getattr(b, a)).stat().st_size for v, (a, _, _) in VARIANTS.items()}
                             for b in built_list}}
        C.finish("runtime", started, args, tables, results, targets=targets(samples, built_list))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
