"""Readers for CIFAR-10 and CIFAR-100 (Krizhevsky 2009), "python" and "binary" versions, from a
folder or straight from the downloaded ``.tar.gz``.

The python version stores each batch as a pickle of a dict (written by Python 2 ``cPickle``, so keys
are bytes): ``b'data'`` a uint8 array (N, 3072) with the 1024 red, then green, then blue values of
each 32x32 image, and ``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100) a list of ints. A
pickle can run arbitrary code when loaded, so we load it with :class:`RestrictedUnpickler`, which
can build numpy arrays and plain containers and nothing else. The binary version is fixed-size
records: 1 label byte (CIFAR-10) or 2 (CIFAR-100: coarse, fine) followed by the 3072 pixel bytes.

Archives are read member by member with :mod:`tarfile` (never ``extractall``, so a hostile archive
cannot
write outside anything: we write nothing at all).
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigbatch.errors import DataError

__all__ = [
    "CIFAR_FORMATS",
    "RestrictedUnpickler",
    "cifar_present",
    "load_cifar_split",
    "parse_cifar_binary",
    "parse_cifar_pickle",
    "safe_unpickle",
]

_PIXELS = 3 * 32 * 32

# The callable numpy's pickles name for array reconstruction; asking numpy for it (instead of
# importing numpy.core.multiarray) avoids numpy 2's deprecation of the old module path and works on
# numpy 1 too.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}

# Everything pickle can raise on malformed bytes (its C implementation is not consistent about the
# type).
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    MemoryError,
    RecursionError,
    struct.error,
    SystemError,  # numpy internals on some corrupt states ("error return without exception set")
    Warning,
)


def _plain_dtype_state(state) -> bool:
    """Whether ``state`` is what a plain numeric dtype pickles: ``(3, byteorder, None, None, None,
    -1, -1, 0)`` (no subarray, no fields, no flags)."""
    return (
        isinstance(state, tuple)
        and len(state) == 8
        and state[0] == 3
        and state[1] in ("|", "<", ">", "=", b"|", b"<", b">", b"=")
        and state[2:5] == (None, None, None)
        and state[5:] == (-1, -1, 0)
    )


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that rebuilds numpy arrays, containers, numbers, strings, bytes; nothing else.

    Any other global (``os.system``, ``builtins.eval``, a class with a malicious ``__reduce__``) is
    refused with :class:`DataError` before it is looked up, so loading a hostile file cannot run
    code. A numpy dtype is only built in the state of a plain numeric type: ``dtype.__setstate__``
    accepts arbitrary internal flags, and a uint8 dtype flagged as holding Python objects makes
    numpy treat pixel bytes as object pointers (found by ``benchmarks/fuzz_readers.py``). That
    check needs the BUILD opcode, hence the pure-Python unpickler; it reads a CIFAR batch (one
    large bytes object and a few lists) about as fast as the C one.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to load {module}.{name}: a CIFAR batch only needs numpy arrays "
                "(the file is not a genuine CIFAR pickle, or it is malicious)"
            ) from None

    def _load_build(self) -> None:
        state, target = self.stack[-1], self.stack[-2]
        if isinstance(target, np.dtype) and not _plain_dtype_state(state):
            raise DataError(
                f"refusing a numpy dtype with non-standard state {state!r:.80}: a CIFAR batch "
                "holds plain uint8 arrays (the file is corrupt or malicious)"
            )
        if isinstance(target, np.ndarray):
            parts = state if isinstance(state, tuple) else ()
            dtypes = [target.dtype, *(d for d in parts if isinstance(d, np.dtype))]
            if any(d.hasobject for d in dtypes):
                raise DataError(
                    "refusing an array of Python objects: a CIFAR batch holds uint8 data"
                )
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build


def safe_unpickle(data: bytes, source: str = "<bytes>"):
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (bytes keys, as written by Python 2).

    Raises:
        DataError: the bytes are not a pickle, or name a forbidden global.
    """
    try:
        # A corrupt pickle can make numpy warn (e.g. dtype(align=()) in numpy 2.4) instead of
        # fail; a genuine CIFAR batch never does, so any warning means a bad file: a DataError.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from None
    except _PICKLE_ERRORS as exc:
        raise DataError(
            f"{source}: not a valid CIFAR pickle ({type(exc).__name__}: {exc}); "
            "download the dataset again"
        ) from None


