"""Reading PyTorch `.bin` checkpoints without torch, through a restricted unpickler.

A `torch.save` file is a zip (`<prefix>/data.pkl`, raw storages `<prefix>/data/<key>`, optional
`<prefix>/byteorder`) or, before torch 1.6, a "legacy" stream of pickles followed by the raw
storages. Both are read here. The pickle may only name `collections.OrderedDict`, the tensor
rebuild functions of `torch._utils` and the typed storage classes; those names resolve to local
stand-ins (nothing is imported from torch, nothing else is callable), so a pickle that reduces to
e.g. `os.system` is refused before anything runs. Tensors are numpy views on the memory-mapped
file and are copied into MLX one at a time.
"""

from __future__ import annotations

import collections
import math
import mmap
import pickle
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np


class WeightsError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, corrupt, unsafe or of an unknown format."""


# storage class name -> (numpy dtype of the raw bytes, MLX dtype to view them as, or None)
STORAGE_DTYPES: dict[str, tuple[np.dtype, mx.Dtype | None]] = {
    "FloatStorage": (np.dtype("<f4"), None),
    "HalfStorage": (np.dtype("<f2"), None),
    "BFloat16Storage": (np.dtype("<u2"), mx.bfloat16),
    "DoubleStorage": (np.dtype("<f8"), None),
    "LongStorage": (np.dtype("<i8"), None),
    "IntStorage": (np.dtype("<i4"), None),
    "ShortStorage": (np.dtype("<i2"), None),
    "CharStorage": (np.dtype("i1"), None),
    "ByteStorage": (np.dtype("u1"), None),
    "BoolStorage": (np.dtype("?"), None),
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Inert:
    """Base of the unpickler's stand-ins: no instance dict, and BUILD on them is refused."""

    __slots__ = ()

    def __setstate__(self, state):
        raise WeightsError(f"unexpected pickle state for {type(self).__name__}")


class _StorageType(_Inert):
    """Stand-in for `torch.<X>Storage`: only carries the element dtype."""

    __slots__ = ("name", "dtype", "view_as")

    def __init__(self, name: str):
        self.name = name
        self.dtype, self.view_as = STORAGE_DTYPES[name]


class _Storage(_Inert):
    """A typed storage: `numel` elements, `offset` elements into the raw buffer of `root`."""

    __slots__ = ("kind", "key", "numel", "offset", "root", "buffer")

    def __init__(self, kind: _StorageType, key: str, numel: int, offset: int = 0, root=None):
        self.kind, self.key, self.numel, self.offset = kind, key, numel, offset
        self.root: _Storage | None = root  # legacy storage views share their root's buffer
        self.buffer: np.ndarray | None = None  # 1-D array of `kind.dtype`, set by the reader

    def data(self) -> np.ndarray:
        """The storage's elements."""
        buffer = (self.root or self).buffer
        if buffer is None:
            raise WeightsError(f"storage {self.key!r} has no data in the file")
        if not 0 <= self.offset <= self.offset + self.numel <= len(buffer):
            raise WeightsError(f"storage {self.key!r} is truncated")
        return buffer[self.offset : self.offset + self.numel]


