"""download(): verified, atomic, bounded; exercised against a loopback HTTP server."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from datafiles import idx_bytes, write_mnist

from bigbatch.data import download, load_split
from bigbatch.data.download import FILES, fetch
from bigbatch.errors import DownloadError

PAYLOAD = b"bigbatch test payload " * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    release = threading.Event()

    def do_GET(self):  # noqa: N802 (http.server's name)
        kind, _, name = self.path.strip("/").partition("/")
        if kind == "loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.end_headers()
            return
        if kind == "missing" or name not in self.files:
            self.send_error(404)
            return
        body = self.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) * (2 if kind == "trunc" else 1)))
        self.end_headers()
        if kind == "stall":
            self.release.wait(10)  # longer than the client's timeout; released at teardown
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files = {"payload.bin": PAYLOAD}
    _Handler.release = threading.Event()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.release.set()
    httpd.shutdown()
    httpd.server_close()


def test_fetch_success(server, tmp_path):
    dest = fetch(f"{server}/ok/payload.bin", tmp_path / "payload.bin", PAYLOAD_SHA, timeout=5)
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["payload.bin"]  # no .part left


def test_checksum_mismatch_refused_and_nothing_left(server, tmp_path):
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        fetch(f"{server}/ok/payload.bin", tmp_path / "payload.bin", "0" * 64, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_truncated_body(server, tmp_path):
    with pytest.raises(DownloadError, match="truncated"):
        fetch(f"{server}/trunc/payload.bin", tmp_path / "payload.bin", PAYLOAD_SHA, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_stalled_server_times_out(server, tmp_path):
    with pytest.raises(DownloadError, match="timed out"):
        fetch(f"{server}/stall/payload.bin", tmp_path / "payload.bin", PAYLOAD_SHA, timeout=1)
    assert list(tmp_path.iterdir()) == []


def test_redirect_loop_refused(server, tmp_path):
    with pytest.raises(DownloadError, match="redirect"):
        fetch(f"{server}/loop/payload.bin", tmp_path / "payload.bin", PAYLOAD_SHA, timeout=5)


def test_http_error(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        fetch(f"{server}/missing/payload.bin", tmp_path / "payload.bin", PAYLOAD_SHA, timeout=5)


def test_download_dataset_then_load(server, tmp_path):
    """A whole dataset through download() and load_split(), with test checksums for small files."""
    source = tmp_path / "source"
    written = write_mnist(source, gz=True)
    _Handler.files = {p.name: p.read_bytes() for p in source.iterdir()}
    checksums = {name: hashlib.sha256(data).hexdigest() for name, data in _Handler.files.items()}
    target = download(
        "mnist", tmp_path / "data", base_url=f"{server}/ok", timeout=5, checksums=checksums
    )
    assert target == tmp_path / "data" / "mnist"
    images, labels = load_split("mnist", tmp_path / "data", "train")
    np.testing.assert_array_equal(labels, written["train"][1])
    # Already present and verified: a second call downloads nothing (the server could be gone).
    _Handler.files = {}
    download("mnist", tmp_path / "data", base_url=f"{server}/ok", checksums=checksums)


def test_download_refuses_official_checksum_for_other_bytes(server, tmp_path):
    _Handler.files = {"train-images-idx3-ubyte.gz": idx_bytes(np.zeros(3, np.uint8))}
    with pytest.raises(DownloadError, match="train-images-idx3-ubyte.gz.*SHA-256 mismatch"):
        download("fashion-mnist", tmp_path, base_url=f"{server}/ok", timeout=5)
    assert list((tmp_path / "fashion-mnist").iterdir()) == []


def test_download_unknown_dataset(tmp_path):
    with pytest.raises(DownloadError, match="no download for 'imagenet'"):
        download("imagenet", tmp_path)


def test_checksum_table_is_complete():
    for name, files in FILES.items():
        for remote in files:
            assert len(remote.sha256) == 64 and int(remote.sha256, 16) >= 0, (name, remote)
            assert len(remote.md5) == 32 and remote.size > 0
