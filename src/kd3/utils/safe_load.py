"""Loading files without running anything they contain.

A pickle is a program: unpickling ``data_batch_1`` may call any importable function with any
arguments. kd3 reads three kinds of files that use pickles, and each is loaded so that only data
can come out:

- CIFAR / ImageNet 32×32 python batches (``restricted_pickle``): an unpickler that resolves only
  the globals those files hold (numpy's array and dtype reconstructors), refusing any other;
- kd3's own ``.pt`` files (checkpoints, teachers, score caches): ``torch.load(weights_only=True)``,
  whose refusals ``refuse_unsafe`` turns into one clear line;
- ``.npz`` pools and batches (``read_npz``): ``allow_pickle=False``, object arrays refused.

TorchScript (``.ts``) is the exception: it is code by nature, and kd3 only loads one where the user
named it (``kd3 eval student.ts``, ``kd3 export``).
"""
from __future__ import annotations

import importlib
import pickle
import re
import stat
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


class UnsafeFileError(ValueError):
    """A file holds more than data (or is not the file it claims to be); nothing in it was run."""


# The globals a CIFAR or ImageNet32 batch references, by pickle protocol and numpy version:
# arrays are rebuilt by _reconstruct (protocols 0-4) or _frombuffer (protocol 5), under
# numpy.core (numpy 1) or numpy._core (numpy 2); Python 3 protocol-2 pickles store bytes as
# _codecs.encode(text, "latin1"). None of these can reach the file system or run a program.
_NUMPY_GLOBALS = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}


def _numpy_core_module(submodule: str) -> Any:
    # Resolve numpy 1 names on numpy 2 (and back) through whichever package this numpy has,
    # so an old pickle loads without numpy.core's deprecation shim.
    for package in ("numpy._core", "numpy.core"):
        try:
            return importlib.import_module(f"{package}.{submodule}")
        except ImportError:
            continue
    raise ImportError(f"numpy has neither numpy._core.{submodule} nor numpy.core.{submodule}")


def _allowed_global(module: str, name: str) -> Any | None:
    if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
        return getattr(np, name)
    if (module, name) == ("_codecs", "encode"):
        import _codecs

        return _codecs.encode
    package, _, submodule = module.rpartition(".")
    if package in ("numpy.core", "numpy._core") and (submodule, name) in _NUMPY_GLOBALS:
        return getattr(_numpy_core_module(submodule), name)
    return None


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path, what: str):
        super().__init__(file, encoding="latin1")  # latin1 reads Python-2 pickles (the original CIFAR) too
        self.path, self.what = path, what

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_global(module, name)
        if found is None:
            raise UnsafeFileError(f"refusing to load {self.path}: it references {module}.{name}, which {_a(self.what)} "
                                  f"never holds; the file is not a genuine {self.what}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(f"refusing to load {self.path}: it uses pickle persistent ids, which {_a(self.what)} "
                              "never holds")


def _a(what: str) -> str:
    return f"{'an' if what[:1].lower() in 'aeiou' else 'a'} {what}"


def restricted_pickle(path: Path, what: str) -> Any:
    """Unpickle ``path`` admitting only dicts, lists, str/bytes, numbers and numpy arrays.

    ``what`` names the expected content ("CIFAR batch") for the refusal message.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            return _DataOnlyUnpickler(handle, path, what).load()
        except UnsafeFileError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
            raise UnsafeFileError(f"cannot read {path} as {_a(what)}: {error}") from None


# torch words its refusal "... unsupported GLOBAL posix.system ..." (or "Unsupported global: GLOBAL ...").
_TORCH_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def refusal(path: Path, error: BaseException, what: str) -> UnsafeFileError:
    """One line for a ``torch.load(weights_only=True)`` refusal; torch's own message suggests
    turning the protection off, which is the wrong advice for a file that references code."""
    found = _TORCH_GLOBAL.search(str(error))
    if found:
        return UnsafeFileError(f"refusing to load {path}: it references {found.group(1)}, which {_a(what)} never holds; "
                               "it was not written by kd3")
    unsupported = re.search(r"Unsupported[^\n]*", str(error))  # e.g. "Unsupported operand 149"
    detail = unsupported.group(0) if unsupported else (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UnsafeFileError(f"refusing to load {path}: it is not {_a(what)} written by kd3 (torch: {detail})")


@contextmanager
def refuse_unsafe(path: Path, what: str) -> Iterator[None]:
    """Around a ``torch.load(weights_only=True)``: its refusal becomes an ``UnsafeFileError``."""
    try:
        yield
    except pickle.UnpicklingError as error:
        raise refusal(path, error, what) from None


def read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` with ``allow_pickle=False``; an object (pickled) array is refused by name.

    ``path`` must be a regular file (checked before opening: a FIFO would block forever, a device feed
    endless bytes), and one that is no zip archive is refused in one line, never with numpy's advice
    to enable ``allow_pickle``."""
    path = Path(path)
    require_regular(path, what)
    arrays = {}
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path} is not {_a(what)}: it is not an .npz archive "
                         f"({str(error).split('. ')[0][:120]})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # a bare .npy renamed: one array, no names
        raise ValueError(f"{path} is not {_a(what)}: it is a single .npy array, not an .npz archive of named arrays")
    with archive:
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
                raise UnsafeFileError(f"refusing to load {path}: array {key!r} holds pickled Python objects, "
                                      f"which {_a(what)} never holds") from None
    return arrays


def irregular_kind(mode: int) -> str | None:
    """What a ``stat`` mode that is not a regular file is, in words ("a FIFO (named pipe)", ...); None for a
    regular file. Checked before anything opens a path: a FIFO would block the reader forever, a device
    would feed it endless bytes."""
    if stat.S_ISREG(mode):
        return None
    return ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "a directory"
            if stat.S_ISDIR(mode) else "not a file")


def require_regular(path: Path, what: str) -> None:
    """``path`` is a regular file (or a link to one); else one line saying what it is, before anything reads it."""
    kind = irregular_kind(path.stat().st_mode)  # a missing file raises FileNotFoundError naming it
    if kind is not None:
        raise ValueError(f"{path} is not {_a(what)}: it is {kind}, not a regular file; nothing was read from it")


def read_npy(path: Path, what: str) -> np.ndarray:
    """One ``.npy`` with ``allow_pickle=False``; an object (pickled) array is refused by file name."""
    try:
        return np.load(Path(path), allow_pickle=False)
    except ValueError as error:
        if "pickle" not in str(error).lower():  # not a refusal: a malformed file, say so as numpy does
            raise
        raise UnsafeFileError(f"refusing to load {path}: it holds pickled Python objects, which {_a(what)} "
                              "never holds") from None