class _Tensor(_Inert):
    """A tensor not yet read: a strided view on a storage."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def numpy(self) -> np.ndarray:
        """The tensor as a contiguous, native-endian numpy array (raw bits for bfloat16)."""
        base = self.storage.data()
        native = base.dtype.newbyteorder("=")
        if 0 in self.shape:
            return np.zeros(self.shape, dtype=native)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        if self.offset < 0 or min(self.stride, default=0) < 0 or last >= len(base):
            raise WeightsError(f"tensor view out of bounds of storage {self.storage.key!r}")
        if math.prod(self.shape) > len(base):  # a broadcast (stride 0) view: could be any size
            raise WeightsError(
                f"tensor of shape {self.shape} is larger than its storage {self.storage.key!r} "
                f"({len(base)} elements)"
            )
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :],
            shape=self.shape,
            strides=[s * base.dtype.itemsize for s in self.stride],
            writeable=False,
        )
        return np.ascontiguousarray(view, dtype=native).reshape(self.shape)  # keeps 0-d 0-d

    def to_mlx(self) -> mx.array:
        """The tensor as an MLX array (copied out of the file)."""
        arr = mx.array(self.numpy())
        view_as = self.storage.kind.view_as
        return arr.view(view_as) if view_as is not None else arr


class _Rebuild(_Inert):
    """Stand-in for one `torch._utils._rebuild_*` function."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise WeightsError(f"bad tensor {what}: {value!r}")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *rest) -> _Tensor:
    """`_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`."""
    if not isinstance(storage, _Storage) or not isinstance(storage_offset, int):
        raise WeightsError("bad tensor record in pickle")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides) or min(shape, default=0) < 0:
        raise WeightsError(f"bad tensor shape {shape} / stride {strides}")
    return _Tensor(storage, storage_offset, shape, strides)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest) -> _Tensor:
    """`_rebuild_parameter(data, requires_grad, hooks)`: a Parameter is its tensor."""
    if not isinstance(data, _Tensor):
        raise WeightsError("bad parameter record in pickle")
    return data


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles tensors and OrderedDicts only; every other global is refused before it runs."""

    def __init__(self, file, source: str, legacy: bool = False):
        super().__init__(file)
        self.source = source
        self.legacy = legacy
        self.storages: dict[str, _Storage] = {}
        rebuild_tensor, rebuild_parameter = _Rebuild(_rebuild_tensor), _Rebuild(_rebuild_parameter)
        self.allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
        }
        self.allowed.update({("torch", name): _StorageType(name) for name in STORAGE_DTYPES})

    def find_class(self, module: str, name: str):
        """Resolve a global to its stand-in, or refuse it."""
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise WeightsError(
                f"{self.source}: refusing to unpickle the global '{module}.{name}': a PyTorch "
                "checkpoint may only hold tensors (the file is corrupt, not a state dict, or "
                "malicious); nothing from it was run"
            ) from None

    def persistent_load(self, pid):
        """`('storage', <Storage class>, key, location, numel[, view_metadata])` -> a storage."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise WeightsError(f"{self.source}: unknown persistent id in pickle: {pid!r}")
        kind, key, _location, numel = pid[1:5]
        if not isinstance(kind, _StorageType) or not isinstance(key, str):
            raise WeightsError(f"{self.source}: bad storage record {pid!r}")
        if not isinstance(numel, int) or numel < 0:
            raise WeightsError(f"{self.source}: bad storage size {numel!r}")
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = _Storage(kind, key, numel)
        if len(pid) == 6 and pid[5] is not None:  # legacy storage view: (view_key, offset, size)
            _view_key, offset, size = pid[5]
            return _Storage(kind, key, size, offset, root=root)
        return root


def _state_dict(obj, source: str) -> dict[str, _Tensor]:
    if not isinstance(obj, dict):
        raise WeightsError(f"{source}: not a state dict (the pickle holds a {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, _Tensor)}


def _ordered(dtype: np.dtype, byteorder: str) -> np.dtype:
    return dtype.newbyteorder("<" if byteorder == "little" else ">")


def _open_mmap(path: Path) -> mmap.mmap:
    try:
        if path.stat().st_size == 0:
            raise WeightsError(f"{path}: empty file (an interrupted download?)")
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise WeightsError(f"missing checkpoint file: {path}") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e})") from None


