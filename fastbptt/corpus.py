"""Texts of any size as token ids: tokenized once, streaming, into a cached memory-mapped array.

:func:`token_ids` reads a UTF-8 file in chunks of :data:`CHUNK_BYTES` (twice: once to count
the tokens and hash the bytes, once to encode them) and keeps the ids in a compact dtype
(uint8 for ≤ 256 tokens), beside a JSON with the vocabulary; :func:`split` cuts the
book's ``max_chars`` / ``val_fraction`` from them as slices, with the vocabulary of the
training split, exactly as :func:`fastbptt.data.tokenize` + :class:`fastbptt.data.Vocab`
would build it from the whole text in memory.

The cache (``$FASTBPTT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastbptt`` or
``~/.cache/fastbptt``; then ``corpora/``) holds for each text ``<P>-<S>.ids`` and
``<P>-<S>.json``: P a hash of the absolute path and tokenizer, S of the size, mtime and
ctime (ns), inode and :data:`FORMAT`, so a changed file re-tokenizes and its old entry is
removed.  Both files are written under temporary names (``.tmp<host>-<pid>``) and renamed,
the JSON last: a killed tokenization leaves no entry.  Texts under :data:`MIN_CACHED_BYTES` are tokenized the
same way, in memory, on every run: a fraction of a second, not worth an entry on disk
(docs/corpora.md).
"""
from __future__ import annotations

import codecs
import dataclasses
import hashlib
import io
import json
import mmap
import os
import socket
import time
import warnings
import zlib
from pathlib import Path

import numpy as np

from . import data
from ._preflight import check_input

FORMAT = "fastbptt-corpus/2"
#: bytes read and tokenized at a time (the working memory is some tens of times this)
CHUNK_BYTES = 1 << 20
#: texts smaller than this are tokenized in memory on every run, not cached
MIN_CACHED_BYTES = 8 << 20
#: ids gathered (slices taken) from a cached map between two hand-backs of its pages
RELEASE_EVERY = 256
_ASCII_SPACE = b" \t\n\r\x0b\x0c"


def cache_dir():
    """The folder of the cached corpora: ``corpora/`` under fastbptt's user cache
    (``FASTBPTT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastbptt``, else ``~/.cache/fastbptt``)."""
    from ._cpu.cache import _user_dir           # the rule the kernels' cache follows
    return _user_dir() / "corpora"


@dataclasses.dataclass
class TokenIds:
    """A text's token ids under the whole text's vocabulary (``<unk>`` 0, then descending
    frequency, ties by first appearance), with what :func:`split` needs to derive a split's."""

    ids: np.ndarray            # (n,) uint8/16/32; a read-only memmap when cached
    vocab: data.Vocab
    counts: np.ndarray         # (V,) int64: occurrences of each id in the whole text (0 for <unk>)
    first: np.ndarray          # (V,) int64: position of each id's first occurrence (-1 for <unk>)
    sha256: str                # of the file's bytes (= of the decoded text, encoded as UTF-8)
    n_tokens: int = 0
    file: str | None = None    # the cached ids file, None when held in memory
    key: str | None = None     # the cache entry's name
    built_s: float | None = None   # seconds the tokenization took (when it ran in this process)


def compact_dtype(n):
    """The smallest unsigned dtype that holds ids 0 … n−1."""
    return np.dtype(np.uint8 if n <= 1 << 8 else np.uint16 if n <= 1 << 16 else np.uint32)