def parse_cifar_pickle(data: bytes, source: str, label_key: str, num_classes: int):
    """Decode one python-version batch into ``(images uint8 (N,3,32,32), labels int64 (N,))``."""
    batch = safe_unpickle(data, source)
    if not isinstance(batch, dict):
        raise DataError(f"{source}: expected a dict of arrays, found {type(batch).__name__}")
    # Python 2 pickles give bytes keys; accept str keys too (files re-saved with Python 3).
    entries = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", label_key):
        if key not in entries:
            raise DataError(
                f"{source}: no {key!r} entry (keys: {sorted(map(str, entries))}); "
                "is this the right CIFAR version (10 vs 100)?"
            )
    images = entries["data"]
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 2
        or images.shape[1] != _PIXELS
    ):
        desc = (
            f"{images.dtype} {images.shape}"
            if isinstance(images, np.ndarray)
            else type(images).__name__
        )
        raise DataError(f"{source}: 'data' must be a uint8 array (N, {_PIXELS}), found {desc}")
    try:
        labels = np.asarray(entries[label_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{source}: {label_key!r} is not a list of integers") from None
    return _check(images.reshape(-1, 3, 32, 32), labels, source, num_classes)


def parse_cifar_binary(data: bytes, source: str, label_bytes: int, num_classes: int):
    """Decode one binary-version file: records of ``label_bytes`` label bytes + 3072 pixels.

    For CIFAR-100 (``label_bytes=2``) the second byte, the fine label, is returned.
    """
    record = label_bytes + _PIXELS
    if len(data) == 0 or len(data) % record:
        raise DataError(
            f"{source}: {len(data)} bytes is not a whole number of {record}-byte records "
            "(truncated or not a CIFAR binary file); download it again"
        )
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)
    return _check(rows[:, label_bytes:].reshape(-1, 3, 32, 32), labels, source, num_classes)


def _check(images: np.ndarray, labels: np.ndarray, source: str, num_classes: int):
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{source}: {images.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{source}: labels must lie in [0, {num_classes}), found "
            f"[{labels.min()}, {labels.max()}]; is this the right CIFAR version?"
        )
    return np.ascontiguousarray(images), labels


@dataclass(frozen=True)
class _Layout:
    """Where one version of one CIFAR dataset keeps its files."""

    folder: str  # the folder inside the archive (and after extraction)
    archive: str
    members: dict  # split -> member file names
    parse: Callable  # (bytes, source) -> (images, labels)


def _layouts(num_classes: int) -> tuple[_Layout, ...]:
    if num_classes == 10:
        python = _Layout(
            "cifar-10-batches-py",
            "cifar-10-python.tar.gz",
            {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
            lambda b, s: parse_cifar_pickle(b, s, "labels", 10),
        )
        binary = _Layout(
            "cifar-10-batches-bin",
            "cifar-10-binary.tar.gz",
            {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]},
            lambda b, s: parse_cifar_binary(b, s, 1, 10),
        )
    else:
        python = _Layout(
            "cifar-100-python",
            "cifar-100-python.tar.gz",
            {"train": ["train"], "test": ["test"]},
            lambda b, s: parse_cifar_pickle(b, s, "fine_labels", 100),
        )
        binary = _Layout(
            "cifar-100-binary",
            "cifar-100-binary.tar.gz",
            {"train": ["train.bin"], "test": ["test.bin"]},
            lambda b, s: parse_cifar_binary(b, s, 2, 100),
        )
    return python, binary


CIFAR_FORMATS = {10: _layouts(10), 100: _layouts(100)}


def cifar_present(directory: str | Path, split: str = "train", num_classes: int = 10) -> bool:
    """Whether ``directory`` holds any CIFAR layout that :func:`load_cifar_split` would read."""
    directory = Path(directory)
    for layout in CIFAR_FORMATS[num_classes]:
        if (directory / layout.archive).is_file():
            return True
        for folder in (directory / layout.folder, directory):
            if all((folder / n).is_file() for n in layout.members[split]):
                return True
    return False


def load_cifar_split(directory: str | Path, split: str = "train", num_classes: int = 10):
    """Load a CIFAR split from ``directory``.

    Tries in order: the extracted python folder, the python ``.tar.gz``, the extracted binary
    folder, the binary ``.tar.gz``. ``directory`` may also be the extracted folder itself.

    Args:
        directory: a folder holding one of the layouts above.
        split: "train" (50000 samples) or "test" (the official 10000-sample test set).
        num_classes: 10 for CIFAR-10, 100 for CIFAR-100 (fine labels).

    Returns:
        ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``.

    Raises:
        DataError: nothing usable found, or a file is corrupt.
    """
    if num_classes not in CIFAR_FORMATS:
        raise DataError(f"num_classes must be 10 or 100, got {num_classes}")
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    directory = Path(directory)
    for layout in CIFAR_FORMATS[num_classes]:
        names = layout.members[split]
        for folder in (directory / layout.folder, directory):
            if all((folder / n).is_file() for n in names):
                return _concat([layout.parse(_read(folder / n), str(folder / n)) for n in names])
        if (directory / layout.archive).is_file():
            return _concat(_read_archive(directory / layout.archive, layout, names))
    wanted = " or ".join(f"{lay.folder}/ or {lay.archive}" for lay in CIFAR_FORMATS[num_classes])
    raise DataError(f"{directory}: no CIFAR-{num_classes} files found (looked for {wanted})")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _read_archive(path: Path, layout: _Layout, names: list[str]):
    out = []
    try:
        with tarfile.open(path, "r:gz") as archive:
            for name in names:
                member_name = f"{layout.folder}/{name}"
                try:
                    member = archive.getmember(member_name)
                except KeyError:
                    raise DataError(
                        f"{path}: archive has no member {member_name!r}; download the dataset again"
                    ) from None
                handle = archive.extractfile(member) if member.isfile() else None
                if handle is None:
                    raise DataError(f"{path}: member {member_name!r} is not a regular file")
                out.append(layout.parse(handle.read(), f"{path}:{member_name}"))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(
            f"{path}: corrupt or truncated archive ({exc}); download it again"
        ) from None
    return out


def _concat(parts):
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return images, labels