def _member_buffer(zf: zipfile.ZipFile, info: zipfile.ZipInfo, mm: mmap.mmap, path: Path):
    """The bytes of a zip member: a view on the mapped file when stored uncompressed."""
    if info.compress_type != zipfile.ZIP_STORED:
        return np.frombuffer(zf.read(info), dtype=np.uint8)
    header = mm[info.header_offset : info.header_offset + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise WeightsError(f"{path}: corrupt zip entry {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > len(mm):
        raise WeightsError(f"{path}: truncated (entry {info.filename} runs past the end)")
    return np.frombuffer(mm, dtype=np.uint8, count=info.file_size, offset=start)


def _read_zip(path: Path, mm: mmap.mmap) -> dict[str, _Tensor]:
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_zip_members(path, mm, zf)
    except WeightsError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: corrupt or truncated checkpoint ({e})") from None
    except (TypeError, AttributeError, IndexError, KeyError, ValueError) as e:
        raise WeightsError(f"{path}: corrupt checkpoint pickle ({type(e).__name__}: {e})") from None


def _read_zip_members(path: Path, mm: mmap.mmap, zf: zipfile.ZipFile) -> dict[str, _Tensor]:
    infos = {i.filename: i for i in zf.infolist()}
    pkl = [n for n in infos if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise WeightsError(f"{path}: not a PyTorch checkpoint (no single */data.pkl in the zip)")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in infos:
        byteorder = zf.read(prefix + "byteorder").decode().strip()
        if byteorder not in ("little", "big"):
            raise WeightsError(f"{path}: unknown byte order {byteorder!r}")
    with zf.open(pkl[0]) as f:
        unpickler = RestrictedUnpickler(f, str(path))
        state = _state_dict(unpickler.load(), str(path))
    for key, storage in unpickler.storages.items():
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            raise WeightsError(f"{path}: storage {key!r} is missing from the zip")
        raw = _member_buffer(zf, info, mm, path)
        dtype = _ordered(storage.kind.dtype, byteorder)
        count = len(raw) // dtype.itemsize
        if count < storage.numel:
            raise WeightsError(f"{path}: storage {key!r} is truncated")
        storage.buffer = raw[: count * dtype.itemsize].view(dtype)
    return state


def _read_legacy(path: Path, mm: mmap.mmap) -> dict[str, _Tensor]:
    """The pre-1.6 format: magic, protocol, sys info, data pickle, storage keys, raw storages."""
    try:
        with open(path, "rb") as f:
            header = [RestrictedUnpickler(f, str(path)).load() for _ in range(3)]
            if header[0] != LEGACY_MAGIC or header[1] != 1001 or not isinstance(header[2], dict):
                raise WeightsError(
                    f"{path}: unknown checkpoint format (not safetensors, zip or torch)"
                )
            byteorder = "little" if header[2].get("little_endian", True) else "big"
            unpickler = RestrictedUnpickler(f, str(path), legacy=True)
            state = _state_dict(unpickler.load(), str(path))
            keys = RestrictedUnpickler(f, str(path)).load()
            pos = f.tell()
        if not isinstance(keys, list):
            raise WeightsError(f"{path}: corrupt storage list")
        for key in keys:
            storage = unpickler.storages.get(key)
            if storage is None or pos + 8 > len(mm):
                raise WeightsError(f"{path}: corrupt or truncated storage {key!r}")
            (numel,) = struct.unpack("<q" if byteorder == "little" else ">q", mm[pos : pos + 8])
            dtype = _ordered(storage.kind.dtype, byteorder)
            nbytes = numel * dtype.itemsize
            if numel < storage.numel or pos + 8 + nbytes > len(mm):
                raise WeightsError(f"{path}: truncated (storage {key!r})")
            storage.buffer = np.frombuffer(mm, dtype=dtype, count=numel, offset=pos + 8)
            pos += 8 + nbytes
        return state
    except WeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: corrupt or truncated checkpoint ({e})") from None
    except (TypeError, AttributeError, IndexError, KeyError, ValueError, struct.error) as e:
        raise WeightsError(f"{path}: corrupt checkpoint pickle ({type(e).__name__}: {e})") from None


def read_torch_file(path: str | Path) -> dict[str, _Tensor]:
    """The tensors of a `torch.save` state dict, not yet read (views on the mapped file)."""
    path = Path(path)
    mm = _open_mmap(path)
    if mm[:4] == b"PK\x03\x04":
        return _read_zip(path, mm)
    if mm[:1] == pickle.PROTO:
        return _read_legacy(path, mm)
    raise WeightsError(f"{path}: unknown format (not a PyTorch zip or legacy checkpoint)")


def iter_torch_file(path: str | Path) -> Iterator[tuple[str, mx.array]]:
    """Yield (name, MLX array) for every tensor of a `torch.save` state dict, one at a time."""
    for name, tensor in read_torch_file(path).items():
        try:
            yield name, tensor.to_mlx()
        except WeightsError as e:
            raise WeightsError(f"{path}: tensor {name!r}: {e}") from None


def load_torch_file(path: str | Path) -> dict[str, mx.array]:
    """All tensors of a `torch.save` state dict as MLX arrays."""
    return dict(iter_torch_file(path))
