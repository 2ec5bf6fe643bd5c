"""Fuzz the dataset readers: hostile or corrupt bytes must give a DataError, nothing else.

What it shows: for mutated, truncated and random inputs, the IDX reader (raw and gzip-wrapped), the
CIFAR python-pickle reader (restricted unpickler), the CIFAR binary reader and the CIFAR ``.tar.gz``
archive reader either return arrays consistent with the bytes they were given or raise
:class:`bigbatch.errors.DataError`. Any other exception (IndexError, MemoryError, a hang, a
traceback from numpy or tarfile) is a bug and is printed with the input that caused it.

Method: hypothesis generates inputs from valid seed files (byte edits, truncation, appended bytes,
gzip/tar re-wrapping of mutated content) plus random bytes; the targets are run in turn, a time
slice each, until the time is up. Inputs are not shrunk across targets; each failure is reported
once with hypothesis's minimal example.

Run: ``python benchmarks/fuzz_readers.py [minutes [target]]`` (default 3 minutes, every target;
``target`` is a substring of a target's name, e.g. ``tar``). Prints examples/s per target and
every non-DataError failure; exits 1 if there was one. Results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import gzip
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from datafiles import (  # noqa: E402
    cifar_member_files,
    cifar_pickle_bytes,
    idx_bytes,
    tar_gz_bytes,
)

from bigbatch.data.cifar import (  # noqa: E402
    CIFAR_FORMATS,
    load_cifar_split,
    parse_cifar_binary,
    parse_cifar_pickle,
)
from bigbatch.data.idx import parse_idx, read_idx  # noqa: E402
from bigbatch.errors import DataError  # noqa: E402

_GOOD_IDX = idx_bytes(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28))
_GOOD_LABELS = idx_bytes(np.arange(5, dtype=np.uint8))
_GOOD_PICKLE = cifar_pickle_bytes(np.zeros((2, 3072), np.uint8), np.array([1, 2]), "labels")
_GOOD_BINARY = bytes([3]) + bytes(3072) + bytes([7]) + bytes(range(256)) * 12
_CIFAR_FILES, _ = cifar_member_files(10, "python", per_file=1)
_TEST_MEMBER = "cifar-10-batches-py/test_batch"


def _mutate(data: bytes, edits, cut: int | None, tail: bytes) -> bytes:
    buf = bytearray(data)
    for position, value in edits:
        if buf:
            buf[position % len(buf)] = value
    if cut is not None:
        buf = buf[: cut % (len(buf) + 1)]
    return bytes(buf) + tail


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8)
    return st.one_of(
        st.binary(max_size=400),
        st.builds(_mutate, st.just(seed), edits, st.none() | st.integers(0, 10**6),
                  st.binary(max_size=8)),  # fmt: skip
    )


# -- targets: each returns normally or raises DataError; the checks assert consistency --------
def idx_raw(data: bytes) -> None:
    array = parse_idx(data, "fuzz")
    assert array.nbytes <= len(data), "an array larger than its input"


def idx_gzip(data: bytes, workdir: Path) -> None:
    path = workdir / "fuzz-idx.gz"
    path.write_bytes(data)
    array = read_idx(path)
    assert array.dtype.isnative


def cifar_pickle(data: bytes) -> None:
    images, labels = parse_cifar_pickle(data, "fuzz", "labels", 10)
    assert images.shape == (len(labels), 3, 32, 32) and images.dtype == np.uint8
    assert labels.size == 0 or (labels.min() >= 0 and labels.max() < 10)


def cifar_binary(data: bytes) -> None:
    images, labels = parse_cifar_binary(data, "fuzz", 1, 10)
    assert len(images) == len(labels) == len(data) // 3073


def cifar_archive(data: bytes, workdir: Path) -> None:
    layout = CIFAR_FORMATS[10][0]
    (workdir / layout.archive).write_bytes(data)
    images, labels = load_cifar_split(workdir, "test", 10)
    assert images.shape == (len(labels), 3, 32, 32)


def _gzip_of(strategy):
    return strategy.map(lambda d: gzip.compress(d, mtime=0))


def _strategies():
    """(name, strategy, target) per reader: mutated content wrapped, and mutated wrappers."""
    good_gz = gzip.compress(_GOOD_IDX, mtime=0)
    tar_members = st.builds(
        lambda member: tar_gz_bytes({**_CIFAR_FILES, _TEST_MEMBER: member}),
        _mutations(_CIFAR_FILES[_TEST_MEMBER]),
    )
    return [
        ("idx raw", st.one_of(_mutations(_GOOD_IDX), _mutations(_GOOD_LABELS)), idx_raw),
        ("idx gzip(mutated idx)", _gzip_of(_mutations(_GOOD_IDX)), "idx_gzip"),
        ("idx mutated gzip", _mutations(good_gz), "idx_gzip"),
        ("cifar pickle", _mutations(_GOOD_PICKLE), cifar_pickle),
        ("cifar binary", _mutations(_GOOD_BINARY), cifar_binary),
        ("cifar tar.gz(mutated member)", tar_members, "cifar_archive"),
        ("cifar mutated tar.gz", _mutations(tar_gz_bytes(_CIFAR_FILES)), "cifar_archive"),
    ]


def _run_slice(name, strategy, target, seconds: float, counts: dict, failures: dict) -> None:
    stop = time.monotonic() + seconds
    current = {"input": b""}

    def unraisable(info) -> None:  # errors raised in __del__/GC: invisible otherwise
        failures.setdefault(
            f"{name} (unraisable)",
            f"{info.exc_type.__name__}: {info.exc_value} in {info.object!r}; "
            f"last input {current['input'][:200]!r}",
        )

    sys.unraisablehook = unraisable

    class _TimeUp(Exception):
        pass

    @settings(max_examples=10**9, deadline=None, print_blob=False, database=None,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def check(data):
        if time.monotonic() > stop:
            raise _TimeUp
        counts[name] = counts.get(name, 0) + 1
        current["input"] = data
        try:
            # As in the test suite (filterwarnings = error): a reader that warns is a failure.
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                target(data)
        except DataError:
            pass

    try:
        check()
    except _TimeUp:
        pass
    except Exception as exc:  # noqa: BLE001 - the point of a fuzzer: report whatever escaped
        # hypothesis reruns the shrunk example last, so current["input"] is the minimal one
        frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)[-4:]))
        failures.setdefault(
            name,
            f"{''.join(traceback.format_exception_only(exc)).strip()[:600]}\n{frames}"
            f"input ({len(current['input'])} bytes): {current['input'][:300]!r}",
        )
    finally:
        sys.unraisablehook = sys.__unraisablehook__


def main(minutes: float = 3.0, only: str = "") -> int:
    counts: dict[str, int] = {}
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        bound = {
            "idx_gzip": lambda d: idx_gzip(d, workdir),
            "cifar_archive": lambda d: cifar_archive(d, workdir),
        }
        targets = [(n, s, bound.get(t, t) if isinstance(t, str) else t)
                   for n, s, t in _strategies() if only in n]  # fmt: skip
        start = time.monotonic()
        deadline = start + 60 * minutes
        slice_s = max(2.0, min(20.0, 60 * minutes / (4 * len(targets))))
        while time.monotonic() < deadline:
            for name, strategy, target in targets:
                if name in failures:
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                _run_slice(name, strategy, target, min(slice_s, left), counts, failures)
        elapsed = time.monotonic() - start
    total = sum(counts.values())
    print(f"fuzz_readers: {minutes:g} min on {platform.machine()} ({os.cpu_count()} cores), "
          f"Python {platform.python_version()}, numpy {np.__version__}")
    for name, _, _ in _strategies():
        if only not in name:
            continue
        n = counts.get(name, 0)
        status = "FAIL" if any(f.startswith(name) for f in failures) else "ok"
        print(f"  {name:<30} {n:>8} examples  {n / elapsed:8.0f}/s  {status}")
    print(f"  {'total':<30} {total:>8} examples  {total / elapsed:8.0f}/s  "
          f"{len(failures)} target(s) with a non-DataError failure")
    for name, text in failures.items():
        print(f"\n--- {name}: non-DataError failure ---\n{text}")
    return 1 if failures else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    raise SystemExit(main(float(args[0]) if args else 3.0, args[1] if len(args) > 1 else ""))
