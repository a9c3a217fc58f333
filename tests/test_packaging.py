"""The package a user installs: pyproject's metadata (fast), and the wheel itself (slow).

The slow tests build the wheel from a copy of the files a fresh clone holds (those git
tracks, and untracked ones it does not ignore: no build/, no .egg-info, no .venv), install
it into a clean virtual environment with no extras, and run the command line from another
folder: ``fastbptt --version``, a tiny ``fastbptt train`` on the packaged corpus, and the
commands that need an extra, which must say so in one line on stderr and exit 2.  They
need the package registry (or pip's cache) for numpy, numba, scipy and tqdm, and the
``build`` package (the ``test`` extra).  ``make test`` runs them (``pytest`` selects every
marker); ``pytest -m slow tests/test_packaging.py`` runs them alone.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fastbptt

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".benchmarks", ".hypothesis"}


def _pyproject():
    try:
        import tomllib
    except ImportError:                         # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ------------------------------------------------------------------------------ fast
def test_the_version_is_one():
    assert _pyproject()["project"]["version"] == fastbptt.__version__


def test_the_package_data_and_subpackages_are_declared():
    tool = _pyproject()["tool"]["setuptools"]
    assert "data/*.txt" in tool["package-data"]["fastbptt"]
    assert "fastbptt.*" in tool["packages"]["find"]["include"]          # fastbptt._cpu, fastbptt._cuda
    assert (ROOT / "fastbptt" / "data" / "timemachine.txt").is_file()


def test_the_extras_named_in_messages_exist():
    from fastbptt._preflight import EXTRA_OF
    extras = _pyproject()["project"]["optional-dependencies"]
    assert set(EXTRA_OF.values()) <= set(extras)


# ------------------------------------------------------------------------------ slow
def _source_files():
    """What a fresh clone holds: git's tracked and untracked-but-not-ignored files."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout.decode()
        files = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):    # not a git checkout: all but the build outputs
        files = [p for p in ROOT.rglob("*") if p.is_file()
                 and not SKIP & set(p.relative_to(ROOT).parts) and not any(
                     part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]
    return [p for p in files if p.is_file()]            # tracked but deleted: gone


def _run(argv, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the wheel, the clean venv's bin folder, a folder outside the source tree)"""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for f in _source_files():
        dst = src / f.relative_to(ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst)
    r = _run([sys.executable, "-m", "build", "--wheel", "--outdir", tmp / "dist", src], cwd=tmp)
    assert r.returncode == 0, f"python -m build failed (is `build` installed? it is in the test extra):\n" \
                              f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    wheel, = (tmp / "dist").glob("fastbptt-*.whl")
    r = _run([sys.executable, "-m", "venv", tmp / "venv"], cwd=tmp)
    assert r.returncode == 0, r.stderr
    bin_ = tmp / "venv" / ("Scripts" if os.name == "nt" else "bin")
    r = _run([bin_ / "python", "-m", "pip", "install", "-q", wheel], cwd=tmp)    # pip's cache is used
    assert r.returncode == 0, f"pip install of the wheel failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return wheel, bin_, elsewhere


@pytest.mark.slow
def test_the_wheel_holds_the_subpackages_and_the_corpus(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("fastbptt/cli.py", "fastbptt/_cpu/__init__.py", "fastbptt/_cuda/__init__.py",
                   "fastbptt/data/timemachine.txt"):
        assert module in names, module
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


@pytest.mark.slow
def test_the_clean_install_has_no_extras(installed):
    _, bin_, elsewhere = installed
    r = _run([bin_ / "python", "-c", "import importlib.util as u; "
              "print([m for m in ('matplotlib', 'torch', 'jax', 'numba_cuda') if u.find_spec(m)])"], elsewhere)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.slow
def test_version(installed):
    wheel, bin_, elsewhere = installed
    r = _run([bin_ / "fastbptt", "--version"], elsewhere)
    assert r.returncode == 0 and r.stdout.strip() == f"fastbptt {wheel.name.split('-')[1]}", r.stdout + r.stderr


@pytest.mark.slow
def test_train_from_another_folder_on_the_packaged_corpus(installed):
    _, bin_, elsewhere = installed
    r = _run([bin_ / "fastbptt", "train", "--max-chars", 2000, "--epochs", 2, "--hidden", 8, "--quiet"],
             elsewhere)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("epoch 2: perplexity") and "time traveller" in r.stdout, r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("argv, flag, needs", [
    (["train", "--max-chars", 2000, "--epochs", 2, "--hidden", 8, "--plot", "x.png"], "--plot", "fastbptt[plot]"),
    (["diagnose", "--init", "--report", "out"], "--report", "fastbptt[plot]"),
    (["bench", "--quick", "--plot", "x.png"], "--plot", "fastbptt[plot]"),
    (["bench", "--quick", "--peers", "torch"], "--peers", "fastbptt[peers]"),
    (["bench", "--quick", "--peers", "jax"], "--peers", "fastbptt[peers]"),
    (["train", "--max-chars", 2000, "--epochs", 2, "--hidden", 8, "--device", "cuda"], "--device", "fastbptt[cuda]"),
])
def test_a_missing_extra_is_one_line_and_exit_2(installed, argv, flag, needs):
    _, bin_, elsewhere = installed
    r = _run([bin_ / "fastbptt", *argv], elsewhere)
    err = r.stderr.strip()
    assert r.returncode == 2, r.stdout + r.stderr
    assert err.startswith(f"fastbptt {argv[0]}: error: {flag}: ") and "\n" not in err, err
    assert needs in err and r.stdout == "", err
    assert os.listdir(elsewhere) == []                  # no work was done: no output
