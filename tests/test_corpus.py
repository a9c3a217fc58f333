"""Streaming tokenization into a cached memory-mapped array: the same vocabulary and ids as
``data.tokenize`` + ``data.Vocab`` in memory, the cache's keys, and bounded memory."""
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from fastbptt import corpus, data, trainer

PIECES = ["the", "Time", "TRAVELLER", " ", "  ", "\n", "\r\n", "\n\n  \n", ".", ", ", "--", "1887",
          "é", "€", "😀", "naïve", "\t", "\ufeff", "x\ny", "q", "Z"]


def random_text(rng, n):
    """n pieces: words, spaces, LF and CRLF lines, punctuation, 2-, 3- and 4-byte UTF-8."""
    return "".join(rng.choice(PIECES, n))


def in_memory(text, mode, max_chars=None, val_fraction=0.0):
    """(vocab, train ids, val ids) as load_corpus computed them before the cache."""
    tokens = data.tokenize(text, mode)
    if max_chars is not None:
        tokens = tokens[:max_chars]
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    vocab = data.Vocab(train)
    return vocab, vocab.encode(train), vocab.encode(val)


def cached(path, mode, folder, **kw):
    return corpus.token_ids(path, mode, cache=folder, min_cached_bytes=0, quiet=True, **kw)


@pytest.mark.parametrize("mode", data.TOKENIZERS)
def test_streaming_matches_tokenize_and_vocab_in_memory(tmp_path, rng, mode):
    # chunks of 1..7 bytes split UTF-8 sequences, CRLFs and lines everywhere
    for trial in range(40):
        text = random_text(rng, int(rng.integers(1, 120))) + "a"
        f = tmp_path / f"t{trial}.txt"
        f.write_bytes(text.encode())
        chunk = int(rng.integers(1, 8))
        for t in (corpus.token_ids(f, mode, chunk_bytes=chunk), cached(f, mode, tmp_path / "c", chunk_bytes=chunk)):
            tokens = data.tokenize(text, mode)
            vocab = data.Vocab(tokens)
            assert t.vocab == vocab, (text, chunk)
            np.testing.assert_array_equal(t.ids, vocab.encode(tokens), err_msg=f"{text!r} chunk {chunk}")
            assert t.sha256 == hashlib.sha256(text.encode()).hexdigest()
            for max_chars in (None, 7, 40):
                for val_fraction in (0.0, 0.1, 0.5):
                    got = corpus.split(t, max_chars, val_fraction)
                    want = in_memory(text, mode, max_chars, val_fraction)
                    assert got[0] == want[0]
                    np.testing.assert_array_equal(got[1], want[1])
                    np.testing.assert_array_equal(got[2], want[2])


def test_book_rule_across_chunk_boundaries(tmp_path):
    # a line spanning many chunks, a run of non-letters with and without a newline across chunks
    text = "Ab" + "c" * 50 + " ,;\r\n" + " " * 30 + "d!" + "." * 40 + "E\n\n\nf" + "-" * 25 + "\n"
    f = tmp_path / "t.txt"
    f.write_bytes(text.encode())
    for chunk in (1, 2, 3, 5, 16, 1 << 20):
        t = corpus.token_ids(f, "book", chunk_bytes=chunk)
        assert t.vocab.decode(t.ids) == "".join(data.tokenize(text, "book")) == "ab" + "c" * 50 + "d ef"


@pytest.mark.parametrize("mode", data.TOKENIZERS)
def test_embedded_corpus_is_unchanged(mode):
    t = corpus.token_ids(None, mode)
    text = data.load_text()
    assert t.sha256 == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert t.ids.dtype == np.uint8 and t.file is None
    for max_chars, val_fraction in ((10000, 0.0), (None, 0.1)):
        got, want = corpus.split(t, max_chars, val_fraction), in_memory(text, mode, max_chars, val_fraction)
        assert got[0] == want[0]
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])


