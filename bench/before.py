"""An earlier checkout of fastbptt beside this one, in one process: its package copied as
``fastbptt_before`` into a temporary folder (its CUDA backend imported as its own, its plan
kept in a file of its own), for the
scripts' ``--before PATH`` (e.g. ``git worktree add /tmp/before REV``)."""
import importlib
import shutil
import sys
import tempfile
from pathlib import Path


def load_before(path, module=""):
    """``fastbptt_before`` (or its submodule ``module``, e.g. "torch") from the checkout at ``path``"""
    folder = Path(tempfile.mkdtemp())
    shutil.copytree(Path(path) / "fastbptt", folder / "fastbptt_before")
    api = folder / "fastbptt_before" / "api.py"
    api.write_text(api.read_text().replace('"fastbptt._cuda"', '"fastbptt_before._cuda"'))
    plan = folder / "fastbptt_before" / "_cpu" / "plan.py"      # a plan file of its own: the two
    if plan.exists():                                            # may differ in format
        plan.write_text(plan.read_text().replace('f"plan-{name}.json"', 'f"plan-before-{name}.json"'))
    sys.path.insert(0, str(folder))
    return importlib.import_module("fastbptt_before" + (f".{module}" if module else ""))
