"""Build, cache and call the fused CPU kernels of ghost batch norm (``ghost_bn_cpu.c``).

The kernels are plain C with OpenMP, compiled on first use by the system C compiler (``$CC`` or
``cc``; about a second) into a per-user cache and loaded with ctypes: no Python or torch headers,
nothing to build at install time. They share torch's OpenMP thread pool (the library links
``libgomp.so.1``, which torch has already loaded) and its thread count
(``torch.get_num_threads()``).

Where they cannot be used — not Linux, torch built without OpenMP, no C compiler, a failed build, or
``BIGBATCH_GBN_BACKEND=torch`` (see ``backend.py``) — ghost batch norm runs its vectorised PyTorch
ops instead (same results, slower on CPU); :func:`status` says which and why, and
``benchmarks/ghost_bn.py`` prints it.

Environment:
    BIGBATCH_CPU_KERNEL: deprecated (``backend.py`` warns): ``0`` never builds or uses the kernels;
        use ``BIGBATCH_GBN_BACKEND=torch`` instead.
    BIGBATCH_CACHE_DIR: where the built library is kept (default ``$XDG_CACHE_HOME/bigbatch`` or
        ``~/.cache/bigbatch``). The file name holds a hash of the source, compiler, flags and CPU
        model, so a changed source or another machine sharing the directory gets its own build.
        The library found there is loaded as is: like torch's own extension cache, the directory
        must be writable by its user only (the default, under the home directory, is).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from bigbatch.fileio import atomic_write_bytes
from bigbatch.machine import cpu_name

__all__ = ["available", "backward", "disabled", "forward", "status", "usable"]

_LOG = logging.getLogger(__name__)
_ABI_VERSION = 4
_FLAGS = [
    "-O3",
    "-march=native",  # built on the machine that runs it; the CPU model is part of the cache key
    "-fopenmp",
    "-fPIC",
    "-shared",
    # Lets the compiler vectorise the sums (reassociation) without assuming there are no NaNs/infs.
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fassociative-math",
    "-fno-signed-zeros",
]
_BUILD_TIMEOUT_S = 120

_lib: ctypes.CDLL | None = None
_status: str | None = None
_suspended = 0  # > 0 inside disabled()


def _cache_dir() -> Path:
    if os.environ.get("BIGBATCH_CACHE_DIR"):
        return Path(os.environ["BIGBATCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bigbatch"


def _compiler_identity(compiler: list[str]) -> str:
    result = subprocess.run(
        [*compiler, "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.splitlines()[0] if result.stdout else " ".join(compiler)


def _build(source: bytes, target: Path, compiler: list[str]) -> None:
    """Compile ``source`` in a scratch directory, then write the library to ``target`` atomically
    (``fileio.atomic_write_bytes``: a concurrent build of the same key is fine)."""
    with tempfile.TemporaryDirectory(prefix="bigbatch-build-") as tmp:
        src, built = Path(tmp) / "ghost_bn_cpu.c", Path(tmp) / "ghost_bn_cpu.so"
        src.write_bytes(source)
        result = subprocess.run(
            [*compiler, *_FLAGS, str(src), "-o", str(built), "-lm"],
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise OSError(f"{' '.join(compiler)} failed: {result.stderr.strip()[-2000:]}")
        atomic_write_bytes(target, built.read_bytes())


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"gbn_forward_{suffix}")
        fwd.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i32, f64, i32]
        fwd.restype = None
        bwd = getattr(lib, f"gbn_backward_{suffix}")
        bwd.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, i32, i32]
        bwd.restype = None
    lib.gbn_abi_version.restype = i32


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    if lib.gbn_abi_version() != _ABI_VERSION:
        raise OSError(f"{path} has ABI version {lib.gbn_abi_version()}, not {_ABI_VERSION}")
    return lib


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("BIGBATCH_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "off (BIGBATCH_CPU_KERNEL=0)"
    if not sys.platform.startswith("linux"):
        return None, f"not used on {sys.platform} (Linux only)"
    if not torch.backends.openmp.is_available():
        return None, "not used: this torch build has no OpenMP"
    found = shutil.which("cc") or shutil.which("gcc")
    compiler = shlex.split(os.environ.get("CC", "")) or ([found] if found else [])
    if not compiler:
        return None, "not built: no C compiler found (install gcc, or set CC)"
    source = resources.files("bigbatch.layers").joinpath("ghost_bn_cpu.c").read_bytes()
    try:
        identity = _compiler_identity(compiler)
        key = hashlib.sha256(
            b"\0".join(
                part.encode() if isinstance(part, str) else part
                for part in (
                    source, identity, " ".join(compiler + _FLAGS), platform.machine(), cpu_name()
                )
            )
        ).hexdigest()[:16]
        target = _cache_dir() / f"ghost_bn_cpu-{key}.so"
        lib = None
        if target.exists():
            try:
                lib = _open(target)
            except (OSError, AttributeError) as exc:  # damaged (say by hand): build it again
                _LOG.info("bigbatch: rebuilding %s, which does not load (%s)", target, exc)
        if lib is None:
            _build(source, target, compiler)
            lib = _open(target)
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        _LOG.warning(
            "bigbatch: ghost batch norm's CPU kernel could not be built or loaded (%s); using the "
            "slower PyTorch ops. Set BIGBATCH_GBN_BACKEND=torch to silence this.",
            exc,
        )
        return None, f"not built: {exc}"
    return lib, f"on ({target})"


def _library() -> ctypes.CDLL | None:
    global _lib, _status
    if _status is None:
        _lib, _status = _load()
    return _lib


def available() -> bool:
    """Whether the fused CPU kernels are built and loaded (building them on the first call)."""
    return _library() is not None


def status() -> str:
    """One line: whether ghost batch norm uses the fused CPU kernels, and why not if it does not."""
    _library()
    return f"ghost batch norm CPU kernel: {_status}"


@contextlib.contextmanager
def disabled():
    """Within this block ghost batch norm uses its PyTorch ops, not the kernels (for comparisons).

    Example:
        >>> with disabled():
        ...     usable(torch.ones(4, 2))
        False
    """
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def usable(x: Tensor) -> bool:
    """Whether ``x`` (the compute-dtype input) can go through the kernels, in eager mode."""
    return (
        not _suspended
        and x.numel() > 0  # the kernels read the first value of each ghost batch
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and available()
    )


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _suffix(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "f64"


def _check(t: Tensor, dtype: torch.dtype, numel: int, name: str) -> None:
    if t.dtype != dtype or not t.is_contiguous() or t.numel() != numel or t.device.type != "cpu":
        raise ValueError(f"ghost batch norm CPU kernel: bad {name} {t.dtype} {tuple(t.shape)}")


def _sizes(x3: Tensor, channels_last: bool, ghost_batch_size: int) -> tuple[int, int, int, int]:
    n = x3.shape[0]
    c, s = (x3.shape[2], x3.shape[1]) if channels_last else (x3.shape[1], x3.shape[2])
    return n, c, s, -(-n // ghost_batch_size)


def forward(
    x3: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    ghost_batch_size: int,
    eps: float,
    channels_last: bool,
    out3: Tensor,
) -> Tensor:
    """Ghost-normalise a contiguous 3-d ``x3`` ((N, C, S) or, if ``channels_last``, (N, S, C)).

    Writes the output into ``out3`` (contiguous, like ``x3``; a view of the caller's output
    tensor, so that the caller returns no view) and returns the statistics ``(4, G, C)``: per
    ghost batch and channel the mean, the biased variance, 1/sqrt(var + eps) and the mean's
    rounding error (kept for :func:`backward`).
    """
    lib = _library()
    assert lib is not None, "call usable() first"
    n, c, s, groups = _sizes(x3, channels_last, ghost_batch_size)
    _check(x3, x3.dtype, n * c * s, "input")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check(t, x3.dtype, c, name)
    _check(out3, x3.dtype, n * c * s, "output")
    stats = x3.new_empty((4, groups, c))
    getattr(lib, f"gbn_forward_{_suffix(x3.dtype)}")(
        _ptr(x3), _ptr(out3), _ptr(weight), _ptr(bias), _ptr(stats),
        n, c, s, ghost_batch_size, int(channels_last), float(eps), torch.get_num_threads(),
    )  # fmt: skip
    return stats


def backward(
    x3: Tensor,
    dy3: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    ghost_batch_size: int,
    channels_last: bool,
    needs_grad: tuple[bool, bool, bool],
    dx3: Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    """Write the input gradient into ``dx3`` (if not None); return those of weight and bias.

    ``stats`` is what :func:`forward` returned for the same ``x3``; the weight and bias gradients
    are ``(C,)`` in the compute dtype, or None where ``needs_grad`` says so.
    """
    lib = _library()
    assert lib is not None, "call usable() first"
    n, c, s, groups = _sizes(x3, channels_last, ghost_batch_size)
    _check(x3, x3.dtype, n * c * s, "input")
    _check(dy3, x3.dtype, n * c * s, "grad_output")
    _check(stats, x3.dtype, 4 * groups * c, "statistics")
    if weight is not None:
        _check(weight, x3.dtype, c, "weight")
    if dx3 is not None:
        _check(dx3, x3.dtype, n * c * s, "input gradient")
    grad_w = x3.new_empty(c) if needs_grad[1] else None
    grad_b = x3.new_empty(c) if needs_grad[2] else None
    sums = x3.new_empty((2, groups, c))
    getattr(lib, f"gbn_backward_{_suffix(x3.dtype)}")(
        _ptr(x3), _ptr(dy3), _ptr(dx3), _ptr(weight), _ptr(stats), _ptr(sums), _ptr(grad_w),
        _ptr(grad_b), n, c, s, ghost_batch_size, int(channels_last), torch.get_num_threads(),
    )  # fmt: skip
    return grad_w, grad_b
