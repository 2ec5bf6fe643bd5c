"""RELIABILITY.md's promises: bad input, disk full, divergence, untrusted files, downloads.

Each test proves one row of RELIABILITY.md; kills of real processes are in
test_reliability_kill.py. What other test files already prove is referenced there, not repeated.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import tarfile
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from datafiles import cifar_member_files, idx_bytes, tar_gz_bytes, write_cifar, write_mnist
from hypothesis import given, settings
from hypothesis import strategies as st

from bigbatch import fileio
from bigbatch.cli import main
from bigbatch.data.cifar import load_cifar_split, safe_unpickle
from bigbatch.data.download import download, fetch
from bigbatch.data.idx import read_idx
from bigbatch.errors import ConfigError, DataError, DownloadError
from bigbatch.fileio import StorageError, atomic_write_bytes
from bigbatch.train.checkpoint import load_checkpoint
from bigbatch.train.config import RunConfig
from bigbatch.train.metrics import CSVWriter, read_rows

TINY = ["--model", "f1", "--model-option", "hidden=16", "--model-option", "depth=2",
        "--dataset", "synthetic", "--device", "cpu", "--progress", "none"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("bigbatch: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def _temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob(".*.tmp")]


# -- every config key: key, value and what is allowed ----------------------------------------
# One bad value per RunConfig field, and a fragment of what the message must say is allowed.
BAD_VALUES = {
    "model": ("resnet45", "did you mean 'resnet44'"),
    "model_options": ([1], "a table of keyword options"),
    "dataset": ("cifar11", "did you mean 'cifar10'"),
    "data_dir": ("", "a directory path or none"),
    "download": ("yes", "true or false"),
    "train_subset": (1, "an integer >= 2 or none"),
    "held_out": (-1, "an integer >= 0"),
    "batch_size": (0, "an integer >= 1"),
    "base_batch_size": (0.5, "an integer >= 1"),
    "ghost_batch_size": (1, "an integer >= 2 or none"),
    "micro_batch_size": (0, "an integer >= 1 or none"),
    "lr_scaling": ("cube", "one of 'none', 'sqrt', 'linear'"),
    "regime_adaptation": (-2.0, "a factor > 0"),
    "warmup_epochs": (-1.0, "a number >= 0"),
    "regime": ("fast", "a regime table"),
    "epochs": (0, "a number > 0 or none"),
    "clip": (math.inf, "a number > 0 or none"),
    "seed": (-1, "an integer >= 0"),
    "device": ("tpu", "'auto', 'cpu', 'cuda'"),
    "out": ("", "a directory path or none"),
    "eval_every": (0, "an integer >= 1 or none"),
    "eval_batch_size": (0, "an integer >= 1"),
    "log_diffusion": (1, "true or false"),
    "channels_last": ("maybe", "'auto', true or false"),
    "amp": ("fp8", "one of none, 'bf16'"),
    "compile": ("no", "true or false"),
    "on_nonfinite": ("ignore", "one of 'stop', 'skip'"),
    "num_workers": (-1, "an integer >= 0"),
    "progress": ("loud", "one of 'auto', 'bar', 'log', 'none'"),
    "checkpoint_every_minutes": (0, "a number > 0 or none"),
    "exact_ghost_alignment": ("yes", "true or false"),
}
FIELDS = [f.name for f in dataclasses.fields(RunConfig)]


def test_the_table_covers_every_config_field():
    # A new RunConfig field without a bad-value case here fails this test.
    assert sorted(k for k in BAD_VALUES if k in FIELDS) == sorted(FIELDS)


@pytest.mark.parametrize("key", [k for k in BAD_VALUES if k in FIELDS])
def test_every_config_key_rejects_a_bad_value_naming_key_value_and_allowed(key, tmp_path, capsys):
    value, allowed = BAD_VALUES[key]
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({key: value})
    message = str(info.value)
    assert key.split("_")[0] in message and repr(value) in message and allowed in message, message
    # the same value from a config file through the CLI: one line, exit 2, nothing written
    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps({key: value}))
    out = ["--out", str(tmp_path / "run")] if key != "out" else []  # --out would override it
    assert main(["train", "--config", str(config), *out]) == 2
    line = _one_error_line(capsys)
    assert repr(value) in line and allowed in line
    assert _files(tmp_path) == ["run.toml"]


def test_unknown_key_in_a_file_has_did_you_mean_through_the_cli(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("ghost_batchsize: 64\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "unknown config key 'ghost_batchsize'; did you mean 'ghost_batch_size'?" in (
        _one_error_line(capsys)
    )


# -- configs are data -------------------------------------------------------------------------
def test_yaml_python_tags_are_refused_and_run_nothing(tmp_path, capsys):
    import yaml

    target = tmp_path / "pwned"
    text = f"model: !!python/object/apply:os.system ['touch {target}']\n"
    yaml.unsafe_load(text)  # positive control: an unsafe loader does run it
    assert target.exists()
    target.unlink()
    config = tmp_path / "evil.yaml"
    config.write_text(text)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys)
    assert "cannot parse config file" in line and "evil.yaml" in line
    assert not target.exists()


# -- checkpoints are weights only ---------------------------------------------------------------
class _Exploit:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_checkpoint_with_code_in_it_is_refused_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = RunConfig(model="f1", model_options={"hidden": 16, "depth": 2}, dataset="synthetic")
    (run / "config.toml").write_text(cfg.to_toml())
    target = tmp_path / "pwned"
    evil = run / "checkpoints" / "last.pt"
    torch.save({"format": "bigbatch-checkpoint-v1", "model": _Exploit(target)}, evil)
    torch.load(evil, weights_only=False)  # positive control: a full unpickle runs the payload
    assert target.exists()
    target.unlink()
    assert main(["train", "--resume", str(run), "--device", "cpu", "--progress", "none"]) == 2
    line = _one_error_line(capsys)
    assert "cannot load checkpoint" in line and "last.pt" in line
    assert not target.exists()


# -- divergence -------------------------------------------------------------------------------
def _regime(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


GOOD_PHASE = "[[phases]]\nepoch = 0\nlr = 0.05\nmomentum = 0.9\n"


def test_divergence_keeps_the_last_good_checkpoint_and_exits_non_zero(tmp_path, capsys):
    # 2048 samples / 256 = 8 updates an epoch; epoch 0 is sane, epoch 1 has an absurd lr.
    explode = _regime(tmp_path, "explode.toml",
                      f"epochs = 2\n{GOOD_PHASE}[[phases]]\nepoch = 1\nlr = 1e30\n")
    sane = _regime(tmp_path, "sane.toml", f"epochs = 1\n{GOOD_PHASE}")
    args = [*TINY, "--batch-size", "256", "--seed", "5"]
    assert main(["train", *args, "--regime", explode, "--out", str(tmp_path / "a")]) == 2
    line = _one_error_line(capsys)
    assert "diverged at update" in line and "of 16" in line and "lr 1e+30" in line
    assert "warm-up" in line and "last.pt keeps the last good state" in line
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["updates"] > 8
    kept = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    assert kept["updates"] == 8
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    # the kept state is exactly the state after the good epoch (a run that stops there)
    assert main(["train", *args, "--regime", sane, "--out", str(tmp_path / "b")]) == 0
    good = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert kept["model"].keys() == good["model"].keys()
    for key, value in good["model"].items():
        assert torch.equal(kept["model"][key], value), key
    # negative control: the diverging run did move past update 8 before stopping
    assert summary["updates"] != kept["updates"]


def test_on_nonfinite_skip_from_the_cli_counts_and_logs(tmp_path, capsys, caplog):
    explode = _regime(tmp_path, "explode.toml",
                      f"epochs = 2\n{GOOD_PHASE}[[phases]]\nepoch = 1\nlr = 1e30\n")
    out = tmp_path / "run"
    code = main(["train", *TINY, "--batch-size", "256", "--regime", explode,
                 "--on-nonfinite", "skip", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["skipped_steps"] > 0
    assert sum("skipped update" in r.getMessage() for r in caplog.records) == (
        summary["skipped_steps"]
    )
    assert read_rows(out / "metrics.csv")[-1]["skipped_steps"] == summary["skipped_steps"]


# -- disk full ---------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_write_bytes(path, b"good")
    monkeypatch.setattr(fileio.os, "fsync", _enospc)
    with pytest.raises(StorageError) as info:
        atomic_write_bytes(path, b"new")
    assert str(info.value).startswith("no space left on device writing ")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == b"good" and _files(tmp_path) == ["last.pt"]


def test_disk_full_appending_metrics_is_one_line_naming_the_file(tmp_path):
    writer = CSVWriter(tmp_path / "metrics.csv")
    writer.write({"updates": 1})

    class _Full(io.StringIO):
        def write(self, text):
            _enospc()

    writer.close()
    writer._file = _Full()  # the disk fills up between two rows
    with pytest.raises(StorageError, match=r"no space left on device writing '.*metrics.csv'"):
        writer.write({"updates": 2})
    writer.close()


def _fails_on_second_checkpoint(real_fsync):
    seen = []

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith(".last.pt."):
            seen.append(name)
            if len(seen) == 2:
                _enospc()
        return real_fsync(fd)

    return fsync


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fd")
def test_disk_full_mid_run_is_one_line_keeps_last_pt_and_resumes_exactly(
    tmp_path, monkeypatch, capsys
):
    args = [*TINY, "--batch-size", "128", "--epochs", "1", "--eval-every", "4", "--seed", "2"]
    out = tmp_path / "run"
    monkeypatch.setattr(fileio.os, "fsync", _fails_on_second_checkpoint(os.fsync))
    assert main(["train", *args, "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "no space left on device writing" in line and "last.pt" in line
    assert load_checkpoint(out / "checkpoints" / "last.pt")["updates"] == 4  # the previous one
    assert _temp_files(out) == [] and not (out / "summary.json").exists()
    monkeypatch.undo()  # space freed: the run resumes and ends as an uninterrupted one
    assert main(["train", "--resume", str(out), "--progress", "none"]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "full")]) == 0
    timing = {"wall_time_s", "samples_per_s"}
    a, b = (
        [{k: v for k, v in r.items() if k not in timing} for r in read_rows(d / "metrics.jsonl")]
        for d in (tmp_path / "full", out)
    )
    assert a == b and len(a) == 4 and a[0]["val_loss"] != a[-1]["val_loss"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fd")
def test_a_run_directory_written_with_the_old_key_names_still_resumes(
    tmp_path, monkeypatch, capsys, caplog
):
    from bigbatch.train.checkpoint import save_checkpoint

    args = [*TINY, "--batch-size", "128", "--epochs", "1", "--eval-every", "4", "--clip", "5"]
    out = tmp_path / "run"
    monkeypatch.setattr(fileio.os, "fsync", _fails_on_second_checkpoint(os.fsync))
    assert main(["train", *args, "--out", str(out)]) == 2  # stopped after the first checkpoint
    monkeypatch.undo()
    # Rewrite config.toml and the checkpoint's config as bigbatch 0.1 wrote them.
    old_names = {"clip": "clip_grad_norm", "eval_every": "eval_every_updates"}
    text = (out / "config.toml").read_text()
    for new, old in old_names.items():
        text = text.replace(f"\n{new} = ", f"\n{old} = ")
    (out / "config.toml").write_text(text)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    state["config"] = {old_names.get(k, k): v for k, v in state["config"].items()}
    save_checkpoint(out / "checkpoints" / "last.pt", state)
    assert "clip_grad_norm = 5.0" in text and "eval_every_updates = 4" in text

    with caplog.at_level("WARNING", logger="bigbatch"):
        assert main(["train", "--resume", str(out), "--progress", "none"]) == 0
    assert any("'clip_grad_norm' is deprecated" in r.getMessage() for r in caplog.records)
    assert main(["train", *args, "--out", str(tmp_path / "full")]) == 0
    timing = {"wall_time_s", "samples_per_s"}
    a, b = (
        [{k: v for k, v in r.items() if k not in timing} for r in read_rows(d / "metrics.jsonl")]
        for d in (tmp_path / "full", out)
    )
    assert a == b and len(a) == 4 and a[0]["val_loss"] != a[-1]["val_loss"]


def test_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    assert main(["train", *TINY, "--out", str(blocker)]) == 2
    assert "cannot write to output directory" in _one_error_line(capsys)
    assert blocker.read_text() == "keep me"


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
    assert re.search(message, _one_error_line(capsys))
    assert _files(out) == []  # no config, metrics or checkpoint of a run that never started


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
    assert _files(tmp_path) == ["cifar-10-python.tar.gz"]  # nothing extracted


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

    for files in FILES.values():
        for remote in files:
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
