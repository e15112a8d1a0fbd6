"""Soft tying and fine-tuning across 2 processes (gloo, CPU) against a single process, and failing ranks.

The workers live in tests/_distributed_fixtures.py; each is one rank of a gloo process group on a
free local port, started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compress.errors import BadInputError
from compress.tying import distributed
from compress.tying.distributed import Group, RankFailedError
from tests.helpers import ROOT
from tests.helpers.distributed import SCENARIOS, free_port, run_scenario

_BOUND_S = 30  # a failing run must end well within this; a hang would run to the 120 s kill


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env | extra


def _ranks(mode: str, out: Path, world: int = 2) -> tuple[list[int], list[str], float]:
    """Start `world` worker processes; their exit codes, outputs and the seconds until all ended."""
    port = str(free_port())
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.helpers.distributed", mode, str(out)], cwd=ROOT,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outputs, time.perf_counter() - started


# --- two ranks against one process ------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Every scenario fine-tuned by 2 gloo ranks (one launch); the folder of their results."""
    out = tmp_path_factory.mktemp("two_ranks")
    codes, outputs, _ = _ranks("match", out)
    assert codes == [0, 0], "\n".join(outputs)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_give_the_single_process_result_and_hold_the_same_plan_at_every_step(two_ranks, name):
    ranks = [torch.load(two_ranks / f"{name}.rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = run_scenario(SCENARIOS[name])
    # the plan: computed on each rank, identical to the single process's (proved by its digest)
    assert ranks[0]["plan"] == ranks[1]["plan"] == single["plan"]
    # soft-tie state (centres, or the mixture prior) after every step: identical bits on both ranks
    assert ranks[0]["steps"].shape == single["steps"].shape and len(single["steps"]) == 2 * 6
    assert torch.equal(ranks[0]["steps"], ranks[1]["steps"])
    torch.testing.assert_close(ranks[0]["steps"], single["steps"], rtol=0, atol=1e-6)
    # the merged model and its codebooks: identical on both ranks, equal to the single process's
    for key, value in single["state"].items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        if value.is_floating_point():
            torch.testing.assert_close(ranks[0]["state"][key], value, rtol=0, atol=1e-6)
        else:
            assert torch.equal(ranks[0]["state"][key], value), key  # the codebook indices
    assert single["codebooks"].keys() == ranks[0]["codebooks"].keys() == {"fc1.weight", "fc2.weight"}
    for tensor, (values, indices) in single["codebooks"].items():
        for r in ranks:
            torch.testing.assert_close(r["codebooks"][tensor][0], values, rtol=0, atol=1e-6)
            assert torch.equal(r["codebooks"][tensor][1], indices)
    # the DDP / FSDP wrappers are gone when finetune_ returns
    assert ranks[0]["left"] == ranks[1]["left"] == []
    # the loss each rank logs is the global batch's
    for mine, theirs in zip(ranks[0]["history"], single["history"]):
        assert mine["phase"] == theirs["phase"]
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-6)
        assert mine["penalty"] == pytest.approx(theirs["penalty"], rel=1e-9, abs=1e-9)


# --- a failing rank ends the run --------------------------------------------------------------------

@pytest.mark.slow
def test_a_rank_that_raises_makes_every_rank_raise_its_error_without_a_launcher(tmp_path):
    codes, outputs, seconds = _ranks("raise", tmp_path)
    assert codes == [1, 1], "\n".join(outputs)
    assert seconds < _BOUND_S
    assert (tmp_path / "rank1.error").read_text() == "ValueError: rank 1 cannot go on"
    assert (tmp_path / "rank0.error").read_text() == (
        "RankFailedError: rank 1 failed in soft-tying epoch 1: ValueError: rank 1 cannot go on")


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_torchrun_run_with_an_error(tmp_path):
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "tests.helpers.distributed", "crash", str(tmp_path)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode != 0
    assert time.perf_counter() - started < _BOUND_S
    assert "exitcode  : 3" in run.stderr  # torchrun's summary names the rank that died
    assert not (tmp_path / "rank1.error").exists()  # it died without unwinding


# --- `compress tie --nproc 2` -------------------------------------------------------------------------

@pytest.mark.slow
def test_tie_with_nproc_2_writes_what_one_process_writes(tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from cli.main import cli
    from tests.helpers.models import save_data, save_pt2, trained_two_layer

    model, data = trained_two_layer(steps=3)
    pt2 = save_pt2(model, data.calib_inputs[:4], tmp_path / "tiny.pt2")
    dat = save_data(tmp_path / "tiny_data.pt", data.calib_inputs, data.calib_targets, data.test_inputs,
                    data.test_targets)
    args = ["tie", str(pt2), "--data", str(dat), "--bits", "2", "--epochs", "3", "--no-onnx"]
    one = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "one")], catch_exceptions=False)
    assert one.exit_code == 0, one.output
    two = subprocess.run([sys.executable, "-m", "cli", *args, "-o", str(tmp_path / "two"), "--nproc", "2"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("files written") == 1  # rank 0 alone prints and writes
    names = ["tiny.plan.json", "tiny.report.json", "tiny.safetensors", "tiny.tied.pt2"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    assert (tmp_path / "one" / "tiny.plan.json").read_text() == (tmp_path / "two" / "tiny.plan.json").read_text()
    a, b = load_file(tmp_path / "one" / "tiny.safetensors"), load_file(tmp_path / "two" / "tiny.safetensors")
    assert a.keys() == b.keys() and "fc1.weight.indices" in a
    for key in a:  # float32: only the order of the gradient sums differs
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_tie_nproc_needs_data(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    result = CliRunner().invoke(cli, ["tie", str(tmp_path / "model.pt2"), "--nproc", "2"])
    assert result.exit_code == 2
    assert result.output == "error: --nproc runs the fine-tuning in several processes; it needs --data FILE\n"


# --- the pieces, in one process -----------------------------------------------------------------------

@pytest.mark.parametrize(("world", "size"), [(2, 19), (2, 1), (3, 16), (4, 3)], ids=str)
def test_ranks_take_disjoint_contiguous_parts_of_each_global_batch(world, size):
    idx = torch.randperm(50)[:size]
    parts = [Group(r, world).shard(idx) for r in range(world)]
    assert torch.equal(torch.cat(parts), idx)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize(("world", "rows"), [(2, 32), (2, 4), (3, 32), (4, 3)], ids=str)
def test_owned_rows_follow_fsdp_chunking(world, rows):
    chunks = torch.arange(rows).chunk(world)
    for r in range(world):
        owned = torch.arange(rows)[Group(r, world).rows(rows)]
        assert torch.equal(owned, chunks[r] if r < len(chunks) else torch.arange(0))


def test_a_single_process_runs_without_a_process_group():
    with distributed.session() as group:
        assert (group.rank, group.world, group.active) == (0, 1, False)
        assert group.agree(None, [2.5], "here") == [2.5]
        with pytest.raises(BadInputError, match="mine"):
            group.agree(BadInputError("mine"), [0.0], "here")
    assert distributed.is_main()


def test_error_messages_cross_ranks_as_bytes_with_their_exit_code():
    blob = distributed._encode_error(BadInputError("`fc1.weight` ünïcode " + "x" * 5000))
    code, text = distributed._decode_error(blob)
    assert code == 2 and text.startswith("`fc1.weight` ünïcode xxx") and len(text.encode()) <= 2044
    assert distributed._decode_error(distributed._encode_error(None)) is None
    assert distributed._decode_error(distributed._encode_error(KeyError("k"))) == (1, "KeyError: 'k'")
    assert RankFailedError("rank 1 failed", 2).exit_code == 2
