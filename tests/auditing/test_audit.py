"""`compress audit`: numbers against brute force, ties and repeated rows found, JSON round trip, the CLI."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compress.auditing import AuditConfig, AuditReport, TensorTie, audit, find_tensor_ties
from compress.auditing.measure import _row_repeats
from compress.auditing.report import REPORT_VERSION
from compress.codebook import bits_for
from compress.errors import BadInputError, CompressError
from compress.units import format_bytes, format_iec

TOL = 1e-3


@dataclass
class _Loaded:
    """Stand-in for `compress.io.Loaded`: the four fields `audit` reads."""

    tensors: Mapping[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    path: str = "model.pt"
    kind: str = "state_dict"


class _CountingMapping(Mapping):
    """A lazy mapping that records every read, like a safetensors file."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors
        self.reads: dict[str, int] = dict.fromkeys(tensors, 0)

    def __getitem__(self, name: str) -> torch.Tensor:
        self.reads[name] += 1
        return self._tensors[name].clone()

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _audit(tensors, **cfg) -> AuditReport:
    aliases = cfg.pop("aliases", {})
    return audit(_Loaded(tensors, aliases), AuditConfig(**cfg))


def _row(report: AuditReport, name: str):
    return next(t for t in report.tensors if t.name == name)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- brute force references -----------------------------------------------------------------------

def _optimal_sse(x: np.ndarray, k: int) -> float:
    xs = np.sort(x)
    best = math.inf
    for parts in range(1, min(k, len(xs)) + 1):
        for cuts in itertools.combinations(range(1, len(xs)), parts - 1):
            best = min(best, sum(float(((s - s.mean()) ** 2).sum()) for s in np.split(xs, cuts)))
    return best


def _fewest_groups(x: np.ndarray, tol: float) -> int:
    """Exact minimum cover by intervals of width 2*tol: dynamic programme over the sorted values."""
    xs = np.sort(x)
    best = [0] + [math.inf] * len(xs)
    for i in range(1, len(xs) + 1):
        for j in range(i):
            if xs[i - 1] - xs[j] <= 2 * tol:
                best[i] = min(best[i], best[j] + 1)
    return best[-1]


