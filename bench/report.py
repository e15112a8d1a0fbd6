"""Rewrite the generated parts of BENCHMARKS.md from `bench/out/*.json`.

Each script's JSON carries its tables (pre-formatted), targets, plots, command and machine. This
script replaces the text between `<!-- bench:<name>:begin -->` and `<!-- bench:<name>:end -->`
for every script that has a JSON, plus the `machine` and `targets` blocks built from all of them.
Blocks without a JSON are left as they are. Prose outside the markers is never touched.

    python bench/report.py             # rewrite BENCHMARKS.md from bench/out/*.json
    python bench/report.py --run       # first run every benchmark script (full settings), then rewrite
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import _common as C

DOC = C.ROOT / "BENCHMARKS.md"
SCRIPTS = ("digits_accuracy", "minilm", "kmeans_speed", "runtime", "storage", "audit_speed", "families")


def block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- bench:{re.escape(name)}:begin -->\n).*?(<!-- bench:{re.escape(name)}:end -->)", re.DOTALL)


def load_results() -> dict[str, dict]:
    out = {}
    for path in sorted(C.OUT.glob("*.json")):
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON ({e}); re-run the script that writes it") from e
        if isinstance(d, dict) and "tables" in d:
            out[path.stem] = d
    return out


def section(d: dict) -> str:
    parts = []
    if d.get("quick"):
        parts.append("> **Smoke run (`--quick`)**: small settings, not the numbers to quote.\n")
    for t in d.get("tables", []):
        table = C.Table(t["key"], t["title"], t["columns"], t["rows"], t.get("notes", []))
        parts.append(table.to_markdown())
    for p in d.get("plots", []):
        rel = Path(p).as_posix()
        parts.append(f"![{Path(p).stem}]({rel})\n")
    for m in d.get("missing", []):
        parts.append(f"- Not measured: {m}\n")
    mach = d.get("machine", {})
    load = (f"; load average {mach.get('load_average_1m_start')} at start, {mach.get('load_average_1m_end')} at end"
            if mach.get("load_average_1m_end") is not None else "")
    parts.append(f"Reproduce: `{d['command']}` (this run took {d.get('elapsed_s', 0):.0f} s{load}).\n")
    return "\n".join(parts)


def machine_block(results: dict[str, dict]) -> str:
    if not results:
        return "_no results yet_\n"
    m = next(iter(results.values()))["machine"]
    lines = [f"- CPU: {m.get('cpu')}, {m.get('cores')} cores; {m.get('platform')}",
             (f"- Python {m.get('python')}; torch {m.get('torch')}, numpy {m.get('numpy')}, onnx {m.get('onnx')}, "
             f"onnxruntime {m.get('onnxruntime')}, onnxscript {m.get('onnxscript')}, safetensors {m.get('safetensors')}"),
             (f"- Peers: coremltools {m.get('coremltools')}, scikit-learn {m.get('sklearn')}, "
             f"sentence-transformers {m.get('sentence_transformers')}")]
    total = sum(d.get("elapsed_s", 0) for d in results.values())
    runs = ", ".join(f"{n} {d.get('elapsed_s', 0):.0f} s" for n, d in results.items())
    lines.append(f"- Wall time of the runs shown: {total / 60:.1f} min in all ({runs})")
    return "\n".join(lines) + "\n"


def targets_block(results: dict[str, dict]) -> str:
    rows = [t | ({"note": (t.get("note") + "; " if t.get("note") else "") + "quick run"} if d.get("quick") else {})
            for d in results.values() for t in d.get("targets", [])]
    if not rows:
        return "_no targets measured yet_\n"
    t = C.Table("targets", "Where the toolkit stands", ["target", "goal", "measured", "met"])
    for r in rows:
        met = {True: "yes", False: "**no**", None: "not measured"}[r["met"]]
        t.add(r["name"], r["goal"], r["measured"] + (f" ({r['note']})" if r.get("note") else ""), met)
    lost = [r for r in rows if r["met"] is False]
    text = t.to_markdown()
    if lost:
        text += "\nWhere the toolkit loses (numbers from the runs above):\n\n" + "".join(
            f"- **{r['name']}**: {r['measured']} — the goal is {r['goal']}.\n" for r in lost)
    return text


def rewrite(text: str, results: dict[str, dict]) -> tuple[str, list[str]]:
    """Replace every marked block; only results with a block of their own count in machine and targets."""
    results = {n: d for n, d in results.items() if block(n).search(text)}
    done = []
    blocks = {"machine": machine_block(results), "targets": targets_block(results)}
    blocks |= {name: section(d) for name, d in results.items()}
    for name, body in blocks.items():
        pattern = block(name)
        if not pattern.search(text):
            continue
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
        done.append(name)
    return text, done


def run_all() -> None:
    first = time.perf_counter()
    for name in SCRIPTS:
        script = C.ROOT / "bench" / f"{name}.py"
        if not script.exists():
            print(f"skip {name}: {script} does not exist")
            continue
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        proc = subprocess.run([sys.executable, str(script)], cwd=C.ROOT, check=False)
        print(f"== {name}: exit {proc.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
    print(f"== all: {time.perf_counter() - first:.0f} s", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true", help="run every benchmark script first (full settings)")
    args = p.parse_args()
    if args.run:
        run_all()
    if not DOC.exists():
        raise SystemExit(f"{DOC} does not exist")
    results = load_results()
    text = DOC.read_text()
    for name in results:
        if not block(name).search(text):
            print(f"bench/out/{name}.json has no <!-- bench:{name}:begin --> block in {DOC.name}: not shown")
    text, done = rewrite(text, results)
    from compress.atomic import write_text_atomic

    write_text_atomic(DOC, text, force=True)
    print(f"rewrote {', '.join(done) or 'nothing'} in {DOC.relative_to(C.ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