def test_validation_tokens_unseen_in_training_are_unk(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("ab" * 50 + "xyz")
    t = cached(f, "chars", tmp_path / "c")
    vocab, train, val = corpus.split(t, None, 0.04)
    assert vocab.idx_to_token == ["<unk>", "a", "b"]
    np.testing.assert_array_equal(val, [2, 0, 0, 0])


def test_split_names_bad_arguments(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("ab" * 50)
    t = cached(f, "chars", tmp_path / "c")
    for max_chars in (-5, 0, 2.5, True):
        with pytest.raises(ValueError, match="^max_chars: expected a positive integer"):
            corpus.split(t, max_chars, 0.0)
    for val_fraction in (-0.5, 1.0, 2.0, None, "0.1"):
        with pytest.raises(ValueError, match=r"^val_fraction: expected a number in \[0, 1\)"):
            corpus.split(t, None, val_fraction)


def test_compact_dtypes():
    assert corpus.compact_dtype(256) == np.uint8
    assert corpus.compact_dtype(257) == np.uint16
    assert corpus.compact_dtype(1 << 16) == np.uint16
    assert corpus.compact_dtype((1 << 16) + 1) == np.uint32


def test_many_distinct_characters_take_uint16(tmp_path, rng):
    text = "".join(chr(c) for c in rng.integers(0x4E00, 0x4E00 + 400, 3000))     # CJK
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    t = cached(f, "chars", tmp_path / "c", chunk_bytes=100)
    assert t.ids.dtype == np.uint16 and isinstance(t.ids, np.memmap)
    vocab, train, val = corpus.split(t, None, 0.1)
    want = in_memory(text, "chars", None, 0.1)
    assert vocab == want[0]
    np.testing.assert_array_equal(train, want[1])
    np.testing.assert_array_equal(val, want[2])


def entries(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("damage", ["zeroed", "id past the vocabulary", "json a list", "json without tokens"])
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, damage):
    """ids changed on disk (their size unchanged) fail the CRC-32 and are tokenized again with a
    warning; a JSON that is not an entry's is a miss: never wrong ids, never a traceback"""
    f = tmp_path / "t.txt"
    f.write_text("the time traveller said to the time machine\n" * 100)
    folder = tmp_path / "c"
    first = cached(f, "book", folder)
    want = np.array(first.ids)
    ids_file, meta_file = folder / f"{first.key}.ids", folder / f"{first.key}.json"
    if damage == "zeroed":
        ids_file.write_bytes(bytes(ids_file.stat().st_size))
    elif damage == "id past the vocabulary":
        raw = bytearray(ids_file.read_bytes())
        raw[10] = 200
        ids_file.write_bytes(bytes(raw))
    else:
        meta = json.loads(meta_file.read_text())
        meta_file.write_text("[]" if damage == "json a list" else json.dumps({k: v for k, v in meta.items()
                                                                              if k != "tokens"}))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        again = cached(f, "book", folder)
    np.testing.assert_array_equal(again.ids, want)
    assert again.vocab == first.vocab
    damaged = [str(w.message) for w in got if "damaged" in str(w.message)]
    assert len(damaged) == (1 if damage in ("zeroed", "id past the vocabulary") else 0), damaged
    assert entries(folder) == [f"{first.key}.ids", f"{first.key}.json"]


def test_cache_hit_maps_without_tokenizing(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("the time traveller\n" * 100)
    folder = tmp_path / "c"
    first = cached(f, "book", folder)
    ids_file = folder / f"{first.key}.ids"
    assert entries(folder) == [f"{first.key}.ids", f"{first.key}.json"]
    meta = json.loads((folder / f"{first.key}.json").read_text())
    assert meta["path"] == str(f.resolve()) and meta["mode"] == "book" and meta["dtype"] == "uint8"
    mtime = ids_file.stat().st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(corpus, "_build", fail)
    again = cached(f, "book", folder)
    assert isinstance(again.ids, np.memmap) and not again.ids.flags.writeable
    assert again.vocab == first.vocab and again.sha256 == first.sha256 and again.key == first.key
    np.testing.assert_array_equal(again.ids, first.ids)
    assert ids_file.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="tokenized again"):       # another tokenizer: its own entry
        cached(f, "chars", folder)


def test_a_changed_file_is_tokenized_again_and_its_old_entry_removed(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the time traveller\n" * 100)
    folder = tmp_path / "c"
    old = cached(f, "book", folder)
    f.write_text("the time traveller\n" * 99 + "by h g wells\n")             # same size or not: mtime
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    new = cached(f, "book", folder)
    assert new.key != old.key and new.sha256 != old.sha256
    assert new.vocab.decode(new.ids).endswith("travellerby h g wells")
    assert entries(folder) == [f"{new.key}.ids", f"{new.key}.json"]


def test_an_interrupted_tokenization_leaves_no_entry(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("the time traveller\n" * 1000)
    folder = tmp_path / "c"
    calls = []
    real = corpus._Tokenizer.__call__

    def interrupted(self, raw, text):
        calls.append(1)
        if len(calls) > 12:                   # in the second pass
            raise KeyboardInterrupt
        return real(self, raw, text)
    monkeypatch.setattr(corpus._Tokenizer, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cached(f, "book", folder, chunk_bytes=2000)
    assert entries(folder) == []
    monkeypatch.setattr(corpus._Tokenizer, "__call__", real)
    host = corpus._tmp_suffix().split(".tmp")[1].rpartition("-")[0]
    (folder / f".x-y.ids.tmp{host}-999999999").write_bytes(b"left by a killed process")
    (folder / ".x-y.ids.tmpanother_host-1").write_bytes(b"another host's, maybe alive (a shared disk)")
    t = cached(f, "book", folder, chunk_bytes=2000)
    assert entries(folder) == [".x-y.ids.tmpanother_host-1", f"{t.key}.ids", f"{t.key}.json"]


def test_a_failed_cache_write_tokenizes_in_memory_with_a_warning(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("the time traveller\n" * 100)

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(corpus.os, "replace", full)
    with pytest.warns(UserWarning, match=r"^cache: could not write the tokenized .*No space left"):
        t = cached(f, "book", tmp_path / "c")
    assert t.file is None and entries(tmp_path / "c") == []
    assert t.vocab.decode(t.ids) == "".join(data.tokenize(f.read_text(), "book"))


def test_the_cache_folder_follows_fastbptt_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBPTT_CACHE_DIR", str(tmp_path / "fc"))
    assert corpus.cache_dir() == tmp_path / "fc" / "corpora"
    f = tmp_path / "t.txt"
    f.write_text("abc " * 100)
    t = corpus.token_ids(f, "chars", min_cached_bytes=0, quiet=True)
    assert t.file == str(tmp_path / "fc" / "corpora" / f"{t.key}.ids")


def test_an_unwritable_cache_tokenizes_in_memory_with_a_warning(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the time traveller\n" * 100)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.warns(UserWarning, match=r"^cache: cannot write to .*; tokenizing .* in memory"):
        t = cached(f, "book", blocked / "c")
    assert t.file is None
    assert t.vocab.decode(t.ids) == "".join(data.tokenize(f.read_text(), "book"))


@pytest.mark.parametrize("content", [
    b"", b"  \n ", b"ab\x00cd", b"\xff\xfe\xfa abc", b"abc" * 10 + b"\xe2\x82", b"abc\xe2\x28\xa1 def",
    b"ok " * 10 + b"\xff" + b"x" * 30 + b"\x00",
])
@pytest.mark.parametrize("how", ["memory", "cache"])
def test_bad_files_raise_load_texts_errors(tmp_path, content, how):
    f = tmp_path / "t.txt"
    f.write_bytes(content)
    with pytest.raises(ValueError) as want:
        data.load_text(f)
    for chunk in (1, 4, 1 << 20):
        with pytest.raises(ValueError) as got:
            if how == "cache":
                cached(f, "book", tmp_path / "c", chunk_bytes=chunk)
            else:
                corpus.token_ids(f, "book", chunk_bytes=chunk)
        assert str(got.value) == str(want.value)
        assert str(got.value).startswith(f"path: {f} ")
    assert entries(tmp_path / "c") == []


def test_bad_arguments_name_them(tmp_path):
    with pytest.raises(ValueError, match=r"^path: no such file: /no/such"):
        corpus.token_ids("/no/such")
    with pytest.raises(ValueError, match=r"^mode: expected one of book, chars, got 'words'$"):
        corpus.token_ids(None, "words")
    with pytest.raises(ValueError, match=r"^chunk_bytes: "):
        corpus.token_ids(None, chunk_bytes=0)


def test_load_corpus_maps_a_cached_text_and_matches_the_in_memory_split(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(corpus, "MIN_CACHED_BYTES", 0)
    monkeypatch.setenv("FASTBPTT_CACHE_DIR", str(tmp_path / "fc"))
    text = random_text(rng, 3000)
    f = tmp_path / "t.txt"
    f.write_bytes(text.encode())
    for mode, max_chars in (("book", None), ("chars", 1000)):
        cfg = trainer.TrainConfig(text=str(f), tokenize=mode, max_chars=max_chars, num_steps=5,
                                  batch_size=4).resolved()
        c = trainer.load_corpus(cfg, quiet=True)
        vocab, train, val = in_memory(text, mode, max_chars, cfg.val_fraction)
        assert c.vocab == vocab and c.sha256 == hashlib.sha256(text.encode()).hexdigest()
        np.testing.assert_array_equal(c.train, train)
        np.testing.assert_array_equal(c.val, val)
        assert c.file.startswith(str(tmp_path / "fc" / "corpora"))


def write_big_text(path, size):
    """the text of bench/big_corpus.py (random lines of words, capitals, punctuation, é), written fast"""
    spec = importlib.util.spec_from_file_location("big_corpus", Path(__file__).parents[1] / "bench" / "big_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_text(path, size)


# The child measures its own resident memory (/proc/self/status) after warming up (imports,
# compiled kernels), then tokenizes into the cache, splits, runs the sampler over the
# whole training split and a few loss_and_grad: the peak may grow by a small, fixed amount.
CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import fastbptt
    from fastbptt import corpus, data

    def status():
        return {l.split(":")[0]: int(l.split()[1]) << 10 for l in open("/proc/self/status")
                if l.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile"))}

    p0 = fastbptt.init_params(28, 16, 28, seed=0)
    fastbptt.loss_and_grad(p0, np.zeros((35, 32), np.int64), np.zeros((35, 32), np.int64))
    warm = status()
    t0 = time.perf_counter()
    t = corpus.token_ids(sys.argv[1], "book", cache=sys.argv[2], quiet=True)
    tokenize_s = time.perf_counter() - t0
    vocab, train, val = corpus.split(t, None, 0.1)
    assert isinstance(train, np.memmap) and train.dtype == np.uint8
    params = fastbptt.init_params(len(vocab), 16, len(vocab), seed=0)
    rng = np.random.default_rng(0)
    steps = 0
    for X, Y in data.sequential_batches(train, 32, 35, rng):
        if steps < 50:
            loss, grads, h = fastbptt.loss_and_grad(params, X, Y)
        else:
            np.asarray(X, np.int64), np.asarray(Y, np.int64)
        steps += 1
    for X, Y in data.eval_batches(val, 32, 35):
        np.asarray(X, np.int64)
    print(json.dumps({"warm": warm, "end": status(), "tokens": int(t.n_tokens), "steps": steps,
                      "tokenize_s": tokenize_s}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_200_mb_text_trains_with_bounded_resident_memory(tmp_path):
    big = tmp_path / "big.txt"
    write_big_text(big, 200 << 20)
    size = big.stat().st_size
    out = subprocess.run([sys.executable, "-c", CHILD, str(big), str(tmp_path / "cache")], check=True,
                         capture_output=True, text=True, timeout=600).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["tokens"] > 0.9 * size and r["steps"] > 0.85 * r["tokens"] / (32 * 35)
    grown = r["end"]["VmHWM"] - r["warm"]["VmHWM"]
    # the tokenization's chunks, the map's read-ahead windows: far below the text's 200 MB
    assert grown < 80 << 20, (grown >> 20, r)
    assert r["end"]["RssFile"] - r["warm"]["RssFile"] < 64 << 20, r


def test_a_changed_file_trains_on_its_new_text(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MIN_CACHED_BYTES", 0)
    monkeypatch.setenv("FASTBPTT_CACHE_DIR", str(tmp_path / "fc"))
    f = tmp_path / "t.txt"
    f.write_text("abcd " * 400)
    opts = dict(text=str(f), tokenize="chars", hidden=8, num_steps=5, batch_size=4, epochs=1, quiet=True,
                sample_prefixes=())
    first = trainer.train(**opts)
    f.write_text("abcde" * 400)
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    second = trainer.train(**opts)
    assert first.vocab.idx_to_token[1:] != second.vocab.idx_to_token[1:]
    assert sorted(second.vocab.idx_to_token[1:]) == list("abcde")
    assert len(list((tmp_path / "fc" / "corpora").glob("*.json"))) == 1


def test_error_messages_keep_trainer_names(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=rf"^text: {re.escape(str(f))} is not UTF-8"):
        trainer.train(text=str(f), epochs=1, quiet=True)


def test_a_split_that_cannot_write_its_remapped_ids_remaps_them_in_memory(tmp_path, monkeypatch):
    """a split whose vocabulary ranks the tokens otherwise than the whole text writes its ids
    into the cache; where that fails (a folder made read-only, a full disk) it warns and
    remaps them in memory, the same ids"""
    monkeypatch.setattr(corpus, "MIN_CACHED_BYTES", 0)
    text = "a a a b\n" * 50 + "b b b b c\n" * 200           # the first part's ranking is a, b; the whole's b, a
    f = tmp_path / "t.txt"
    f.write_text(text)
    t = cached(f, "chars", tmp_path / "c")

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(corpus.os, "replace", full)
    with pytest.warns(UserWarning, match="could not write the split's ids .* remapping them in memory"):
        vocab, train, val = corpus.split(t, max_chars=300, val_fraction=0.1)
    want_vocab, want_train, want_val = in_memory(text, "chars", 300, 0.1)
    assert vocab == want_vocab
    np.testing.assert_array_equal(train, want_train)
    np.testing.assert_array_equal(val, want_val)


def test_a_splits_remapped_ids_carry_their_crc_and_a_damaged_file_is_remapped_again(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MIN_CACHED_BYTES", 0)
    text = "a a a b\n" * 50 + "b b b b c\n" * 200           # the first part's ranking is a, b; the whole's b, a
    f = tmp_path / "t.txt"
    f.write_text(text)
    t = cached(f, "chars", tmp_path / "c")
    want = in_memory(text, "chars", 300, 0.1)
    _, train, _ = corpus.split(t, max_chars=300, val_fraction=0.1)
    np.testing.assert_array_equal(train, want[1])
    remapped, = (tmp_path / "c").glob(f"{t.key}.300.*.ids")
    assert remapped.name.split(".")[-2] == f"{corpus._crc32(remapped):08x}"
    raw = bytearray(remapped.read_bytes())
    raw[3] ^= 1
    remapped.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="are damaged; remapping them again"):
        _, train, val = corpus.split(t, max_chars=300, val_fraction=0.1)
    np.testing.assert_array_equal(train, want[1])
    np.testing.assert_array_equal(val, want[2])
