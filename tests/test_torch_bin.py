"""pytorch_model.bin checkpoints, read without running pickle code.

Real files are written by torch itself: transformers 5 always saves safetensors, so the .bin layout of
transformers 4's `save_pretrained(safe_serialization=False)` (pytorch_model.bin, or pytorch_model-i-of-n.bin
shards with pytorch_model.bin.index.json) is written with huggingface_hub's `save_torch_state_dict`, which
torch.saves the shards. The reference for the weights is the safetensors save of the same model; for tensor
layouts, torch's own tensors; for generation, transformers' greedy tokens from the same .bin directory.
Hostile files are checked to really run code under `torch.load(weights_only=False)`, and to run nothing here.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub
import numpy as np
import pytest
import torch
import transformers
from huggingface_hub import save_torch_state_dict
from huggingface_hub.utils import filter_repo_objects

from converters import CheckpointError, load_checkpoint
from converters.torch_bin import TorchBinSource
from hdex_jax import hub
from hdex_jax.tools import AutoCompiler
from hdex_jax.transformers import AutoModelForCausalLM
from tests.helpers_tiny import save_tiny_tokenizer, tiny_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_bin(model: torch.nn.Module, directory: Path, shards: bool = False) -> Path:
    """`model` as transformers 4's save_pretrained(safe_serialization=False) left it: config.json and
    pytorch_model.bin, or (`shards`) several pytorch_model-i-of-n.bin files and pytorch_model.bin.index.json."""
    directory.mkdir(parents=True)
    model.config.save_pretrained(directory)
    save_torch_state_dict(model.state_dict(), directory, safe_serialization=False,
                          max_shard_size="40KB" if shards else "5GB")
    return directory


def _bin_dir(tmp_path: Path, state: Any, name: str = "ckpt") -> Path:
    """A checkpoint directory with a tiny OPT config and `state` torch.saved as its pytorch_model.bin."""
    directory = tmp_path / name
    directory.mkdir()
    transformers.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                           num_attention_heads=4).save_pretrained(directory)
    torch.save(state, directory / "pytorch_model.bin")
    return directory


def _rewrite_members(path: Path, change: Callable[[str, bytes], bytes]) -> None:
    """Rewrite the zip archive `path` with every member's bytes passed through `change(name, data)`."""
    with zipfile.ZipFile(path) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members:
            archive.writestr(name, change(name, data))


def _replace_member(path: Path, suffix: str, data: bytes) -> None:
    """Replace the one member of `path` whose name ends with `suffix` by `data`."""
    _rewrite_members(path, lambda name, old: data if name.endswith(suffix) else old)


# ------------------------------------------------------------------------------------ real checkpoints


@pytest.mark.parametrize("shards", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_bin_converts_exactly_like_safetensors(tmp_path: Path, family: str, dtype: str, shards: bool) -> None:
    model = tiny_model(family).to(DTYPES[dtype])
    model.save_pretrained(tmp_path / "safetensors")
    directory = save_bin(model, tmp_path / "bin", shards=shards)
    assert not list(directory.glob("*.safetensors"))
    if shards:
        assert (directory / "pytorch_model.bin.index.json").is_file()
        assert len(list(directory.glob("pytorch_model-*-of-*.bin"))) > 1
    cfg_bin, from_bin = load_checkpoint(directory)
    cfg_st, from_st = load_checkpoint(tmp_path / "safetensors")
    assert cfg_bin == cfg_st and from_bin.keys() == from_st.keys()
    for name, value in from_st.items():
        assert from_bin[name].dtype == np.float32
        np.testing.assert_array_equal(from_bin[name], value, err_msg=name)


def test_strided_views_and_dtypes_read_as_torch_has_them(tmp_path: Path) -> None:
    # torch.save keeps a view's whole storage with its offset and strides; shared storages are saved once.
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    tensors = {
        "transposed": x.t(), "row": x[2], "column_slice": x[:, 1:5:2], "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3), "half_view": x.half()[1:, ::3], "bf16_transposed": x.bfloat16().t(),
        "double": x.double()[3], "int64": torch.arange(-3, 3), "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False]),
        "parameter": torch.nn.Parameter(x[1:3]),  # pickled through torch._utils._rebuild_parameter
    }
    source = TorchBinSource(_bin_dir(tmp_path, tensors))
    assert source.names() == list(tensors)
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(source.read(name), tensor.detach().float().numpy(), err_msg=name)
        assert source.read(name).dtype == np.float32 and source.read(name).flags.c_contiguous


def test_big_endian_byteorder_is_honoured(tmp_path: Path) -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 3
    directory = _bin_dir(tmp_path, {"w": x.t()})
    # What torch writes on a big-endian machine: the byteorder record says so and every item is byte-swapped.
    _rewrite_members(directory / "pytorch_model.bin", lambda name, data: (
        b"big" if name.endswith("/byteorder") else
        np.frombuffer(data, "<f4").astype(">f4").tobytes() if "/data/" in name else data))
    np.testing.assert_array_equal(TorchBinSource(directory).read("w"), x.t().numpy())


def test_compile_and_generate_from_a_bin_only_checkpoint(home: Path, tmp_path: Path) -> None:
    directory = save_bin(tiny_model("llama", seed=3), tmp_path / "tiny-llama-bin")
    save_tiny_tokenizer(directory)
    assert not list(directory.glob("*.safetensors"))
    AutoCompiler().compile(str(directory), num_device=1, max_length=64)
    model = AutoModelForCausalLM.from_pretrained(str(directory), device_map={"lpu": 1})
    prompt = [3, 17, 42, 9, 5]
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():  # both stop at the same eos, if one comes
        expected = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                                      pad_token_id=0)[0].tolist()
    assert model.generate(prompt, max_new_tokens=12, do_sample=False, repetition_penalty=1.0) == expected


