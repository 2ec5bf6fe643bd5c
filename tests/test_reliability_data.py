"""RELIABILITY.md's promises about untrusted data: bad dataset files, readers under fuzz, pickles,
archives and downloads (the engine's promises are in test_reliability.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from cliout import files, one_error_line
from datafiles import cifar_member_files, idx_bytes, tar_gz_bytes, write_cifar, write_mnist
from hypothesis import given, settings
from hypothesis import strategies as st

from bigbatch.cli import main
from bigbatch.data.cifar import load_cifar_split, safe_unpickle
from bigbatch.data.download import download, fetch
from bigbatch.data.idx import read_idx
from bigbatch.errors import DataError, DownloadError

TINY = ["--model", "f1", "--model-option", "hidden=16", "--model-option", "depth=2",
        "--dataset", "synthetic", "--device", "cpu", "--progress", "none"]


# -- bad dataset files through the CLI -----------------------------------------------------------
def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _corrupt_mnist(root: Path) -> None:
    write_mnist(root, gz=False, num_train=8, num_test=4)
    _truncate(root / "train-images-idx3-ubyte", 100)


def _gz_garbage_mnist(root: Path) -> None:
    write_mnist(root, gz=True, num_train=8, num_test=4)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")


def _wrong_shape_mnist(root: Path) -> None:
    write_mnist(root, gz=False, num_train=8, num_test=4)
    (root / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((8, 27, 27), np.uint8)))


def _corrupt_cifar(root: Path) -> None:
    write_cifar(root, 10, "python", archive=True)
    _truncate(root / "cifar-10-python.tar.gz", 300)


def _data_dir_is_a_file(root: Path) -> None:
    root.write_text("not a directory")


@pytest.mark.parametrize(
    ("dataset", "make", "message"),
    [
        ("mnist", _corrupt_mnist, r"train-images-idx3-ubyte: header says shape .* truncated"),
        ("mnist", _gz_garbage_mnist, r"train-labels-idx1-ubyte.gz: not a valid gzip file"),
        ("mnist", _wrong_shape_mnist, r"images have shape \(1, 27, 27\), expected \(1, 28, 28\)"),
        ("cifar10", _corrupt_cifar, r"cifar-10-python.tar.gz: corrupt or truncated archive"),
        ("mnist", _data_dir_is_a_file, r"is a file, but --data-dir must be a directory"),
    ],
    ids=["truncated-idx", "garbage-gzip", "wrong-shape", "truncated-tar", "dir-is-a-file"],
)
def test_bad_dataset_files_are_one_line_and_nothing_is_written(
    dataset, make, message, tmp_path, capsys
):
    import re

    data = tmp_path / "data"
    make(data)
    out = tmp_path / "run"
    args = ["train", "--model", "f1", "--dataset", dataset, "--data-dir", str(data),
            "--device", "cpu", "--progress", "none", "--out", str(out)]
    assert main(args) == 2
    assert re.search(message, one_error_line(capsys))
    assert files(out) == []  # no config, metrics or checkpoint of a run that never started


# -- readers: bounded fuzz of what tests/test_data_readers.py does not fuzz -------------------
def test_pickle_that_makes_numpy_warn_is_a_data_error():
    # Found by benchmarks/fuzz_readers.py: numpy 2.4 *warns* on dtype(align=()), which under
    # warnings-as-errors escaped the reader as VisibleDeprecationWarning.
    data = b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00u1)K\x01\x87R."
    with pytest.raises(DataError, match="not a valid CIFAR pickle"):
        safe_unpickle(data, "fuzz")


_GOOD_IDX = idx_bytes(np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5))
_edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6)


def _mutate(data: bytes, edits, cut: int) -> bytes:
    buf = bytearray(data)
    for position, value in edits:
        buf[position % len(buf)] = value
    return bytes(buf[: cut % (len(buf) + 1)])


@settings(max_examples=60)
@given(st.builds(_mutate, st.just(_GOOD_IDX), _edits, st.integers(0, 10**6)), st.booleans())
def test_fuzz_gzip_wrapped_idx(content, mutate_gzip):
    blob = gzip.compress(content, mtime=0)
    if mutate_gzip:
        blob = blob[: len(blob) // 2] + bytes([blob[len(blob) // 2] ^ 0xFF]) + blob[
            len(blob) // 2 + 1:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x-idx3-ubyte.gz"
        path.write_bytes(blob)
        try:
            array = read_idx(path)
        except DataError as e:
            assert str(path) in str(e)
            return
    assert array.nbytes <= len(content)


_MEMBERS, _ = cifar_member_files(10, "python", per_file=1)
_TEST = "cifar-10-batches-py/test_batch"


_GOOD_TAR = tar_gz_bytes(_MEMBERS)


@settings(max_examples=40)
@given(
    st.one_of(
        st.builds(lambda m: tar_gz_bytes({**_MEMBERS, _TEST: m}),
                  st.builds(_mutate, st.just(_MEMBERS[_TEST]), _edits, st.integers(0, 10**6))),
        st.builds(_mutate, st.just(_GOOD_TAR), _edits, st.integers(0, 10**6)),
    )
)
def test_fuzz_cifar_archive(blob):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cifar-10-python.tar.gz").write_bytes(blob)
        try:
            images, labels = load_cifar_split(tmp, "test", 10)
        except DataError:
            return
    assert images.shape == (len(labels), 3, 32, 32) and images.dtype == np.uint8


def test_a_tar_member_that_is_a_link_or_outside_path_is_never_followed(tmp_path):
    # A hostile archive whose member is a symlink to /etc/passwd: read as "not a regular file".
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        link = tarfile.TarInfo(_TEST)
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match="is not a regular file"):
        load_cifar_split(tmp_path, "test", 10)
    assert files(tmp_path) == ["cifar-10-python.tar.gz"]  # nothing extracted


# -- downloads ----------------------------------------------------------------------------------
PAYLOAD = b"0123456789abcdef" * 64
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    gets: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        _Handler.gets.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        if self.path.startswith("/trickle/"):
            for byte in PAYLOAD[:40]:  # a byte every 50 ms: never idle long enough to time out
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)
            return
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.gets = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_killed_downloads_leftovers_are_never_used(server, tmp_path):
    """A .part file (download killed mid-way) and a torn final file: both are downloaded again."""
    target = tmp_path / "mnist"
    target.mkdir()
    name = "train-images-idx3-ubyte.gz"
    (target / f"{name}.part").write_bytes(PAYLOAD[:100])  # what a SIGKILL mid-download leaves
    (target / "train-labels-idx1-ubyte.gz").write_bytes(PAYLOAD[:100])  # torn under final name
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")  # fmt: skip
    checksums = {f: PAYLOAD_SHA for f in names}
    download("mnist", tmp_path, base_url=f"{server}/ok", timeout=5, checksums=checksums)
    assert sorted(p.name for p in target.iterdir()) == sorted(checksums)  # no .part left
    assert all((target / f).read_bytes() == PAYLOAD for f in checksums)
    assert sorted(_Handler.gets) == sorted(f"/ok/{f}" for f in checksums)  # all 4 fetched


def test_a_trickling_server_hits_the_overall_deadline(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"not finished after 0.5 s"):
        fetch(f"{server}/trickle/x", tmp_path / "x", PAYLOAD_SHA, timeout=5, deadline_s=0.5)
    assert time.monotonic() - start < 4  # not the 5 s per-read timeout, not the whole trickle
    assert list(tmp_path.iterdir()) == []
    fetch(f"{server}/ok/x", tmp_path / "x", PAYLOAD_SHA, timeout=5, deadline_s=5)  # control
    assert (tmp_path / "x").read_bytes() == PAYLOAD


def test_download_gives_every_file_a_deadline():
    from bigbatch.data.download import FILES, _deadline_s

    for remote_files in FILES.values():
        for remote in remote_files:
            assert 600 <= _deadline_s(remote.size) < 4 * 3600


def test_pickle_module_is_not_used_by_the_readers():
    # The CIFAR reader's only unpickler is the restricted one (tests/test_data_readers.py proves
    # it refuses os.system and builtins.eval); make sure nobody calls pickle.load(s) directly.
    import bigbatch.data.cifar as cifar

    source = Path(cifar.__file__).read_text()
    assert "pickle.load(" not in source and "pickle.loads(" not in source
    assert pickle._Unpickler in cifar.RestrictedUnpickler.__mro__


@pytest.mark.parametrize("flags", [b"s", b"\x01", b"\x10"])
def test_pickle_cannot_set_numpy_dtype_flags(flags):
    # Found by benchmarks/fuzz_readers.py: dtype.__setstate__ takes arbitrary internal flags; a
    # uint8 dtype flagged as holding objects makes numpy read pixel bytes as object pointers.
    from datafiles import cifar_pickle_bytes

    from bigbatch.data.cifar import parse_cifar_pickle

    good = cifar_pickle_bytes(np.zeros((2, 3072), np.uint8), np.array([1, 2]), "labels")
    at = good.index(b"K\x00tq")  # the flags field of the pickled dtype state
    assert parse_cifar_pickle(good, "good", "labels", 10)[0].shape == (2, 3, 32, 32)  # control
    with pytest.raises(DataError, match="refusing a numpy dtype with non-standard state"):
        parse_cifar_pickle(good[:at] + b"K" + flags + good[at + 2:], "evil", "labels", 10)


def test_pickle_cannot_build_an_object_array():
    from datafiles import cifar_pickle_bytes

    data = cifar_pickle_bytes(np.full((1, 3072), None, dtype=object), np.array([0]), "labels")
    assert b"O8" in data  # it does ask for an object dtype
    with pytest.raises(DataError, match="evil: refusing (a numpy dtype|an array of Python)"):
        safe_unpickle(data, "evil")