# ----------------------------------------------------------------------- tokenizing
class _Tokenizer:
    """``data.tokenize`` over a text given in pieces: each call takes the next piece, as bytes
    and as str, and returns its tokens as code points (uint8 for ``book``, uint32 for
    ``chars``); what a piece's tokens depend on from the pieces before is carried."""

    # book: A-Z → a-z, a-z and "\n" kept, every other byte (UTF-8's multi-byte ones too) → " "
    _BOOK = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or c == 10 else 32 for c in range(256))

    def __init__(self, mode):
        if mode not in data.TOKENIZERS:
            raise ValueError(f"mode: expected one of {', '.join(data.TOKENIZERS)}, got {mode!r}")
        self.mode = mode
        self.carry = b""                # book: the non-letters since the last letter: "", " " or "\n"
        self.letter_seen = False

    def __call__(self, raw, text):
        if self.mode == "chars":
            return np.frombuffer(text.encode("utf-32-le"), np.uint32)
        # book: per line, runs of non-letters → " ", stripped, lower case; lines joined with
        # no separator.  So a run of non-letters between two letters is " " unless it holds
        # a "\n", then nothing; at the text's ends, nothing.
        b = self.carry + raw.translate(self._BOOK)
        body = b.rstrip(b" \n")
        tail = b[len(body):]
        self.carry = b"\n" if b"\n" in tail else tail[:1]
        if not self.letter_seen:
            body = body.lstrip(b" \n")
        self.letter_seen = self.letter_seen or bool(body)
        a = np.frombuffer(body, np.uint8)
        if not a.size:
            return a
        sp = a == 32
        keep = np.ones(a.size, bool)
        np.logical_not(sp[1:] & sp[:-1], out=keep[1:])          # runs of spaces → one space
        a = a[keep]
        nl, sp = a == 10, a == 32
        drop = nl.copy()                                        # "\n" and the spaces beside one
        drop[1:] |= nl[:-1] & sp[1:]
        drop[:-1] |= nl[1:] & sp[:-1]
        return a[~drop]


def _pieces(f, path, mode, chunk_bytes, bar=None):
    """Yield (raw bytes, token code points) of each chunk of the binary file ``f``, raising
    :func:`data.load_text`'s ValueErrors (binary, not UTF-8, empty) as they show."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    tokenizer = _Tokenizer(mode)
    pos, blank = 0, True
    while True:
        raw = f.read(chunk_bytes)
        if b"\x00" in raw:
            raise ValueError(f"path: {path} looks binary (it contains NUL bytes); give a UTF-8 text file")
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            while rest := f.read(chunk_bytes):           # load_text's order: binary before not UTF-8
                if b"\x00" in rest:
                    raise ValueError(f"path: {path} looks binary (it contains NUL bytes); give a UTF-8 "
                                     "text file") from None
            raise ValueError(f"path: {path} is not UTF-8 ({e.reason} at byte {pos - pending + e.start})") from None
        blank = blank and not raw.strip(_ASCII_SPACE)
        if not raw:
            if blank:
                raise ValueError(f"path: {path} is empty")
            return
        pos += len(raw)
        if bar is not None:
            bar.update(len(raw))
        yield raw, tokenizer(raw, text)


def _count(f, path, mode, chunk_bytes, bar):
    """Pass 1: (n tokens, counts and first positions by code point, sha256 of the bytes)."""
    sha = hashlib.sha256()
    counts = np.zeros(0, np.int64)
    first = np.zeros(0, np.int64)
    n = 0
    for raw, toks in _pieces(f, path, mode, chunk_bytes, bar):
        sha.update(raw)
        if not toks.size:
            continue
        c = np.bincount(toks)
        if c.size > counts.size:
            counts = np.concatenate([counts, np.zeros(c.size - counts.size, np.int64)])
            first = np.concatenate([first, np.full(c.size - first.size, -1, np.int64)])
        missing = np.flatnonzero((c > 0) & (first[:c.size] < 0))
        k = 1 << 12
        while missing.size:                     # first appearances of new tokens: in growing prefixes
            cp, i = np.unique(toks[:k], return_index=True)
            seen = np.isin(cp, missing)
            first[cp[seen]] = n + i[seen]
            missing = np.setdiff1d(missing, cp)
            k *= 16
        counts[:c.size] += c
        n += toks.size
    return n, counts, first, sha.hexdigest()


def _ranked(counts, first):
    """code points of the tokens present, by descending count, ties by first appearance."""
    cps = np.flatnonzero(counts)
    return cps[np.lexsort((first[cps], -counts[cps]))]


def _build(open_text, path, mode, chunk_bytes, size, out=None, quiet=True):
    """Both passes over the text ``open_text()`` opens: TokenIds, with the ids in memory
    (``out`` None) or written to the binary file ``out`` (then ``ids`` is None)."""
    from tqdm.auto import tqdm
    t0 = time.perf_counter()

    def bar(what):
        return tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True, leave=False,
                    desc=f"tokenizing {Path(str(path)).name} ({what})", disable=quiet)

    with open_text() as f, bar("1/2 counting") as b:
        n, counts, first, sha = _count(f, path, mode, chunk_bytes, b)
    cps = _ranked(counts, first)
    V = cps.size + 1
    dtype = compact_dtype(V)
    lut = np.zeros(counts.size, dtype)
    lut[cps] = np.arange(1, V, dtype=dtype)
    parts, done = [], 0
    with open_text() as f, bar("2/2 encoding") as b:
        for _, toks in _pieces(f, path, mode, chunk_bytes, b):       # pass 2: encode
            if toks.size and int(toks.max()) >= lut.size:
                done = -1
                break
            ids = lut[toks]
            done += ids.size
            if out is None:
                parts.append(ids)
            else:
                out.write(ids.tobytes())
    if done != n:
        raise ValueError(f"path: {path} changed while it was being tokenized; run again")
    ids = (np.concatenate(parts) if parts else np.zeros(0, dtype)) if out is None else None
    vocab = data.Vocab(idx_to_token=[data.UNK] + [chr(c) for c in cps])
    return TokenIds(ids, vocab, np.concatenate([[0], counts[cps]]), np.concatenate([[-1], first[cps]]), sha,
                    n_tokens=n, built_s=time.perf_counter() - t0)


# ------------------------------------------------------------------------- the cache
class _Map(np.memmap):
    """A read-only memmap that hands the pages it has read back to the kernel (madvise
    DONTNEED) every :data:`RELEASE_EVERY` slices taken of it, so a pass over a map larger
    than memory keeps this process's resident memory bounded (they stay in the page cache)."""

    _reads = 0

    def __getitem__(self, index):
        res = super().__getitem__(index)
        if isinstance(res, np.memmap) and res._mmap is None:        # a gather: a copy
            res = res.view(np.ndarray)
        _Map._reads += 1
        if _Map._reads % RELEASE_EVERY == 0:
            release(self)
        return res


