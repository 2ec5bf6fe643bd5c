"""Readers for the IDX files of MNIST and Fashion-MNIST (gzipped or not).

The format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte big-endian magic number whose
first two bytes are zero, the third gives the element type and the fourth the number of dimensions;
then one big-endian uint32 per dimension; then the elements in C order. MNIST images have magic
0x00000803 (uint8, 3 dims: N x 28 x 28) and labels 0x00000801 (uint8, 1 dim: N). Fashion-MNIST uses
the same files.

Every check compares the header with the bytes actually present *before* anything is allocated, so a
corrupt or hostile header cannot make us reserve gigabytes; every failure is a :class:`DataError`
that names the file.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from bigbatch.errors import DataError

__all__ = [
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
    "idx_file_names",
    "load_idx_split",
    "parse_idx",
    "read_idx",
]

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Decompressed size cap: the largest real file (MNIST train images) is 47 MB. A gzip bomb stops
# here.
_MAX_DECOMPRESSED_BYTES = 1 << 30

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def parse_idx(
    data: bytes, source: str = "<bytes>", expected_magic: int | None = None
) -> np.ndarray:
    """Parse the bytes of one (already decompressed) IDX file.

    Args:
        data: the whole file content.
        source: the file name to put in error messages.
        expected_magic: if given, the magic number the file must start with.

    Returns:
        A writable numpy array (a copy) of the stored dtype, in native byte order, and shape.

    Raises:
        DataError: wrong magic number, unknown type, or a size that does not match the header.

    Example:
        >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9])).tolist()
        [7, 9]
    """
    if len(data) < 4:
        raise DataError(
            f"{source}: {len(data)} bytes is too short for an IDX header (truncated file?)"
        )
    (magic,) = struct.unpack(">I", data[:4])
    if expected_magic is not None and magic != expected_magic:
        raise DataError(
            f"{source}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            "(not an IDX file of this kind, or the images and labels files are swapped)"
        )
    zero, type_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or type_code not in _IDX_DTYPES:
        raise DataError(f"{source}: magic number 0x{magic:08x} is not an IDX header")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(
            f"{source}: header declares {ndim} dimensions but the file ends after "
            f"{len(data)} bytes (truncated file?)"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        problem = "truncated" if actual < expected else "has trailing bytes"
        raise DataError(
            f"{source}: header says shape {tuple(shape)} ({expected} data bytes) but the "
            f"file holds {actual}: the file {problem}; download it again"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    # A copy: the view of `data` is read-only, and torch.from_numpy warns on read-only arrays.
    return array.astype(dtype.newbyteorder("="))


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file from disk; a name ending in ``.gz`` is decompressed first.

    Raises:
        DataError: missing, unreadable, corrupt gzip, or malformed IDX content.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if path.suffix == ".gz":
        raw = _gunzip(raw, path)
    return parse_idx(raw, str(path), expected_magic)


def _gunzip(raw: bytes, path: Path) -> bytes:
    # zlib directly (not gzip.decompress) so the output size is bounded.
    try:
        decompressor = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)  # gzip container
        out = decompressor.decompress(raw, _MAX_DECOMPRESSED_BYTES)
        if decompressor.unconsumed_tail:
            raise DataError(
                f"{path}: decompresses to more than {_MAX_DECOMPRESSED_BYTES} bytes; "
                "not an MNIST-style file"
            )
        if not decompressor.eof:
            raise DataError(f"{path}: the gzip stream is truncated; download the file again")
    except (zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: not a valid gzip file ({exc}); download it again") from None
    return out


def idx_file_names(split: str) -> tuple[str, str]:
    """Base names (no ``.gz``) of the images and labels files of ``split`` ("train"/"test")."""
    if split not in _SPLIT_PREFIX:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    prefix = _SPLIT_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def find_idx_file(directory: Path, base_name: str) -> Path | None:
    """``directory/base_name.gz`` or ``directory/base_name``, whichever exists (gzip first)."""
    for candidate in (directory / f"{base_name}.gz", directory / base_name):
        if candidate.is_file():
            return candidate
    return None


def load_idx_split(directory: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load one split of MNIST or Fashion-MNIST from the four standard IDX files in ``directory``.

    Args:
        directory: folder holding ``train-images-idx3-ubyte[.gz]`` and the three other files.
        split: "train" (60000 samples) or "test" (the official 10000-sample test set).

    Returns:
        ``(images, labels)``: uint8 array (N, 1, 28, 28) and int64 array (N,).

    Raises:
        DataError: a file is missing or corrupt, or the image and label counts differ.
    """
    directory = Path(directory)
    images_name, labels_name = idx_file_names(split)
    paths = []
    for base in (images_name, labels_name):
        path = find_idx_file(directory, base)
        if path is None:
            raise DataError(f"{directory / base}[.gz]: file not found")
        paths.append(path)
    images = read_idx(paths[0], IMAGES_MAGIC)
    labels = read_idx(paths[1], LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1:  # magic numbers already fix ndim; kept for clarity
        raise DataError(f"{paths[0]}: expected 3-D images and 1-D labels")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{paths[0]} holds {images.shape[0]} images but {paths[1]} holds "
            f"{labels.shape[0]} labels: the files come from different sets"
        )
    return np.ascontiguousarray(images[:, None]), labels.astype(np.int64)
