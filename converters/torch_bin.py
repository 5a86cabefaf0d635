"""Reading PyTorch `pytorch_model.bin` checkpoints (single or sharded) as a `TensorSource`, without torch and
without letting the file run code.

A `torch.save` file (torch >= 1.6) is a zip archive: `<prefix>/data.pkl` is a pickle of the state dict whose
tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` calls, each storage a
persistent record `('storage', torch.<Type>Storage, key, location, numel)` whose bytes are the member
`<prefix>/data/<key>`. Unpickling such a file with `pickle` or `torch.load(weights_only=False)` calls whatever
globals it names, so a hostile file runs code. Here `find_class` hands out only harmless stand-ins for the few
globals tensor records use (the rebuild functions, `collections.OrderedDict`, the storage types); any other
global is refused before it is looked up, so nothing the file names is ever imported or called. Tensor bytes
are read lazily, one storage at a time, and laid out with the record's offset and strides.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from converters.errors import CheckpointError
from converters.shards import read_sharded

BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"

# torch storage type -> numpy dtype of its raw items (byte order applied per file). BFloat16 is read as its
# 16 raw bits and widened to float32 by hand, as for safetensors (numpy has no bfloat16).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("f4"),
    "HalfStorage": np.dtype("f2"),
    "BFloat16Storage": np.dtype("u2"),
    "DoubleStorage": np.dtype("f8"),
    "LongStorage": np.dtype("i8"),
    "IntStorage": np.dtype("i4"),
    "ShortStorage": np.dtype("i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}

# The first bytes of torch's legacy (pre-1.6, non-zip) format: a pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    """Stands in for `torch.<name>` (a storage class); frozen with slots so a pickle BUILD cannot alter it."""

    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
    """A `('storage', ...)` persistent record: which zip member holds the bytes, not the bytes."""

    type: _StorageType
    key: str
    numel: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Tensor:
    """What a checked `_rebuild_tensor_v2` call describes. Only that stand-in makes one, so a pickle cannot
    pass off unchecked offsets or strides as a tensor."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class _TensorRecord:
    """One tensor of a .bin file: a strided view of the storage in zip member `member` of `file`."""

    file: Path
    member: str
    storage_type: str
    storage_numel: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    big_endian: bool


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    """`value` if it is a tuple of non-negative ints (bools excluded), else None."""
    if isinstance(value, tuple) and all(type(v) is int and v >= 0 for v in value):
        return value
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch `data.pkl` into `{name: _Tensor}` and nothing else."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path
        self._allowed: dict[tuple[str, str], Any] = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            # A real OrderedDict is harmless: it only stores what the pickle already built.
            ("collections", "OrderedDict"): collections.OrderedDict,
            **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
        }

    def find_class(self, module: str, name: str) -> Any:
        """The stand-in for an allowed global; any other global is refused without importing or calling it."""
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._path} is refused: its pickle names {module}.{name}, which is not part of a tensor "
                f"storage record. Loading it with pickle or torch.load(weights_only=False) could run code; "
                f"nothing in it was run. Only tensors are read from pytorch_model.bin files.") from None

    def persistent_load(self, pid: Any) -> _Storage:
        """A storage record `('storage', storage type, key, location, numel)`; anything else is refused."""
        if (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[3], str) and type(pid[4]) is int and pid[4] >= 0):
            return _Storage(pid[1], pid[2], pid[4])
        raise CheckpointError(f"{self._path} is refused: its pickle has the persistent record {pid!r}, which is "
                              f"not a tensor storage record")

    def _rebuild_tensor_v2(self, storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                           backward_hooks: Any, metadata: Any = None) -> _Tensor:
        """Stands in for torch._utils._rebuild_tensor_v2: checks the arguments and keeps where the data is.
        `requires_grad` and `backward_hooks` do not affect the values; hooks could only be callables the
        pickle obtained through find_class, which refuses them."""
        shape, strides = _int_tuple(size), _int_tuple(stride)
        if (not isinstance(storage, _Storage) or type(storage_offset) is not int or storage_offset < 0
                or shape is None or strides is None or len(shape) != len(strides)):
            raise CheckpointError(f"{self._path} is corrupt: a tensor record has bad arguments "
                                  f"(offset {storage_offset!r}, size {size!r}, stride {stride!r})")
        if metadata:  # torch's tensor metadata (e.g. flags of tensor subclasses) cannot be honoured here
            raise CheckpointError(f"{self._path}: a tensor record carries metadata {metadata!r}, which is not "
                                  f"supported")
        return _Tensor(storage, storage_offset, shape, strides)

    def _rebuild_parameter(self, data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
        """Stands in for torch._utils._rebuild_parameter: a Parameter is its tensor."""
        return data


def _open_zip(path: Path) -> zipfile.ZipFile:
    """`path` as a zip archive, or a CheckpointError saying what the file is instead."""
    if not path.is_file():
        raise CheckpointError(f"PyTorch checkpoint file {path} is missing")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        with path.open("rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            raise CheckpointError(
                f"{path} is in PyTorch's legacy (pre-1.6, non-zip) format, which is not read because it can "
                f"only be loaded by unpickling arbitrary code. Re-save it with torch>=1.6 (torch.save's default "
                f"zip format) or, better, as safetensors (save_pretrained(safe_serialization=True)).") from e
        if head.startswith(b"PK"):
            raise CheckpointError(f"{path} is truncated or corrupt: {e}") from e
        raise CheckpointError(f"{path} is not a PyTorch zip checkpoint (truncated, corrupt or another "
                              f"format): {e}") from e


def _read_records(path: Path) -> dict[str, _TensorRecord]:
    """Every tensor record of one .bin file, checked against the storages the archive holds."""
    with _open_zip(path) as archive:
        members = {info.filename: info.file_size for info in archive.infolist()}
        pickles = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path} is not a PyTorch zip checkpoint: it has {len(pickles)} "
                                  f"'<archive>/data.pkl' records")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            byteorder = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in members else "little"
            data = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is truncated or corrupt: {e}") from e
    if byteorder not in ("little", "big"):
        raise CheckpointError(f"{path} is corrupt: its byteorder record is {byteorder!r}")
    try:
        state = _RestrictedUnpickler(data, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # only our stand-ins ran, so any failure (of any type) means a malformed pickle
        raise CheckpointError(f"{path} is corrupt: its data.pkl cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict of tensors but a {type(state).__name__}")

    records = {}
    for name, value in state.items():
        if not (isinstance(name, str) and isinstance(value, _Tensor)):
            raise CheckpointError(f"{path}: entry {name!r} is not a tensor ({type(value).__name__})")
        storage, offset, shape, stride = value.storage, value.offset, value.shape, value.stride
        member = f"{prefix}data/{storage.key}"
        itemsize = _STORAGE_DTYPES[storage.type.name].itemsize
        if members.get(member) != storage.numel * itemsize:
            raise CheckpointError(f"{path} is corrupt: tensor {name} needs the record {member} of "
                                  f"{storage.numel * itemsize} bytes, the archive has "
                                  f"{'none' if member not in members else f'{members[member]} bytes'}")
        # The last element a strided view touches must lie inside its storage.
        end = offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1 if math.prod(shape) else offset
        if end > storage.numel:
            raise CheckpointError(f"{path} is corrupt: tensor {name} of shape {shape}, stride {stride} at offset "
                                  f"{offset} reaches element {end} of a storage of {storage.numel}")
        records[name] = _TensorRecord(path, member, storage.type.name, storage.numel, offset, shape, stride,
                                      byteorder == "big")
    return records


class TorchBinSource:
    """The tensors of a Hugging Face checkpoint directory saved with torch (a keymap.TensorSource):
    `pytorch_model.bin`, or the shards listed in `pytorch_model.bin.index.json`. Every file's records are
    read and checked up front, without running any code from them; tensor data is read on demand."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.checkpoint = str(directory)
        if (directory / BIN_FILE).is_file():
            self._records = _read_records(directory / BIN_FILE)
        elif (directory / BIN_INDEX_FILE).is_file():
            self._records = read_sharded(directory / BIN_INDEX_FILE, _read_records, "PyTorch checkpoint")
        else:
            raise CheckpointError(f"{directory} has neither {BIN_FILE} nor {BIN_INDEX_FILE}")

    def names(self) -> list[str]:
        return list(self._records)

    def location(self, name: str) -> str:
        return str(self._records[name].file)

    def read(self, name: str) -> np.ndarray:
        record = self._records[name]
        dtype = _STORAGE_DTYPES[record.storage_type].newbyteorder(">" if record.big_endian else "<")
        try:
            with zipfile.ZipFile(record.file) as archive:
                raw = archive.read(record.member)
        except (zipfile.BadZipFile, OSError, KeyError) as e:  # the file changed after its records were checked
            raise CheckpointError(f"cannot read tensor {name} from {record.file}: {e}") from e
        if len(raw) != record.storage_numel * dtype.itemsize:
            raise CheckpointError(f"{record.file} is truncated: tensor {name} is incomplete")
        storage = np.frombuffer(raw, dtype=dtype)[record.offset:]
        view = np.lib.stride_tricks.as_strided(storage, shape=record.shape,
                                               strides=[s * dtype.itemsize for s in record.stride], writeable=False)
        # A C-contiguous copy whatever the strides were, so the result never aliases the zip's bytes.
        if record.storage_type == "BFloat16Storage":
            return (np.ascontiguousarray(view, dtype=np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(view, dtype=np.float32)
