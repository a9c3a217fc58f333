"""Where fastbptt's CPU kernels and plans live on disk, and when a cached kernel is stale.

numba keys a cached kernel by the source of the one file that defines it.  fastbptt's
kernels inline code from the engine's other files (the register tile, the lanes, a
cell's epilogue) and read tunables from ``fastbptt.config`` at compile time, so that key
alone could run stale code after an upgrade or an edited tunable.  The rule here: every
kernel of ``fastbptt/_cpu`` is keyed by one stamp, a hash of all the engine's sources,
``config.py`` and the tunables' current values; change any and every kernel recompiles.
An index that another fastbptt sharing the folder wrote, and this one cannot read, is
stale too.

Kernels go where numba would put them (``__pycache__`` beside the sources when it is
writable, else the user-wide cache); plans (:mod:`fastbptt._cpu.plan`) go beside them.
``FASTBPTT_CACHE_DIR`` puts both elsewhere.
"""
import atexit
import functools
import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from numba.core import caching

from .. import config

_HERE = Path(__file__).resolve().parent
_SOURCES = sorted(_HERE.glob("*.py")) + [_HERE.parent / "config.py"]


@functools.cache
def stamp():
    """hash of the engine's sources and of the tunables' values (see the module notes)"""
    h = hashlib.sha256()
    for path in _SOURCES:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for name, value in sorted(vars(config).items()):
        if name.isupper():                   # sets sorted: their order varies by process
            h.update(f"{name}={sorted(value) if isinstance(value, (set, frozenset)) else value!r}".encode())
    return h.hexdigest()


def _user_dir(override=True):
    """FASTBPTT_CACHE_DIR (with ``override``), else $XDG_CACHE_HOME/fastbptt or ~/.cache/fastbptt"""
    if override and os.environ.get("FASTBPTT_CACHE_DIR"):
        return Path(os.environ["FASTBPTT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastbptt"


def _writable(path):
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


@functools.cache
def cache_dir():
    """the folder of the kernels and plans: FASTBPTT_CACHE_DIR, else _cpu/__pycache__ when
    writable, else ~/.cache/fastbptt.  One that cannot be written (a file, a read-only file
    system) is passed over with a warning, for the next of those, or at last a temporary
    folder that only this process uses (its kernels then compile again in the next one)."""
    given = os.environ.get("FASTBPTT_CACHE_DIR")
    tried = [Path(given)] if given else [_HERE / "__pycache__"]
    tried.append(_user_dir(override=False))
    for path in tried:
        if _writable(path):
            break
    else:
        path = Path(tempfile.mkdtemp(prefix="fastbptt-cache-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        warnings.warn(f"fastbptt: no writable cache folder ({', '.join(map(str, tried))}); the kernels "
                      "compile again in every process", RuntimeWarning, stacklevel=2)
        return path
    if given and path != tried[0]:
        warnings.warn(f"FASTBPTT_CACHE_DIR: cannot write into {given}; fastbptt's kernels and plans go to "
                      f"{path}", RuntimeWarning, stacklevel=2)
    return path


class _KernelLocator(caching._CacheLocator):
    """numba's cache locator for fastbptt's CPU kernels: cache_dir(), keyed by stamp()"""

    def __init__(self, py_func, py_file):
        self._lineno = py_func.__code__.co_firstlineno
        self._path = str(cache_dir())

    def get_cache_path(self):
        return self._path

    def get_source_stamp(self):
        return stamp()

    def get_disambiguator(self):
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        try:
            if Path(py_file).resolve().parent != _HERE:
                return None
            self = cls(py_func, py_file)
            self.ensure_cache_path()
        except OSError:
            return None
        return self


def _saving_or_warning(save):
    """numba's Cache.save_overload, which for fastbptt's kernels warns (once) instead of
    raising when the file cannot be written (a full disk): the kernel runs all the same,
    and compiles again in the next process"""
    warned = []

    def save_overload(self, sig, data):
        try:
            save(self, sig, data)
        except OSError as e:
            if not isinstance(getattr(self._impl, "locator", None), _KernelLocator):
                raise
            if not warned:
                warned.append(e)
                warnings.warn(f"fastbptt: cannot save a compiled kernel into {cache_dir()} "
                              f"({e.strerror or e}); the kernels not saved compile again in the next "
                              "process", RuntimeWarning, stacklevel=2)
    save_overload.fastbptt = True
    return save_overload


def _foreign_index_as_stale(load_index):
    """numba's IndexDataCacheFile._load_index, which for fastbptt's kernels reads an index
    that cannot be unpickled as a stale one (empty): written by another fastbptt sharing the
    folder (another version, or a copy under another name), it names classes this one lacks,
    and numba would raise on every load and save of that kernel"""
    def _load_index(self):
        try:
            return load_index(self)
        except Exception:
            if self._source_stamp != stamp():
                raise
            return {}
    _load_index.fastbptt = True
    return _load_index


def install():
    """put _KernelLocator first in numba's list of cache locators, its kernels' saves behind
    _saving_or_warning and their index loads behind _foreign_index_as_stale (once)"""
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl")
    if _KernelLocator not in impl._locator_classes:
        impl._locator_classes = [_KernelLocator] + list(impl._locator_classes)
    if not getattr(caching.Cache.save_overload, "fastbptt", False):
        caching.Cache.save_overload = _saving_or_warning(caching.Cache.save_overload)
    index = caching.IndexDataCacheFile
    if not getattr(index._load_index, "fastbptt", False):
        index._load_index = _foreign_index_as_stale(index._load_index)