# ------------------------------------------------------------------------------------ hostile files


class _Call:
    """Pickles as a call of `func(*args)`: what a hostile checkpoint hides among its tensors, or a tensor record
    written by hand."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.func, self.args


PAYLOADS = {
    "os.system": (lambda marker: _Call(os.system, f"touch {marker}"), r"(os|posix)\.system"),
    # torch.save's pickle protocol 2 spells the builtins module as Python 2 did, __builtin__.
    "builtins.exec": (lambda marker: _Call(exec, f"open({str(marker)!r}, 'w').close()"),
                      r"(__builtin__|builtins)\.exec"),
}


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "in-a-shard"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_bin_that_runs_code_is_refused_and_runs_nothing(tmp_path: Path, payload: str, sharded: bool) -> None:
    make, record = PAYLOADS[payload]
    marker = tmp_path / "marker"
    if sharded:
        directory = save_bin(tiny_model("opt"), tmp_path / "ckpt", shards=True)
        file = sorted(directory.glob("pytorch_model-*.bin"))[1]
        torch.save({**torch.load(file, weights_only=True), "evil": make(marker)}, file)
    else:
        directory = _bin_dir(tmp_path, {"model.decoder.embed_tokens.weight": torch.zeros(128, 64),
                                        "evil": make(marker)})
        file = directory / "pytorch_model.bin"
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(file))}.*{record}.*nothing in it was run"):
        load_checkpoint(directory)
    assert not marker.exists()
    # The file is really hostile: unrestricted unpickling runs its code.
    torch.load(file, weights_only=False)
    assert marker.exists()


def test_a_bin_with_an_unexpected_global_is_refused(tmp_path: Path) -> None:
    directory = _bin_dir(tmp_path, {"model.decoder.embed_tokens.weight": np.zeros((128, 64), np.float32)})
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*numpy\._?core\.multiarray\._reconstruct"):
        load_checkpoint(directory)


class _OtherPersistentId(pickle.Pickler):
    """Pickles the string "ref" as a persistent record that is not a tensor storage."""

    def persistent_id(self, obj: Any) -> Any:
        return ("module", "os.system") if obj == "ref" else None


def _pickle_with_other_persistent_id() -> bytes:
    buffer = io.BytesIO()
    _OtherPersistentId(buffer, protocol=2).dump({"w": "ref"})
    return buffer.getvalue()


@pytest.mark.parametrize("member, data, message", [
    ("/data.pkl", b"\x80\x02\xff.", r"is corrupt: its data\.pkl cannot be read"),
    ("/data.pkl", _pickle_with_other_persistent_id(), r"persistent record \('module', 'os\.system'\)"),
    ("/data.pkl", pickle.dumps({"w": [1.0, 2.0]}, protocol=2), r"entry 'w' is not a tensor \(list\)"),
    ("/data/0", b"\x00" * 8, r"is corrupt: tensor w needs the record .*data/0 of 48 bytes, the archive has 8"),
    ("/byteorder", b"middle", r"is corrupt: its byteorder record is 'middle'"),
])
def test_malformed_records_are_refused_naming_the_file(tmp_path: Path, member: str, data: bytes,
                                                       message: str) -> None:
    directory = _bin_dir(tmp_path, {"w": torch.zeros(3, 4)})
    _replace_member(directory / "pytorch_model.bin", member, data)
    with pytest.raises(CheckpointError, match=rf"pytorch_model\.bin.*{message}"):
        load_checkpoint(directory)


def _storage(*values: float) -> torch.storage.TypedStorage:
    """A float32 storage as torch.save pickles it inside a tensor record (a persistent storage record)."""
    tensor = torch.tensor(values, dtype=torch.float32)
    return torch.storage.TypedStorage(wrap_storage=tensor.untyped_storage(), dtype=tensor.dtype, _internal=True)


@pytest.mark.parametrize("args, message", [
    ((0, (4,), (1,), False, collections.OrderedDict(), {"conj": True}), r"carries metadata \{'conj': True\}"),
    ((0, (2, 2), (1,), False, collections.OrderedDict()), r"bad arguments \(offset 0, size \(2, 2\), stride"),
    ((-1, (2,), (1,), False, collections.OrderedDict()), r"bad arguments \(offset -1"),
    ((1, (2, 2), (1, 2), False, collections.OrderedDict()), r"tensor w of shape \(2, 2\), stride \(1, 2\) at "
                                                            r"offset 1 reaches element 5 of a storage of 4"),
], ids=["metadata", "size-stride-mismatch", "negative-offset", "beyond-storage"])
def test_tensor_records_that_cannot_be_honoured_are_refused(tmp_path: Path, args: tuple, message: str) -> None:
    record = _Call(torch._utils._rebuild_tensor_v2, _storage(1, 2, 3, 4), *args)
    with pytest.raises(CheckpointError, match=rf"pytorch_model\.bin.*{message}"):
        load_checkpoint(_bin_dir(tmp_path, {"w": record}))


def test_a_pickled_list_instead_of_a_state_dict_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin does not hold a state dict .* list"):
        load_checkpoint(_bin_dir(tmp_path, [torch.zeros(2)]))


def test_truncated_bin(tmp_path: Path) -> None:
    directory = save_bin(tiny_model("opt"), tmp_path / "ckpt")
    file = directory / "pytorch_model.bin"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(file))} is truncated or corrupt"):
        load_checkpoint(directory)


def test_missing_shard(tmp_path: Path) -> None:
    directory = save_bin(tiny_model("opt"), tmp_path / "ckpt", shards=True)
    shard = sorted(directory.glob("pytorch_model-*.bin"))[2]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard {re.escape(str(shard))} listed in .*bin\.index\.json"):
        load_checkpoint(directory)


def test_legacy_format_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    save_bin(tiny_model("opt"), directory)
    torch.save(tiny_model("opt").state_dict(), directory / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is in PyTorch's legacy .*torch>=1\.6.*"
                                              r"safetensors"):
        load_checkpoint(directory)


# ------------------------------------------------------------------------------------ which files are read


def test_safetensors_are_preferred_and_the_bin_never_opened(tmp_path: Path) -> None:
    model = tiny_model("opt")
    model.save_pretrained(tmp_path / "st")
    model.save_pretrained(tmp_path / "both")
    marker = tmp_path / "marker"
    torch.save({"evil": PAYLOADS["os.system"][0](marker)}, tmp_path / "both" / "pytorch_model.bin")
    _, params = load_checkpoint(tmp_path / "both")
    _, expected = load_checkpoint(tmp_path / "st")
    for name, value in expected.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)
    assert not marker.exists()


def test_a_directory_without_weights_names_what_it_holds(tmp_path: Path) -> None:
    directory = _bin_dir(tmp_path, {})
    shutil.move(directory / "pytorch_model.bin", directory / "model.ckpt")
    with pytest.raises(CheckpointError, match=r"has no weights: expected model\.safetensors, .*pytorch_model\.bin "
                                              r"or pytorch_model\.bin\.index\.json; it holds config\.json, "
                                              r"model\.ckpt"):
        load_checkpoint(directory)


def _fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, repo_files: list[str]) -> list[list[str]]:
    """Replace huggingface_hub.snapshot_download by a local one over a repo holding `repo_files` (empty files),
    which keeps exactly the files the real one would (same pattern filter). Returns the allow_patterns of
    each call."""
    calls = []

    def snapshot_download(repo_id: str, token: str | None = None, allow_patterns: list[str] | None = None) -> str:
        calls.append(allow_patterns)
        snapshot = tmp_path / "snapshot"
        for name in filter_repo_objects(repo_files, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).touch()
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_fetches_safetensors_only_when_the_repo_has_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_hub(monkeypatch, tmp_path, ["config.json", "tokenizer.json", "model.safetensors",
                                              "pytorch_model.bin", "training_args.bin"])
    snapshot = hub.fetch_checkpoint("org/both-formats")
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert len(calls) == 1


def test_hub_fetches_pytorch_bin_when_the_repo_has_no_safetensors(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    shards = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    calls = _fake_hub(monkeypatch, tmp_path, ["config.json", "tokenizer.json", "pytorch_model.bin.index.json",
                                              "training_args.bin", "optimizer.pt", *shards])
    snapshot = hub.fetch_checkpoint("org/bin-only")
    assert len(calls) == 2
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", *shards, "pytorch_model.bin.index.json",
                                                          "tokenizer.json"]
