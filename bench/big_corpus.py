"""A text larger than memory would like: generate it, train on it, report the peak resident memory.

    python bench/big_corpus.py                      # 1 GiB: fastbptt train --text big.txt --epochs 1 --max-minutes 5
    python bench/big_corpus.py --size-mb 200 --stop-minutes 2 -- --hidden 64
    python bench/big_corpus.py --size-mb 200 --tokenize-only [--tokenize chars]   # tokenizing alone: MB/s, memory

The text (random lines of words, with capitals, punctuation and two-byte UTF-8) is written
to ``--dir`` (default TMPDIR/fastbptt-big-corpus, kept between runs), the cache to ``--dir``/cache (emptied first unless
``--warm``).  The run is ``fastbptt train --text big.txt --epochs 1 --max-minutes M`` plus
what follows ``--``; ``--max-minutes`` stops the run within its (hours-long) epoch, and
after ``--stop-minutes`` the run gets Ctrl-C in case it has not stopped (SIGINT; the
trainer stops cleanly).  Reported: the tokenization's time and MB/s
(from the cache entry), the child's peak resident set (``ru_maxrss`` of wait4, what
``/usr/bin/time -v`` prints) and the most anonymous / file-backed memory seen in
/proc/PID/status, each against the text's size.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_text(path, size, seed=0):
    """About ``size`` bytes of random lines of words, written in blocks of 20,000 lines."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxzETAOIN", np.uint8)
    words = [bytes(letters[rng.integers(0, letters.size, rng.integers(1, 10))]) for _ in range(3000)]
    words += [b"caf\xc3\xa9", b"na\xc3\xafve,", b"--", b"1887."]
    lines = [b" ".join(words[i] for i in rng.integers(0, len(words), rng.integers(0, 14))) + b"\n"
             for _ in range(20000)]
    with open(path, "wb") as f:
        while f.tell() < size:
            f.write(b"".join(lines[i] for i in rng.permutation(len(lines))))


def status(pid):
    try:
        return {ln.split(":")[0]: int(ln.split()[1]) << 10 for ln in open(f"/proc/{pid}/status")
                if ln.startswith(("VmRSS", "RssAnon", "RssFile"))}
    except (OSError, ValueError, IndexError):
        return {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=1024, help="the text's size in MiB (default 1024)")
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "fastbptt-big-corpus"),
                    help="where the text and the cache go (default: TMPDIR/fastbptt-big-corpus)")
    ap.add_argument("--max-minutes", type=float, default=5)
    ap.add_argument("--stop-minutes", type=float, default=8, help="SIGINT the run after this long")
    ap.add_argument("--tokenize", choices=["book", "chars"], default="book")
    ap.add_argument("--warm", action="store_true", help="keep the cache: measure a run that maps it")
    ap.add_argument("--tokenize-only", action="store_true", help="time fastbptt.corpus.token_ids alone")
    ap.add_argument("extra", nargs="*", help="more `fastbptt train` options, after --")
    a = ap.parse_args(argv)

    folder = Path(a.dir)
    folder.mkdir(parents=True, exist_ok=True)
    text, cache = folder / "big.txt", folder / "cache"
    size = int(a.size_mb * 2**20)
    if not text.is_file() or not size <= text.stat().st_size < size + (4 << 20):
        t0 = time.perf_counter()
        write_text(text, size)
        print(f"wrote {text} ({text.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t0:.1f} s")
    nbytes = text.stat().st_size
    if not a.warm:
        shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, FASTBPTT_CACHE_DIR=str(cache.resolve()))

    if a.tokenize_only:
        cmd = [sys.executable, "-c", "import sys, fastbptt.corpus as c; c.token_ids(sys.argv[1], sys.argv[2])",
               str(text), a.tokenize]
    else:
        exe = shutil.which("fastbptt") or str(Path(sys.executable).with_name("fastbptt"))
        cmd = [exe, "train", "--text", str(text), "--tokenize", a.tokenize, "--epochs", "1",
               "--max-minutes", str(a.max_minutes), *a.extra]
    print("$", " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    most = {}
    stopped = False
    while True:
        pid, code, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        for k, v in status(proc.pid).items():
            most[k] = max(most.get(k, 0), v)
        if not stopped and time.perf_counter() - t0 > 60 * a.stop_minutes:
            proc.send_signal(signal.SIGINT)
            stopped = True
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    report = {"text_mib": nbytes / 2**20, "wall_s": wall, "exit": os.waitstatus_to_exitcode(code),
              "sigint_after_stop_minutes": stopped, "peak_rss_mib": usage.ru_maxrss / 1024,
              "peak_rss_of_text": usage.ru_maxrss * 1024 / nbytes,
              **{f"max_{k}_mib": v / 2**20 for k, v in most.items()}}
    for meta in cache.glob("corpora/*.json"):
        m = json.loads(meta.read_text())
        if m.get("built_s"):
            report.update(tokens=m["n_tokens"], tokenize_s=m["built_s"],
                          tokenize_mb_per_s=m["size"] / 1e6 / m["built_s"])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
