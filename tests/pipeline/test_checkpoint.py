"""Streaming tie and audit of sharded safetensors checkpoints (compress.stream)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compress.atomic import TMP_PREFIX
from compress.auditing import AuditConfig, audit
from compress.errors import BadInputError
from compress.export.sharded import INDEX_NAME
from compress.io import is_safetensors_checkpoint, load, open_checkpoint
from compress.io import load_codebook_checkpoint as load_sharded
from compress.io import load_codebook_safetensors as load_safetensors
from compress.pipeline import StreamResult, audit_checkpoint, output_dir_for, tie_checkpoint, workers
from compress.pipeline import checkpoint as stream
from compress.pipeline.checkpoint import REPORT_NAME
from compress.tying import TieConfig, analyze, current_weight, merge_

# --- a small sharded checkpoint: 3 shards, 13 stored tensors, one storage alias ---------------------

def _tensors() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    embed = randn(64, 32)
    return [
        {"embed.weight": embed, "layers.0.attn.weight": randn(32, 32), "layers.0.attn.bias": randn(32),
         "layers.0.norm.weight": 1 + randn(32)},
        {"layers.1.mlp.weight": randn(64, 48, dtype=torch.bfloat16), "layers.1.mlp.bias": randn(64, dtype=torch.bfloat16),
         "layers.1.proj.weight": randn(48, 40, dtype=torch.float16),
         "position_ids": torch.arange(128, dtype=torch.int64).reshape(1, 128),
         "embed_copy.weight": embed.clone(), "conv.weight": randn(32, 8, 3, 3)},
        {"head.weight": randn(100, 32), "small.weight": randn(8, 8), "counts": torch.arange(10, dtype=torch.int32),
         "embed_t.weight": embed.t().contiguous()},
    ]


STORAGE_ALIAS = ("lm_head.weight", "embed.weight")  # written like safetensors' save_model: dropped -> kept


def _write_checkpoint(folder: Path, shards: list[dict[str, torch.Tensor]] | None = None,
                      shard_names: list[str] | None = None) -> Path:
    shards = shards or _tensors()
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = (shard_names or [])[i] if shard_names else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        meta = {"format": "pt"}
        if STORAGE_ALIAS[1] in tensors:
            meta[STORAGE_ALIAS[0]] = STORAGE_ALIAS[1]
        save_file(tensors, str(folder / Path(name).name), metadata=meta)
        weight_map.update({n: name for n in tensors})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return _write_checkpoint(tmp_path / "ckpt")


def _in_memory(cfg: TieConfig):
    """The reference: every tensor in one nn.Module, then the library's own analyze + merge_."""
    model = nn.Module()
    for shard in _tensors():
        for name, t in shard.items():
            owner, attr = _owner(model, name)
            if t.is_floating_point():
                owner.register_parameter(attr, nn.Parameter(t.clone(), requires_grad=False))
            else:
                owner.register_buffer(attr, t.clone())
    owner, attr = _owner(model, STORAGE_ALIAS[0])
    owner.register_parameter(attr, _owner(model, STORAGE_ALIAS[1])[0].weight)
    plan = analyze(model, cfg)
    codebooks = merge_(model, plan)
    names = [n for shard in _tensors() for n in shard] + [STORAGE_ALIAS[0]]
    return {n: current_weight(model, n).detach() for n in names}, codebooks, plan


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, attr = name.split(".")
    module = model
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    return module, attr


def _stored_codebooks(out: Path) -> dict[str, torch.Tensor]:
    found = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            found.update({k[: -len(".codebook")]: f.get_tensor(k) for k in f.keys() if k.endswith(".codebook")})  # noqa: SIM118
    return found


def _row_blocks(t: torch.Tensor, cb) -> list[torch.Tensor]:
    """The values each codebook row serves: the whole tensor, each row, or each group of rows."""
    size = {"tensor": t.shape[0], "channel": 1, "group": cb.group_size}[cb.granularity]
    return list(t.reshape(t.shape[0], -1).split(size))


# --- equal to the in-memory path ------------------------------------------------------------------

CONFIGS = [
    TieConfig(bits=3),
    TieConfig(bits=2, granularity="channel", exclude=["head.*"]),
    TieConfig(bits=4, granularity="group", group_size=5, by_name={"conv.*": {"bits": 1}}),
    TieConfig(tolerance=0.01, include=["layers.0.norm.weight"]),
]
CONFIG_IDS = ["3bit-tensor", "2bit-channel-exclude", "4bit-group-by-name", "tolerance-include"]