# --- per tensor -----------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [
    [0.1, -0.3, 0.25, 0.1, 0.7, -0.3, 0.0004, 0.0, 0.9],
    [1.0, 1.0005, 1.0011, 2.0, 2.0019, 2.0021, -5.0, 3.3, 3.3],
    [0.5, 0.5, 0.5],
], ids=["spread", "near-pairs", "constant"])
def test_tensor_numbers_match_brute_force(values):
    x = torch.tensor(values, dtype=torch.float64)
    row = _row(_audit({"w": x}, min_size=1), "w")
    xn = x.numpy()
    assert row.unique == len(set(values))
    assert row.groups == _fewest_groups(xn, TOL)
    assert (row.min, row.max) == (min(values), max(values))
    assert row.std == pytest.approx(float(np.std(xn)))
    two_bit = row.merge_at(2)
    best = math.sqrt(_optimal_sse(xn, 4) / len(values))
    assert two_bit.rms_error == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert two_bit.centers == min(4, len(set(values)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_repeated_values_cluster_as_well_as_brute_force(dtype):
    # 7 distinct values, each 4-7 times: the audit clusters the distinct values weighted by count
    values = np.repeat(np.array([-0.5, -0.25, 0.0, 0.125, 0.25, 0.75, 1.0]), [5, 4, 6, 7, 4, 5, 4])
    x = torch.tensor(values, dtype=dtype)
    row = _row(_audit({"w": x}, bits=[2]), "w")
    best = math.sqrt(_optimal_sse(values, 4) / len(values))
    assert row.unique == 7 and row.dtype == str(dtype).removeprefix("torch.")
    assert row.merge_at(2).rms_error == pytest.approx(best, rel=1e-5)


def test_groups_against_exact_cover_on_a_bigger_tensor():
    x = torch.randn(400, generator=_gen(1), dtype=torch.float64) * 0.02
    for tol in (0.0, 1e-4, 1e-3, 1e-2):
        row = _row(_audit({"w": x}, tolerance=tol), "w")
        assert row.groups == _fewest_groups(x.numpy(), tol)


def test_entropy_of_well_separated_groups():
    # three groups far apart, jitter inside the tolerance: counts 5, 3, 1
    values = [0.0, 0.0002, -0.0003, 0.0001, 0.0, 1.0, 1.0004, 0.9998, 2.0]
    row = _row(_audit({"w": torch.tensor(values)}), "w")
    p = np.array([5, 3, 1]) / 9
    assert row.groups == 3
    assert row.entropy_bits == pytest.approx(float(-(p * np.log2(p)).sum()), rel=1e-12)


@pytest.mark.parametrize("dtype,distinct,bits,expected", [
    (torch.float32, 1000, 4, 16 * 4 + 500),   # 16 centres of 4 bytes, 1000 indices of 4 bits
    (torch.float32, 1000, 2, 4 * 4 + 250),
    (torch.float16, 1000, 8, 256 * 2 + 1000),
    (torch.float32, 3, 8, 3 * 4 + math.ceil(1000 * 2 / 8)),  # 3 centres need only 2-bit indices
    (torch.float32, 1, 8, 1 * 4 + math.ceil(1000 * 1 / 8)),
], ids=["f32-4bit", "f32-2bit", "f16-8bit", "three-values", "one-value"])
def test_packed_bytes_formula(dtype, distinct, bits, expected):
    x = (torch.arange(1000) % distinct).to(dtype) / 7
    m = _row(_audit({"w": x}, bits=[bits]), "w").merge_at(bits)
    assert m.centers == min(distinct, 2 ** bits)
    assert m.index_bits == bits_for(m.centers)
    assert m.bytes == expected == m.centers * x.element_size() + math.ceil(1000 * m.index_bits / 8)


def test_merge_errors_are_real():
    x = torch.randn(50, 40, generator=_gen(2))
    row = _row(_audit({"w": x}), "w")
    flat = x.reshape(-1).double().numpy()
    for m in row.merges:
        assert m.max_error >= m.rms_error > 0
        if m.values is not None:  # the listed shared values reproduce the reported error
            c = np.array(m.values)
            err = np.abs(flat[:, None] - c[None, :]).min(axis=1)
            assert math.sqrt(float(np.mean(err ** 2))) == pytest.approx(m.rms_error, rel=1e-9)
    assert row.merge_at(8).rms_error < row.merge_at(4).rms_error < row.merge_at(2).rms_error


def test_odd_tensors_are_listed_not_clustered():
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 2.0])
    tensors = {"ids": torch.arange(10), "mask": torch.tensor([True, False, True]), "bad": bad,
               "empty": torch.zeros(0, 3), "scalar": torch.tensor(1.5), "one": torch.tensor([2.0]),
               "cplx": torch.ones(3, dtype=torch.complex64)}
    report = _audit(tensors)
    rows = {t.name: t for t in report.tensors}
    assert rows["ids"].note == "left alone: integer" and rows["ids"].unique == 10 and not rows["ids"].merges
    assert rows["mask"].note == "left alone: bool" and rows["mask"].unique == 2
    assert rows["bad"].note == "left alone: 1 NaN, 2 Inf"
    assert rows["bad"].nonfinite == 3 and not rows["bad"].merges
    assert rows["empty"].note == "empty" and rows["empty"].bytes == 0
    assert rows["cplx"].note == "left alone: complex"
    for name in ("scalar", "one"):
        r = rows[name]
        assert (r.unique, r.groups, r.entropy_bits) == (1, 1, 0.0)
        assert all(m.rms_error == 0.0 and m.centers == 1 for m in r.merges)
    assert report.totals.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(p.bytes == report.totals.bytes for p in report.totals.projected)  # nothing worth merging
    json.dumps(report.to_dict(), allow_nan=False)  # no NaN/Inf leaks into the JSON