def release(ids):
    """Hand the pages of the memmap ``ids`` back to the kernel (no-op for other arrays)."""
    mm = getattr(ids, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def _map(file, dtype, n):
    if n == 0:
        return np.zeros(0, dtype)
    return _Map(file, dtype=dtype, mode="r", shape=(n,))


def _key(path, st, mode):
    """the entry's name: the path and tokenizer, then the file's state (size, times, inode)"""
    where = hashlib.sha256(f"{path}\0{mode}".encode()).hexdigest()[:16]
    state = hashlib.sha256(f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{FORMAT}"
                           .encode()).hexdigest()[:16]
    return f"{where}-{state}"


def _tmp_suffix():
    """``.tmp<host>-<pid>``: a temporary's owner, so that a cache on a shared disk tidies only
    the temporaries of this host's dead processes"""
    return f".tmp{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _tidy(folder, key):
    """Remove the other entries of the same path and tokenizer, and the temporaries of
    processes that died (killed while tokenizing)."""
    where = key.split("-")[0]
    for p in folder.glob(f"{where}-*"):
        if not p.name.startswith(key):
            p.unlink(missing_ok=True)
    host = socket.gethostname().replace("-", "_")
    for p in folder.glob(".*.tmp*"):
        owner, _, pid = p.name.rsplit(".tmp", 1)[1].rpartition("-")
        if owner == host and pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


def _crc32(file, chunk=1 << 24):
    """zlib's CRC-32 of a file's bytes, read a chunk at a time (not mapped: no resident pages)"""
    crc = 0
    with open(file, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _load(folder, key):
    """the entry ``key`` of ``folder``, or None when there is none, or one that is incomplete
    or damaged (its ids' CRC-32 is not the one written with them: tokenized again, with a
    warning) — a cache hit reads the ids once for that, at disk speed"""
    meta_file, ids_file = folder / f"{key}.json", folder / f"{key}.ids"
    try:
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            return None
        dtype, n = np.dtype(meta["dtype"]), meta["n_tokens"]
        vocab = data.Vocab(idx_to_token=[data.UNK] + list(meta["tokens"]))
        counts, first = np.array([0] + meta["counts"], np.int64), np.array([-1] + meta["first"], np.int64)
        if ids_file.stat().st_size != n * dtype.itemsize or not len(vocab) == len(counts) == len(first):
            return None
        if _crc32(ids_file) != meta["ids_crc32"]:
            warnings.warn(f"cache: the cached token ids of {meta.get('path')} ({ids_file}) are damaged; "
                          "tokenizing it again", stacklevel=3)
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return TokenIds(_map(ids_file, dtype, n), vocab, counts, first, meta["sha256"], n, str(ids_file), key)


def _store(folder, key, build, path, st, mode):
    """Build into temporaries and rename them in place, the JSON (what marks an entry
    complete) last."""
    folder.mkdir(parents=True, exist_ok=True)
    _tidy(folder, key)
    tmp_ids, tmp_meta = (folder / f".{key}.{ext}{_tmp_suffix()}" for ext in ("ids", "json"))
    try:
        with open(tmp_ids, "wb") as out:
            t = build(out)
        meta = {"format": FORMAT, "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "mode": mode, "sha256": t.sha256, "n_tokens": t.n_tokens, "ids_crc32": _crc32(tmp_ids),
                "dtype": compact_dtype(len(t.vocab)).name,
                "tokens": t.vocab.idx_to_token[1:], "counts": t.counts[1:].tolist(),
                "first": t.first[1:].tolist(), "built_s": round(t.built_s, 3)}
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_ids, folder / f"{key}.ids")
        os.replace(tmp_meta, folder / f"{key}.json")
    finally:
        tmp_ids.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)


