"""Download MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 from their official mirrors, verified.

Every file is checked against the SHA-256 recorded below *before* it is given its final name: bytes
are streamed to ``<name>.part``, hashed on the way, and renamed atomically only if the digest
matches, so a partial or tampered download is never mistaken for a complete one (and is deleted).

Provenance of the digests (each agreed by several independent public sources; the MD5s are the ones
the dataset authors or torchvision publish, listed for cross-checking only):
  * MNIST: TensorFlow Datasets / Keras checksums of the files on yann.lecun.com (mirrored by PyTorch
  at
    ossci-datasets and by Google at cvdf-datasets; the files are byte-identical).
  * Fashion-MNIST: torchvision's prototype dataset table; the MD5s are in Zalando's README.
  * CIFAR-10/100 python versions: torchvision prototype and Keras tables; MD5s from torchvision.
The CIFAR binary versions are readable but not downloadable: we have no independently confirmed
digest for them, and refusing beats guessing.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigbatch.errors import DownloadError

__all__ = ["FILES", "MIRRORS", "RemoteFile", "download", "fetch", "sha256_file"]

MAX_REDIRECTS = 5
_CHUNK = 1 << 16


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: its name, SHA-256, the authors' MD5 and its size in bytes."""

    filename: str
    sha256: str
    md5: str
    size: int


FILES: dict[str, tuple[RemoteFile, ...]] = {
    "mnist": (
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            9912422,
        ),
        RemoteFile(
            "train-labels-idx1-ubyte.gz",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "d53e105ee54ea40749a09fcbcd1e9432",
            28881,
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "9fb629c4189551a2d022fa330f9573f3",
            1648877,
        ),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            "ec29112dd5afa0611ce80d1b7f02629c",
            4542,
        ),
    ),
    "fashion-mnist": (
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            26421880,
        ),
        RemoteFile(
            "train-labels-idx1-ubyte.gz",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "25c81989df183df01b3e8a0aad5dffbe",
            29515,
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "bef4ecab320f06d8554ea6380940ec79",
            4422102,
        ),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "bb300cfdad3c16e7a12a480ee83cd310",
            5148,
        ),
    ),
    "cifar10": (
        RemoteFile(
            "cifar-10-python.tar.gz",
            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
            "c58f30108f718f92721af3b95e74349a",
            170498071,
        ),
    ),
    "cifar100": (
        RemoteFile(
            "cifar-100-python.tar.gz",
            "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
            "eb9058c3a382ffc7106e4002c42a8d85",
            169001437,
        ),
    ),
}

# Base URLs tried in order (the first that serves a file with the right digest wins).
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/",),
}


class _LimitedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow at most MAX_REDIRECTS redirects, and never the same URL twice (a loop)."""

    max_redirections = MAX_REDIRECTS
    max_repeats = 1


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _copy(response: Any, out: Any, digest: Any, url: str, deadline_s: float | None) -> None:
    """Stream ``response`` into ``out``, hashing, within the deadline; check the length."""
    length = response.headers.get("Content-Length")
    expected = int(length) if length is not None and length.isdigit() else None
    received, started = 0, time.monotonic()
    try:
        # read1: whatever has arrived (up to _CHUNK), so the deadline is checked between the
        # bytes of a trickling server, not once per 64 KiB.
        for chunk in iter(lambda: response.read1(_CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
            received += len(chunk)
            if deadline_s is not None and time.monotonic() - started > deadline_s:
                raise DownloadError(
                    f"{url}: not finished after {deadline_s:g} s ({received} bytes received; "
                    "a stalled or very slow server); retry or use another mirror with base_url"
                )
    except http.client.IncompleteRead as exc:
        raise DownloadError(
            f"{url}: truncated download, connection closed after "
            f"{received + len(exc.partial)} bytes"
        ) from None
    if expected is not None and received != expected:
        raise DownloadError(f"{url}: truncated download, got {received} of {expected} bytes")


def fetch(
    url: str,
    dest: str | Path,
    sha256: str,
    *,
    timeout: float = 30,
    deadline_s: float | None = None,
) -> Path:
    """Download ``url`` to ``dest`` if and only if its SHA-256 equals ``sha256``.

    Streams into ``dest.part`` (hashing as it goes), checks the length against Content-Length and
    the digest against ``sha256``, then fsyncs and renames. On any failure the ``.part`` file is
    removed.

    Args:
        url: http(s) URL; at most 5 redirects are followed.
        dest: final path.
        sha256: expected hex digest (lower case).
        timeout: seconds allowed for connecting and for each read.
        deadline_s: seconds allowed for the whole download (``None``: no limit). ``timeout``
            alone never stops a server that trickles one byte every few seconds.

    Raises:
        DownloadError: HTTP error, redirect loop, timeout, deadline passed, truncated body or
            checksum mismatch.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    opener = urllib.request.build_opener(_LimitedRedirects)
    digest = hashlib.sha256()
    try:
        with opener.open(url, timeout=timeout) as response, open(part, "wb") as out:
            _copy(response, out, digest, url, deadline_s)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != sha256.lower():
            raise DownloadError(
                f"{url}: SHA-256 mismatch (got {actual}, expected {sha256}); the file "
                "is corrupt or not the official one, so it was deleted"
            )
        os.replace(part, dest)
        return dest
    except DownloadError:
        raise
    except urllib.error.HTTPError as exc:
        what = "too many redirects or a redirect loop" if 300 <= exc.code < 400 else "HTTP error"
        raise DownloadError(f"{url}: {what} ({exc.code} {exc.reason})") from None
    except TimeoutError:
        raise DownloadError(
            f"{url}: no data for {timeout} s (timed out); retry or use another mirror with base_url"
        ) from None
    except urllib.error.URLError as exc:
        raise DownloadError(f"{url}: cannot connect ({exc.reason})") from None
    except (http.client.HTTPException, ConnectionError) as exc:
        raise DownloadError(f"{url}: connection failed ({type(exc).__name__}: {exc})") from None
    except OSError as exc:  # writing the .part file: disk full, permissions
        raise DownloadError(f"{part}: cannot write ({exc.strerror or exc})") from None
    finally:
        part.unlink(missing_ok=True)