def _assert_equal_to_in_memory(ckpt: Path, out: Path, cfg: TieConfig) -> None:
    result = tie_checkpoint(ckpt, out, cfg, workers=1)
    got = load_sharded(out / INDEX_NAME)
    expected, codebooks, plan = _in_memory(cfg)

    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert torch.equal(got[name], value), f"{name} differs from the in-memory merge"
    stored = _stored_codebooks(out)
    assert sorted(stored) == sorted(codebooks.tensors) == sorted(t.name for t in plan.clustered())
    for name, cb in codebooks.tensors.items():
        assert stored[name].dtype == cb.codebook.dtype and torch.equal(stored[name], cb.codebook), name
        row = result.tensor(name)
        assert (row.action, row.k, row.bits) == ("cluster", cb.k, cb.bits)
        assert max(len(torch.unique(block)) for block in _row_blocks(got[name], cb)) <= cb.k
        rms = float((got[name].double() - _original(name).double()).square().mean().sqrt())
        assert row.rms_error == pytest.approx(rms, rel=1e-9, abs=1e-12)
    aliases = {t.name: (t.target, t.transpose) for t in result.tensors if t.action == "alias"}
    assert aliases == {a.name: (a.target, a.transpose) for a in codebooks.aliases.values()}


def _original(name: str) -> torch.Tensor:
    return next(shard[name] for shard in _tensors() if name in shard)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_equals_the_in_memory_path(ckpt, tmp_path, cfg):
    _assert_equal_to_in_memory(ckpt, tmp_path / "out", cfg)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_labels_and_packing_in_small_blocks_change_nothing(ckpt, tmp_path, cfg, monkeypatch):
    # real tensors are assigned and packed a block at a time; make the blocks tiny here
    monkeypatch.setattr(workers, "_CHUNK", 64)
    monkeypatch.setattr(workers, "_PACK_CHUNK", 16)
    _assert_equal_to_in_memory(ckpt, tmp_path / "out", cfg)


def test_kept_tensors_are_copied_byte_for_byte(ckpt, tmp_path):
    result = tie_checkpoint(ckpt, tmp_path / "out", TieConfig(bits=2, exclude=["head.*"]), workers=1)
    got = load_sharded(tmp_path / "out" / INDEX_NAME)
    originals = {n: t for shard in _tensors() for n, t in shard.items()}
    reasons = {t.name: t.reason for t in result.tensors if t.action == "keep"}
    assert reasons == {"layers.0.attn.bias": "bias", "layers.0.norm.weight": "small (< 1024 elements)",
                       "layers.1.mlp.bias": "bias", "position_ids": "int64 dtype (not floating point)",
                       "head.weight": "excluded by 'head.*'", "small.weight": "small (< 1024 elements)",
                       "counts": "int32 dtype (not floating point)"}
    for name in reasons:
        assert got[name].dtype == originals[name].dtype and torch.equal(got[name], originals[name]), name
    # the exact copy and the storage alias are stored once, as the tensor they repeat
    assert result.tensor("embed_copy.weight").action == "alias"
    assert result.tensor("embed_copy.weight").target == "embed.weight"
    assert torch.equal(got["lm_head.weight"], got["embed.weight"])
    assert result.bytes_after < result.bytes_before / 3


# --- determinism, shards, index -------------------------------------------------------------------

@pytest.mark.slow
def test_output_does_not_depend_on_the_number_of_workers(ckpt, tmp_path):
    cfg = TieConfig(bits=3, granularity="channel")
    one = tie_checkpoint(ckpt, tmp_path / "one", cfg, workers=1, max_shard_bytes=4096)
    two = tie_checkpoint(ckpt, tmp_path / "two", cfg, workers=2, max_shard_bytes=4096)
    assert len(one.shards) >= 3 and one.shards == two.shards
    for name in [*one.shards, INDEX_NAME]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert (one.workers, two.workers) == (1, 2)
    assert two.worker_peak_rss_bytes > 0
    strip = ("peak_rss_bytes", "worker_peak_rss_bytes", "seconds", "workers", "out_dir")
    assert ({k: v for k, v in one.to_dict().items() if k not in strip}
            == {k: v for k, v in two.to_dict().items() if k not in strip})