def token_ids(path=None, mode="book", *, cache=None, chunk_bytes=None, min_cached_bytes=None,
              quiet=False) -> TokenIds:
    """The token ids of the UTF-8 file ``path`` (None: the embedded *The Time Machine*) under
    the whole text's vocabulary, tokenized by ``mode`` as :func:`data.tokenize` does.

    A file of ``min_cached_bytes`` (:data:`MIN_CACHED_BYTES`) or more is tokenized once into
    the cache (``cache``, a folder; default :func:`cache_dir`) with progress bars (not when
    ``quiet``) and memory-mapped from there after; a smaller one is tokenized in memory, and so
    is any when the cache cannot be written (with a warning).
    ValueErrors name ``path`` (missing, empty, binary, not UTF-8) or ``mode``.
    """
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: expected a positive number of bytes, got {chunk_bytes}")
    if mode not in data.TOKENIZERS:
        raise ValueError(f"mode: expected one of {', '.join(data.TOKENIZERS)}, got {mode!r}")
    if path is None:                                # the embedded text, as load_text reads it
        raw = data.load_text(None).encode("utf-8")
        return _build(lambda: io.BytesIO(raw), "timemachine.txt", mode, chunk_bytes, len(raw))
    p = check_input("path", path)
    st = p.stat()
    limit = MIN_CACHED_BYTES if min_cached_bytes is None else min_cached_bytes
    if st.st_size < limit:
        return _build(lambda: open(p, "rb"), path, mode, chunk_bytes, st.st_size)
    folder = Path(cache) if cache is not None else cache_dir()
    key = _key(p.resolve(), st, mode)
    hit = _load(folder, key)
    if hit is not None:
        return hit
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe{_tmp_suffix()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        warnings.warn(f"cache: cannot write to {folder} ({e.strerror or e}); tokenizing {path} in memory "
                      "(set FASTBPTT_CACHE_DIR to a writable folder to tokenize it once)", stacklevel=2)
        return _build(lambda: open(p, "rb"), path, mode, chunk_bytes, st.st_size, quiet=quiet)

    def build(out):
        t = _build(lambda: open(p, "rb"), path, mode, chunk_bytes, st.st_size, out, quiet)
        now = p.stat()
        if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise ValueError(f"path: {path} changed while it was being tokenized; run again")
        return t

    try:
        _store(folder, key, build, p.resolve(), st, mode)
    except OSError as e:                            # a full disk mid-write: the text still trains
        warnings.warn(f"cache: could not write the tokenized {path} to {folder} ({e.strerror or e}); "
                      "tokenizing it in memory", stacklevel=2)
        return _build(lambda: open(p, "rb"), path, mode, chunk_bytes, st.st_size, quiet=quiet)
    hit = _load(folder, key)
    if hit is None:
        raise OSError(f"cache: the tokenized {path} could not be read back from {folder}")
    return hit


# --------------------------------------------------------------------------- splits
def _bincount(ids, lo, hi, V, step=1 << 20):
    """Occurrences of each id in ids[lo:hi], read a slice at a time (the map's pages handed back)."""
    c = np.zeros(V, np.int64)
    for i in range(lo, hi, step):
        c += np.bincount(np.asarray(ids[i:min(hi, i + step)]), minlength=V)
        release(ids)
    return c


def _remapped(t, lut, n, dtype):
    """lut[t.ids[:n]] in memory"""
    out = lut[np.asarray(t.ids[:n])].astype(dtype, copy=False)
    release(t.ids)
    return out


def _remap(t, lut, n, dtype):
    """lut[t.ids[:n]]: in memory when small or not cached (or when its file cannot be written:
    with a warning), else a cached file of its own, ``<key>.<n>.<lut hash>.<CRC-32>.ids``,
    checked as the entry's ids are (a damaged one is written again, with a warning)."""
    if t.file is None or n * dtype.itemsize < MIN_CACHED_BYTES:
        return _remapped(t, lut, n, dtype)
    folder = Path(t.file).parent
    key = f"{t.key}.{n}.{hashlib.sha256(lut.tobytes()).hexdigest()[:16]}"
    for file in folder.glob(f"{key}.*.ids"):
        if file.stat().st_size == n * dtype.itemsize and f"{_crc32(file):08x}" == file.name.split(".")[-2]:
            return _map(file, dtype, n)
        warnings.warn(f"cache: the cached split ids {file} are damaged; remapping them again", stacklevel=3)
        file.unlink(missing_ok=True)
    tmp = folder / f".{key}{_tmp_suffix()}"
    try:
        crc = 0
        with open(tmp, "wb") as out:
            step = 1 << 20
            for i in range(0, n, step):
                block = lut[np.asarray(t.ids[i:min(n, i + step)])].astype(dtype, copy=False).tobytes()
                out.write(block)
                crc = zlib.crc32(block, crc)
                release(t.ids)
        file = folder / f"{key}.{crc:08x}.ids"
        os.replace(tmp, file)
    except OSError as e:                            # a folder that became read-only, a full disk
        warnings.warn(f"cache: could not write the split's ids to {folder} ({e.strerror or e}); "
                      "remapping them in memory", stacklevel=3)
        return _remapped(t, lut, n, dtype)
    finally:
        tmp.unlink(missing_ok=True)
    return _map(file, dtype, n)


def split(t: TokenIds, max_chars=None, val_fraction=0.0):
    """(vocab, train, val): the first ``max_chars`` tokens (all when None), the last
    ``val_fraction`` of them held out, the vocabulary built from the training split alone
    and the validation tokens it lacks mapped to ``<unk>`` — exactly what ``data.Vocab`` of
    the training tokens and its ``encode`` give.

    Exact without a second tokenization: the training split's counts are the whole text's
    less a bincount of the ids outside it (or a bincount of the split, the shorter), and a
    token's first appearance in it is its first in the text.  When the ranking they give is
    the whole text's (the usual case for a long text), train and val are slices of ``t.ids``
    (views of the map); otherwise the first ``max_chars`` ids are remapped once (cached).
    """
    if max_chars is not None:
        data.positive_int("max_chars", max_chars)
    data.fraction("val_fraction", val_fraction)
    n = t.ids.size if max_chars is None else min(int(max_chars), t.ids.size)
    n_train = n - int(n * val_fraction)
    V = len(t.vocab)
    if n_train <= t.ids.size - n_train:
        counts = _bincount(t.ids, 0, n_train, V)
    else:
        counts = t.counts - _bincount(t.ids, n_train, t.ids.size, V)
    counts[0] = 0
    ranked = _ranked(counts, t.first)                       # old ids in the split's order
    lut = np.zeros(V, np.int64)
    lut[ranked] = np.arange(1, ranked.size + 1)
    vocab = data.Vocab(idx_to_token=[data.UNK] + [t.vocab.idx_to_token[i] for i in ranked])
    present = np.flatnonzero((t.first >= 0) & (t.first < n))         # the ids that occur in ids[:n]
    if np.array_equal(lut[present], present):
        ids = t.ids[:n]
    else:
        ids = _remap(t, lut, n, compact_dtype(len(vocab)))
    return vocab, ids[:n_train], ids[n_train:n]