# A whole-file deadline: 10 minutes, or longer for big files at a floor rate of 20 kB/s (CIFAR:
# about 2.4 hours). Generous for any real connection; it only stops a server that trickles.
_MIN_DEADLINE_S = 600.0
_MIN_RATE_BYTES_PER_S = 20_000


def _deadline_s(size: int) -> float:
    return max(_MIN_DEADLINE_S, size / _MIN_RATE_BYTES_PER_S)


def download(
    name: str,
    data_dir: str | Path,
    *,
    base_url: str | None = None,
    timeout: float = 30,
    checksums: Mapping[str, str] | None = None,
) -> Path:
    """Download (or re-verify) every file of dataset ``name`` into ``data_dir/<name>``.

    Files already present are kept if their SHA-256 matches, downloaded again otherwise.

    Args:
        name: "mnist", "fashion-mnist", "cifar10" or "cifar100".
        data_dir: parent directory; the files go to ``data_dir/name/``.
        base_url: use this base URL instead of the official mirrors (e.g. a local copy or a test
        server).
        timeout: seconds allowed for connecting and for each read.
        checksums: ``{filename: sha256}`` replacing the recorded digests (for private copies and
        tests).

    Returns:
        The dataset directory ``data_dir/name``, ready for :func:`bigbatch.data.load_split`.

    Raises:
        DownloadError: unknown dataset, or a file failed on every mirror (the messages say why).

    Example:
        >>> download("imagenet", "/tmp")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        bigbatch.errors.DownloadError: no download for 'imagenet' ...
    """
    if name not in FILES:
        raise DownloadError(
            f"no download for {name!r}; downloadable datasets: {sorted(FILES)} "
            "(ImageNet must be obtained from image-net.org and passed with --data-dir)"
        )
    target = Path(data_dir) / name
    if target.exists() and not target.is_dir():
        raise DownloadError(f"{target}: exists and is a file, not a directory")
    target.mkdir(parents=True, exist_ok=True)
    bases = (base_url,) if base_url is not None else MIRRORS[name]
    for remote in FILES[name]:
        sha256 = (checksums or {}).get(remote.filename, remote.sha256)
        dest = target / remote.filename
        if dest.is_file() and sha256_file(dest) == sha256:
            continue
        errors = []
        for base in bases:
            url = base.rstrip("/") + "/" + remote.filename
            try:
                fetch(url, dest, sha256, timeout=timeout, deadline_s=_deadline_s(remote.size))
                break
            except DownloadError as exc:
                errors.append(str(exc))
        else:
            raise DownloadError(f"could not download {remote.filename}: " + "; ".join(errors))
    return target