def test_every_shard_is_a_codebook_file_and_the_index_lists_them(ckpt, tmp_path):
    out = tmp_path / "out"
    result = tie_checkpoint(ckpt, out, TieConfig(bits=4), workers=1, max_shard_bytes=3000)
    index = json.loads((out / INDEX_NAME).read_text())
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([*result.shards, INDEX_NAME, REPORT_NAME])
    assert result.shards == [f"model-{i:05d}-of-{len(result.shards):05d}.safetensors"
                             for i in range(1, len(result.shards) + 1)]
    union = {}
    for shard in result.shards:
        tensors = load_safetensors(out / shard)  # each shard on its own, by the exporter's reader
        assert tensors and not set(tensors) & set(union)
        union.update(tensors)
        with safe_open(str(out / shard), framework="pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
    assert set(union) == set(index["metadata"]["compress.tensors"]) == {t.name for t in result.tensors}
    for name, shard in index["metadata"]["compress.tensors"].items():
        assert result.tensor(name).shard == shard
    assert index["metadata"]["compress.format"] == "codebook"
    assert index["metadata"]["total_size"] == result.bytes_after
    assert result.file_bytes == sum((out / n).stat().st_size for n in [*result.shards, INDEX_NAME])
    assert StreamResult.from_dict(json.loads((out / REPORT_NAME).read_text())) == result


def test_a_single_safetensors_file_streams_too(tmp_path):
    tensors = _tensors()[0]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={STORAGE_ALIAS[0]: STORAGE_ALIAS[1]})
    result = tie_checkpoint(tmp_path / "model.safetensors", tmp_path / "out", TieConfig(bits=2), workers=1)
    got = load_sharded(tmp_path / "out" / INDEX_NAME)
    assert result.tensor("embed.weight").action == "cluster"
    assert len(torch.unique(got["embed.weight"])) <= 4
    assert got["lm_head.weight"] is got["embed.weight"]
    assert torch.equal(got["layers.0.attn.bias"], tensors["layers.0.attn.bias"])


def test_result_round_trips_and_refuses_unknown_keys(ckpt, tmp_path):
    result = tie_checkpoint(ckpt, tmp_path / "out", TieConfig(bits=2), workers=1)
    assert StreamResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    with pytest.raises(BadInputError, match="stream result: unknown key 'extra'"):
        StreamResult.from_dict({**result.to_dict(), "extra": 1})
    with pytest.raises(BadInputError, match="stream result version 9 is not supported"):
        StreamResult.from_dict({**result.to_dict(), "version": 9})
    console = Console(file=io.StringIO(), width=200)
    console.print(result.to_table())
    text = console.file.getvalue()
    assert "embed.weight" in text and "keep (bias)" in text and "main" in text


# --- nothing written on failure; refusals ---------------------------------------------------------

@pytest.mark.slow
def test_a_failing_worker_leaves_no_output(tmp_path):
    shards = _tensors()
    shards[2]["head.weight"][3, 4] = float("nan")
    index = _write_checkpoint(tmp_path / "ckpt", shards)
    with pytest.raises(BadInputError, match=r"`head.weight` has 1 NaN/Inf values; clean the checkpoint or "
                                            r"pass exclude=\['head.weight'\]"):
        tie_checkpoint(index, tmp_path / "out", TieConfig(bits=2), workers=2, max_shard_bytes=2000)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_shard_paths_outside_the_index_folder_are_refused(tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"w": torch.zeros(4)}, str(outside))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(BadInputError, match=r"shard '../elsewhere.safetensors' is outside the index's folder; "
                                            "refused"):
        tie_checkpoint(index, tmp_path / "out", TieConfig(), workers=1)
    with pytest.raises(BadInputError, match="outside the index's folder"):
        load_sharded(index)
    assert not (tmp_path / "out").exists()


