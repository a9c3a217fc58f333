"""What a run needs, checked before it does any work: the optional dependencies (extras) and
hardware a feature asked for, and folders the outputs can be written into; and how the outputs
are written (whole, and as strict JSON).

Each check raises with a one-line message that starts with the parameter that asked for it
(``plot: …``); the command line replaces that with the flag (``--plot: …``).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import importlib.util
import math
import os
import tempfile
from pathlib import Path

#: the modules of the extras, by the extra that installs them
EXTRA_OF = {"matplotlib": "plot", "torch": "peers", "jax": "peers", "numba_cuda": "cuda", "mpi4py": "mpi"}


class MissingExtra(ImportError):
    """A feature asked for needs an optional dependency (``pip install fastbptt[EXTRA]``), or
    hardware, that is not here."""


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def require_matplotlib(what):
    """MissingExtra unless matplotlib imports (the figures: ``plot``, ``report``)."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise MissingExtra(f"{what}: needs matplotlib, which is not installed: "
                           "pip install fastbptt[plot]") from None


def require_modules(what, modules):
    """MissingExtra unless every one of ``modules`` is installed (found, not imported)."""
    missing = [m for m in dict.fromkeys(modules) if importlib.util.find_spec(m) is None]
    if missing:
        extras = ",".join(dict.fromkeys(EXTRA_OF.get(m, m) for m in missing))
        verb = "is" if len(missing) == 1 else "are"
        raise MissingExtra(f"{what}: {' and '.join(missing)} {verb} not installed: pip install fastbptt[{extras}]")


def require_cuda(what="device"):
    """MissingExtra unless the CUDA backend can run here: numba-cuda and a CUDA GPU (or the
    numba-cuda simulator, ``NUMBA_ENABLE_CUDASIM=1``)."""
    if importlib.util.find_spec("numba_cuda") is None:
        raise MissingExtra(f"{what}: cuda needs numba-cuda, which is not installed, and a CUDA GPU: "
                           "pip install fastbptt[cuda]")
    try:
        backend = importlib.import_module("fastbptt._cuda")
    except Exception as e:            # an install that does not import
        raise MissingExtra(f"{what}: cuda needs numba-cuda, which does not import here ({_first_line(e)}): "
                           "pip install fastbptt[cuda]") from None
    if not backend.available():
        raise MissingExtra(f"{what}: cuda needs a CUDA GPU and its driver, and none was found")


def require_mpi(what):
    """mpi4py's ``MPI`` module (importing it initializes MPI), or MissingExtra: mpi4py is not
    installed, or it finds no MPI library (the ``mpi`` extra brings one from PyPI; on a
    cluster, the site's MPI: see docs/scale.md)."""
    if importlib.util.find_spec("mpi4py") is None:
        raise MissingExtra(f"{what}: MPI needs mpi4py, which is not installed: pip install fastbptt[mpi]")
    try:
        return importlib.import_module("mpi4py.MPI")
    except Exception as e:            # no libmpi, or one it cannot use
        raise MissingExtra(f"{what}: mpi4py found no usable MPI library ({_first_line(e)}): "
                           "pip install fastbptt[mpi], or load the site's MPI") from None


def _probe(what, folder):
    """ValueError unless a file can be made in ``folder`` (made and removed: the permission
    bits do not tell a read-only file system, /proc or root's rights apart)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".fastbptt-probe-")
    except OSError as e:
        raise ValueError(f"{what}: cannot write into {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def _existing_ancestor(p):
    p = Path(p)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_folder(what, folder):
    """ValueError unless ``folder`` is, or can be made, a writable folder."""
    _named_path(what, folder)
    folder = Path(folder)
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise ValueError(f"{what}: {base} is a file, not a folder")
    _probe(what, base)


@contextlib.contextmanager
def written_whole(path):
    """a temporary path beside ``path`` to write the output into, put in its place when the
    block ends without an error and removed when it raises: a write that fails (a full disk)
    leaves the file before as it was"""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_whole(path, text):
    """``text`` into ``path``, written whole (written_whole)"""
    with written_whole(path) as tmp:
        tmp.write_text(text)


def write_json_whole(path, obj):
    """``obj`` as strict JSON into ``path``, written whole: a non-finite number as null (_json_safe)"""
    write_text_whole(path, json.dumps(_json_safe(obj), indent=1, allow_nan=False))


def _json_safe(x):
    """``x`` with every non-finite float as None: JSON's null (NaN and inf are not JSON, and
    strict parsers refuse them); dicts, lists and tuples gone through"""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def check_output(what, path, *, replaced=False):
    """ValueError unless a file can be written at ``path``: its folder exists, is a folder and
    is writable, and ``path`` is not a folder.  ``replaced``: the file is written beside and
    renamed over ``path`` (so only the folder must be writable), else opened for writing."""
    _named_path(what, path)
    p = Path(path)
    folder = p.parent                  # Path(".") for a bare name
    if p.is_dir():
        raise ValueError(f"{what}: {path} is a folder, not a file")
    if replaced and p.exists() and not p.is_file():      # a FIFO or a device: never renamed over
        raise ValueError(f"{what}: {path} is not a regular file")
    if not folder.exists():
        base = _existing_ancestor(folder)
        if not base.is_dir():
            raise ValueError(f"{what}: {base} is a file, not a folder")
        raise ValueError(f"{what}: no such folder: {folder}")
    if not folder.is_dir():
        raise ValueError(f"{what}: {folder} is a file, not a folder")
    if not replaced and p.exists():    # opened for writing: the file's own permission counts
        if not os.access(p, os.W_OK):
            raise ValueError(f"{what}: cannot write {path} (read-only or no permission)")
    else:
        _probe(what, folder)


def check_input(what, path):
    """``path`` as a Path, or ValueError unless it names an existing regular file"""
    if str(path) == "":
        raise ValueError(f"{what}: an empty path names no file")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what}: {path} is a folder, not a file")
    if not p.exists():
        raise ValueError(f"{what}: no such file: {path}")
    if not p.is_file():
        raise ValueError(f"{what}: {path} is not a regular file")
    return p


def check_distinct(outputs, inputs=()):
    """ValueError if two of the ``outputs`` (paths or None), or an output and one of the
    ``inputs``, are one file: writing one would destroy the other.  ``outputs``: {name: path},
    each named in its message; ``inputs``: paths."""
    seen = {os.path.realpath(path): ("an input", path) for path in inputs if path is not None}
    for name, path in outputs.items():
        if path is None:
            continue
        _named_path(name, path)
        key = os.path.realpath(path)
        if key in seen:
            what, other = seen[key]
            raise ValueError(f"{name}: {path} is the same file as {what} of this run ({other})")
        seen[key] = ("another output", path)


def figure_file(path):
    """the file matplotlib writes for ``path``: itself, or with .png when it has no suffix"""
    return None if path is None else path if Path(path).suffix else f"{path}.png"


def _named_path(what, path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: expected a path, got {type(path).__name__}")
    if not str(path).strip():
        raise ValueError(f"{what}: expected a path, got {str(path)!r}")


def check_figure(what, path):
    """ValueError unless a file can be written at ``path`` in a format matplotlib (imported:
    require_matplotlib first) writes: its suffix's (none: png, which it appends)."""
    from matplotlib.backend_bases import FigureCanvasBase
    check_output(what, path)
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix[1:].lower()
    if suffix and suffix not in formats:
        raise ValueError(f"{what}: matplotlib writes no .{suffix} files (it writes {', '.join(sorted(formats))})")
