"""Reading single-file and sharded safetensors checkpoints as a `TensorSource`.

The format is parsed here rather than with `safetensors.safe_open(framework="numpy")` because numpy has no
bfloat16, the dtype most Llama-family checkpoints are stored in, and because the byte ranges have to be
checked against the file size anyway to report a truncated download by file name.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

import numpy as np

from converters.errors import CheckpointError
from converters.shards import read_sharded

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Stored dtype -> numpy dtype of the raw little-endian items. BF16 is read as its 16 raw bits and widened
# to float32 by hand (bfloat16 is the top half of a float32).
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, _TensorInfo]:
    """Parse and validate one file's header: every tensor's byte range must lie inside the file."""
    if not path.is_file():
        raise CheckpointError(f"safetensors file {path} is missing")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise CheckpointError(f"{path} is truncated or not a safetensors file: its header claims "
                                  f"{header_len} bytes but the file has {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: its header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its header is not a JSON object")
    data_start, data_size = 8 + header_len, size - 8 - header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path} is corrupt: bad header entry for tensor {name}: {entry!r}") from e
        if dtype not in _DTYPES:
            raise CheckpointError(f"tensor {name} in {path} has dtype {dtype}, which is not supported "
                                  f"(supported: {sorted(_DTYPES)})")
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path} is corrupt: tensor {name} of shape {shape} and dtype {dtype} needs "
                                  f"{nbytes} bytes but its data_offsets are [{begin}, {end})")
        if end > data_size:
            raise CheckpointError(f"{path} is truncated: tensor {name} needs bytes [{begin}, {end}) of the data "
                                  f"section but the file only has {data_size}")
        infos[name] = _TensorInfo(path, dtype, shape, data_start + begin, nbytes)
    return infos


class SafetensorsSource:
    """The tensors of a Hugging Face checkpoint directory (a keymap.TensorSource): `model.safetensors`, or the
    shards listed in `model.safetensors.index.json`. Every header is read and checked up front; data is read
    on demand."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.checkpoint = str(directory)
        if (directory / SINGLE_FILE).is_file():
            self._infos = _read_header(directory / SINGLE_FILE)
        elif (directory / INDEX_FILE).is_file():
            self._infos = read_sharded(directory / INDEX_FILE, _read_header, "safetensors")
        else:
            raise CheckpointError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    def names(self) -> list[str]:
        return list(self._infos)

    def location(self, name: str) -> str:
        return str(self._infos[name].file)

    def read(self, name: str) -> np.ndarray:
        info = self._infos[name]
        count = info.nbytes // _DTYPES[info.dtype].itemsize
        try:
            data = np.fromfile(info.file, dtype=_DTYPES[info.dtype], count=count, offset=info.offset)
        except OSError as e:
            raise CheckpointError(f"cannot read tensor {name} from {info.file}: {e}") from e
        if data.size != count:  # the file shrank after its header was checked
            raise CheckpointError(f"{info.file} is truncated: tensor {name} is incomplete")
        if info.dtype == "BF16":
            data = (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32, copy=False).reshape(info.shape)