def test_a_tampered_output_index_is_refused(ckpt, tmp_path):
    out = tmp_path / "out"
    tie_checkpoint(ckpt, out, TieConfig(bits=2), workers=1, max_shard_bytes=3000)
    index = json.loads((out / INDEX_NAME).read_text())
    placed = index["metadata"]["compress.tensors"]
    assert placed["embed.weight"] != placed["head.weight"]
    placed["embed.weight"] = placed["head.weight"]
    (out / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(BadInputError, match=f"holds 'embed.weight', which the index places in {placed['head.weight']}"):
        load_sharded(out / INDEX_NAME)
    del placed["embed.weight"]
    (out / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(BadInputError, match="holds 'embed.weight', which the index does not list"):
        load_sharded(out / INDEX_NAME)


def test_output_folder_rules(ckpt, tmp_path):
    out = tmp_path / "out"
    tie_checkpoint(ckpt, out, TieConfig(bits=2), workers=1)
    with pytest.raises(BadInputError, match="already exists; pass force=True to replace it"):
        tie_checkpoint(ckpt, out, TieConfig(bits=2), workers=1)
    again = tie_checkpoint(ckpt, out, TieConfig(bits=1), workers=1, force=True)  # our own output: replaced
    assert json.loads((out / INDEX_NAME).read_text())["metadata"]["compress.config"]["bits"] == 1
    assert again.tensor("embed.weight").bits == 1
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(BadInputError, match="is not a folder written by tie_checkpoint; refusing to replace it"):
        tie_checkpoint(ckpt, other, TieConfig(), workers=1, force=True)
    assert (other / "cat.jpg").read_bytes() == b"meow"
    with pytest.raises(BadInputError, match="the output folder would hold the input"):
        tie_checkpoint(ckpt, ckpt.parent, TieConfig(), workers=1, force=True)
    with pytest.raises(BadInputError, match="already a codebook checkpoint written by compress"):
        tie_checkpoint(out / INDEX_NAME, tmp_path / "again", TieConfig(), workers=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


@pytest.mark.parametrize("cfg, message", [
    (TieConfig(importance=True), "importance weighting needs a model and calibration data"),
    (TieConfig(by_type={"Linear": {"bits": 2}}), r"by_type overrides \(Linear\) need module types"),
], ids=["importance", "by_type"])
def test_settings_a_checkpoint_cannot_honour_are_refused(ckpt, tmp_path, cfg, message):
    with pytest.raises(BadInputError, match=message):
        tie_checkpoint(ckpt, tmp_path / "out", cfg)


def test_storage_name_clash_is_refused(tmp_path):
    shards = _tensors()
    shards[2]["embed.weight.codebook"] = torch.zeros(3)
    index = _write_checkpoint(tmp_path / "ckpt", shards)
    with pytest.raises(BadInputError, match=r"would both be stored as 'embed.weight.codebook'"):
        tie_checkpoint(index, tmp_path / "out", TieConfig(), workers=1)


def test_inputs_that_are_not_safetensors_are_refused(tmp_path):
    bad = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, bad)
    with pytest.raises(BadInputError, match="not a .safetensors file or a \\*.safetensors.index.json"):
        tie_checkpoint(bad, tmp_path / "out")
    with pytest.raises(BadInputError, match="file not found"):
        tie_checkpoint(tmp_path / "missing.safetensors", tmp_path / "out")
    assert not is_safetensors_checkpoint(bad)
    assert output_dir_for("llm/model.safetensors.index.json", "compressed") == Path("compressed/model.tied")


# --- audit streams --------------------------------------------------------------------------------

def _mapped(paths: list[Path]) -> set[str]:
    maps = Path("/proc/self/maps").read_text()
    return {p.name for p in paths if str(p.resolve()) in maps}


def test_audit_streams_and_equals_the_loaded_audit(ckpt):
    cfg = AuditConfig(bits=(4,))
    streamed = audit_checkpoint(ckpt, cfg, progress=False)
    loaded = audit(load(ckpt), cfg, progress=False)
    drop = ("seconds",)
    assert ({k: v for k, v in streamed.to_dict().items() if k not in drop}
            == {k: v for k, v in loaded.to_dict().items() if k not in drop})
    assert open_checkpoint(ckpt).describe() == load(ckpt).describe()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_reading_every_tensor_leaves_no_shard_mapped(ckpt):
    shards = sorted(ckpt.parent.glob("model-*.safetensors"))
    lazy = open_checkpoint(ckpt).tensors
    for name in lazy:
        assert lazy[name].numel() >= 0
    assert _mapped(shards) == set()  # each map closed with its tensor
    held = load(ckpt).tensors  # compress.io keeps a handle, and its map, per shard
    for name in held:
        assert held[name].numel() >= 0
    assert _mapped(shards) == {s.name for s in shards}


def test_default_workers_fit_in_available_memory(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "_available_memory", lambda: 1)  # room for no worker at all: one, in-process
    assert tie_checkpoint(ckpt, tmp_path / "out", TieConfig(bits=2)).workers == 1
    with pytest.raises(BadInputError, match="workers must be a positive integer, got 0"):
        tie_checkpoint(ckpt, tmp_path / "other", TieConfig(bits=2), workers=0)