# --- repeated rows --------------------------------------------------------------------------------

def _brute_force_twins(m: np.ndarray, tol: float) -> set[int]:
    diff = np.abs(m[:, None, :] - m[None, :, :]).max(axis=2)
    np.fill_diagonal(diff, np.inf)
    return set(np.flatnonzero((diff <= tol).any(axis=1)).tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repeated_rows_match_all_pairs(seed):
    rng = np.random.default_rng(seed)
    m = rng.normal(0, 0.01, (300, 6))  # small values: some random pairs are near too
    for dst, src in rng.integers(0, 300, (40, 2)):
        m[dst] = m[src] + rng.uniform(-TOL / 2, TOL / 2, 6)
    twins = _brute_force_twins(m, TOL)
    row = _row(_audit({"w": torch.from_numpy(m)}), "w")
    assert row.rows.exhaustive and row.rows.rows == 300 and row.rows.row_size == 6
    assert row.rows.count == len(twins) > 0
    for i, j, err in row.rows.examples:
        assert i < j and err == pytest.approx(np.abs(m[i] - m[j]).max()) and err <= TOL


def test_repeated_filters_of_a_conv_weight():
    w = torch.randn(16, 3, 3, 3, generator=_gen(3))
    w[9] = w[2]
    w[12] = w[5] + 0.0004
    rows = _row(_audit({"conv.weight": w}), "conv.weight").rows
    assert rows.count == 4
    assert [(i, j) for i, j, _ in rows.examples] == [(2, 9), (5, 12)]


def test_row_budget_makes_count_a_lower_bound():
    # distinct rows, all within the tolerance of each other: 1,225 candidate pairs
    w = torch.rand(50, 4, generator=_gen(20)) * TOL / 2
    rows = _row(_audit({"w": w}, row_pair_budget=10), "w").rows
    assert not rows.exhaustive and rows.count < 50
    full = _row(_audit({"w": w}), "w").rows
    assert full.exhaustive and full.count == 50


def test_identical_rows_cost_no_budget():
    w = torch.zeros(3000, 8)
    w[1500:] = 1.0
    rows = _row(_audit({"w": w}, row_pair_budget=0), "w").rows
    assert rows.exhaustive and rows.count == 3000
    assert [(i, j) for i, j, _ in rows.examples] == [(0, 1), (0, 2), (0, 3)]


@pytest.mark.slow
def test_repeated_rows_fast_on_an_embedding_sized_tensor():
    m = np.random.default_rng(0).normal(0, 0.05, (30522, 384)).astype(np.float32).astype(np.float64)
    planted = [(5, 30000), (17, 123), (2000, 2001)]
    for src, dst in planted:
        m[dst] = m[src] + 0.0005
    start = time.perf_counter()
    rows = _row_repeats(m, AuditConfig())
    elapsed = time.perf_counter() - start
    assert rows.exhaustive and rows.count == 6
    assert [(i, j) for i, j, _ in rows.examples] == sorted(planted)
    assert elapsed < 20  # all-pairs would compare 465M row pairs


# --- ties between tensors -------------------------------------------------------------------------

def _kinds(ties) -> set[tuple[str, str, str]]:
    return {(t.a, t.b, t.kind) for t in ties}


def _noise_with_rel_error(base: torch.Tensor, rel: float, seed: int) -> torch.Tensor:
    noise = torch.randn(base.shape, generator=_gen(seed), dtype=torch.float64)
    return base.double() + noise * (rel * base.double().norm() / noise.norm())


def test_duplicate_near_and_transposed_tensors_are_found():
    a = torch.randn(48, 32, generator=_gen(4), dtype=torch.float64)
    tensors = {
        "a": a,
        "copy": a.clone(),
        "near": _noise_with_rel_error(a, 0.5 * TOL, 5),
        "far": _noise_with_rel_error(a, 2 * TOL, 6),
        "aT": a.t().contiguous(),
        "aT_near": _noise_with_rel_error(a, 0.5 * TOL, 7).t().contiguous(),
        "other": torch.randn(48, 32, generator=_gen(8), dtype=torch.float64),
    }
    ties = find_tensor_ties(tensors, TOL)
    assert _kinds(ties) == {("a", "copy", "exact"), ("a", "near", "near"), ("a", "aT", "transposed"),
                            ("a", "aT_near", "transposed")}
    for t in ties:
        b = tensors[t.b].t() if t.kind == "transposed" else tensors[t.b]
        want = (a - b).norm() / max(a.norm(), tensors[t.b].norm())
        assert t.rel_error == pytest.approx(float(want), rel=1e-6, abs=1e-15)
    report = _audit(tensors)
    assert _kinds(report.ties) == _kinds(ties)


def _shift_with_rel_error(base: torch.Tensor, rel: float) -> torch.Tensor:
    # a constant shift is constant on every block, so the fingerprint grid sees all of it: the
    # tightest case for the candidate filter
    return base.double() + rel * base.double().norm() / math.sqrt(base.numel())


@pytest.mark.parametrize("shape", [(5000,), (40, 30), (12, 3, 5, 5), (33, 33)],
                         ids=["vector", "matrix", "conv", "square"])
@pytest.mark.parametrize("how", ["noise", "shift"])
def test_ties_just_inside_the_tolerance_are_never_missed(shape, how):
    a = torch.randn(shape, generator=_gen(9), dtype=torch.float64)
    make = (lambda t, seed: _noise_with_rel_error(t, 0.99 * TOL, seed)) if how == "noise" \
        else (lambda t, seed: _shift_with_rel_error(t, 0.99 * TOL))
    tensors = {"a": a, "b": make(a, 10)}
    if len(shape) == 2:
        tensors["c"] = make(a, 11).t().contiguous()
    kinds = {(t.a, t.b): t.kind for t in find_tensor_ties(tensors, TOL)}
    assert kinds[("a", "b")] == "near"
    assert len(shape) != 2 or kinds[("a", "c")] == "transposed"


def test_shared_parameter_is_counted_once():
    w = torch.randn(64, 32, generator=_gen(11))
    bias = torch.zeros(64)
    report = _audit({"emb.weight": w, "head.weight": w, "head.bias": bias},
                    aliases={"head.weight": "emb.weight"})
    assert report.totals.bytes == w.numel() * 4 + 64 * 4
    assert report.totals.stored_tensors == 2 and report.totals.tensors == 3
    assert TensorTie("emb.weight", "head.weight", "shared", 0.0) in report.ties
    head = _row(report, "head.weight")
    assert head.shared_with == "emb.weight" and head.merges == []
    assert all(s.kind == "merge" for s in report.savings)  # an existing share saves nothing more


def test_alias_missing_from_the_mapping_is_still_reported():
    w = torch.randn(40, 40, generator=_gen(12))
    report = _audit({"enc.weight": w}, aliases={"dec.weight": "enc.weight"})
    assert _row(report, "dec.weight").shared_with == "enc.weight"
    assert report.totals.bytes == w.numel() * 4


def test_totals_add_up():
    a = torch.randn(64, 64, generator=_gen(13))
    tensors = {"a": a, "a2": a.clone(), "b": torch.randn(128, 32, generator=_gen(14)),
               "bias": torch.randn(64), "aT": a.t().contiguous()}
    report = _audit(tensors)
    t = report.totals
    assert t.bytes == sum(x.numel() * 4 for x in tensors.values())
    assert t.tie_saved_bytes == 2 * a.numel() * 4  # a2 and aT stored as a
    for p in t.projected:
        merge_saved = sum(s.bytes_saved[p.bits] for s in report.savings if s.kind == "merge")
        tie_saved = sum(s.bytes_saved[p.bits] for s in report.savings if s.kind == "tie")
        assert p.bytes == t.bytes - merge_saved
        assert p.bytes_with_ties == p.bytes - tie_saved
        assert p.merged_tensors == 4  # a, a2, b, aT; the bias is under min_size
    widest = [s.bytes_saved[8] for s in report.savings]
    assert widest == sorted(widest, reverse=True)


def test_tensors_are_read_one_at_a_time_and_pairs_lazily():
    a = torch.randn(32, 32, generator=_gen(15))
    tensors = _CountingMapping({"a": a, "b": torch.randn(32, 32, generator=_gen(16)),
                                "near": _noise_with_rel_error(a, 0.5 * TOL, 17).float()})
    audit(_Loaded(tensors), AuditConfig())
    assert tensors.reads == {"a": 2, "b": 1, "near": 2}  # one pass, then only the candidate pair again


# --- config and JSON ------------------------------------------------------------------------------

def test_json_round_trip():
    a = torch.randn(40, 30, generator=_gen(18))
    a[7] = a[3]
    report = _audit({"a": a, "aT": a.t().contiguous(), "ids": torch.arange(5), "b": a.clone()},
                    aliases={"c": "a"})
    text = report.to_json()
    back = AuditReport.from_dict(json.loads(text))
    assert back == report
    assert back.to_json() == text
    assert json.loads(text)["version"] == REPORT_VERSION


def test_report_version_is_checked():
    d = _audit({"w": torch.ones(3)}).to_dict()
    d["version"] = 99
    with pytest.raises(BadInputError, match="audit report version 99 is not supported"):
        AuditReport.from_dict(d)


def test_config_from_dict_rejects_unknown_keys_and_bad_values():
    assert AuditConfig.from_dict({"tolerance": 0.01, "bits": [2, 4]}).bits == (4, 2)
    assert AuditConfig.from_dict(AuditConfig().to_dict()) == AuditConfig()
    with pytest.raises(BadInputError, match="unknown key 'tolerence'"):
        AuditConfig.from_dict({"tolerence": 0.01})
    bad_tolerance = r"`tolerance` must be a finite number >= 0, got -1"
    with pytest.raises(BadInputError, match=bad_tolerance):
        AuditConfig(tolerance=-1)
    with pytest.raises(BadInputError, match="bits must be a non-empty list of integers 1..16"):
        AuditConfig(bits=(0,))
    with pytest.raises(BadInputError, match="min_size must be an integer >= 0"):
        AuditConfig(min_size=-5)


# --- rendering ------------------------------------------------------------------------------------

def test_table_and_markdown_read_well():
    from rich.console import Console

    a = torch.randn(300, 64, generator=_gen(19))
    report = _audit({"fc1.weight": a, "fc1.bias": torch.randn(300), "copy.weight": a.clone()})
    console = Console(record=True, width=200)
    console.print(report.to_table())
    text = console.export_text()
    md = report.to_markdown()
    for out in (text, md):
        assert "fc1.weight" in out and "copy.weight" in out and "exact" in out and "KiB" in out
        assert " MB" not in out and " KB" not in out
        assert out.index("fc1.weight") < out.index("fc1.bias")  # largest first
    assert "| tensor | shape |" in md and "|---|" in md
    short = report.to_markdown(top=1)
    assert "2 more tensors not shown" in short


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1,023 B"
    assert format_bytes(1234567) == "1,234,567 B (1.18 MiB)"
    assert format_iec(1024 ** 3 * 3) == "3.00 GiB"
    assert format_iec(1024 * 1024 - 1) == "1.00 MiB"
    assert format_iec(-2048) == "-2.00 KiB"


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    import sys

    from compress.plot import plot_audit

    report = _audit({"w": torch.randn(40, 40)})
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(CompressError, match=r"pip install 'compress\[plot\]'"):
        plot_audit(report, {"w": torch.randn(40, 40)}, tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


# --- the real loader, samples and the CLI ---------------------------------------------------------

class _TiedTwoParameters(torch.nn.Module):
    """An autoencoder whose decoder holds its own copy of the encoder weight, transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(64, 32)
        self.decoder = torch.nn.Linear(32, 64)
        with torch.no_grad():
            self.decoder.weight.copy_(self.encoder.weight.t())

    def forward(self, x):
        return self.decoder(torch.sigmoid(self.encoder(x)))


def _run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_table(samples_dir):
    result = _run("audit", samples_dir / "digits_mlp.pt2")
    assert result.exit_code == 0, result.output
    assert "fc2.weight" in result.output and "merged to 4 bits" in result.output


def test_cli_json_to_stdout_is_only_json(samples_dir):
    result = _run("audit", samples_dir / "digits_mlp.pt2", "--json", "-")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["version"] == REPORT_VERSION and data["kind"] == "pt2"
    names = {f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    assert {t["name"] for t in data["tensors"]} == names
    assert data["totals"]["parameters"] == 50_610


def test_cli_json_file_is_written_and_not_overwritten(samples_dir, tmp_path):
    out = tmp_path / "audit.json"
    assert _run("audit", samples_dir / "digits_cnn.pt2", "--json", out, "--tolerance", "0.01").exit_code == 0
    assert json.loads(out.read_text())["config"]["tolerance"] == 0.01
    again = _run("audit", samples_dir / "digits_cnn.pt2", "--json", out)
    assert again.exit_code == 2 and "already exists; pass --force" in again.stderr


def test_cli_markdown(samples_dir):
    result = _run("audit", samples_dir / "digits_gru.pt2", "--markdown", "--top", "3")
    assert result.exit_code == 0
    assert "| `cell.weight_hh` | 192x64 | float32 |" in result.stdout
    assert "more tensors not shown" in result.stdout


def test_cli_plot_writes_a_png(samples_dir, tmp_path):
    out = tmp_path / "hist.png"
    result = _run("audit", samples_dir / "digits_gru.pt2", "--plot", out)
    assert result.exit_code == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_cli_missing_file_is_one_line(tmp_path):
    result = _run("audit", tmp_path / "nope.pt2")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.pt2" in lines[0]


def test_cli_json_stdout_and_markdown_conflict(samples_dir):
    result = _run("audit", samples_dir / "digits_mlp.pt2", "--json", "-", "--markdown")
    assert result.exit_code == 2 and "choose one" in result.stderr


def test_autoencoder_transpose_is_found(samples_dir):
    from compress.io import load

    report = audit(load(samples_dir / "digits_autoencoder.pt2"), AuditConfig())
    assert TensorTie("encoder.weight", "encoder.weight.T", "shared", 0.0) in report.ties
    assert report.totals.tie_saved_bytes == 0  # one storage already


def test_two_parameter_transposed_copy_is_found(tmp_path):
    model = _TiedTwoParameters().eval()
    path = tmp_path / "tied.pt2"
    torch.export.save(torch.export.export(model, (torch.rand(2, 64),)), path)
    result = _run("audit", path, "--json", "-")
    data = json.loads(result.stdout)
    tie = {"a": "encoder.weight", "b": "decoder.weight", "kind": "transposed", "rel_error": 0.0}
    assert tie in data["ties"]
    assert data["totals"]["tie_saved_bytes"] == 32 * 64 * 4


def test_onnx_with_a_folded_transpose_is_found(tmp_path):
    # what the dynamo exporter writes for the tied autoencoder: the transpose folded into a copy
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = torch.randn(32, 64, generator=_gen(21)).numpy()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "t"], ["y"])],
        "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(w.T.copy(), "t")])
    path = tmp_path / "tied.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    data = json.loads(_run("audit", path, "--json", "-").stdout)
    assert data["kind"] == "onnx"
    assert data["ties"] == [{"a": "w", "b": "t", "kind": "transposed", "rel_error": 0.0}]
    assert data["totals"]["tie_saved_bytes"] == w.nbytes
