"""bench/train_peer.py on a tiny setting: both systems train, and torch's model starts as fastbptt's."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
SCRIPT = Path(__file__).parent.parent / "bench" / "train_peer.py"


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_train_peer_tiny(cell, tmp_path):
    out = tmp_path / "out.json"
    # 2300 tokens: two minibatches of 32 × 35 (the fewest the trainer takes is 1121)
    run = subprocess.run([sys.executable, str(SCRIPT), "--cell", cell, "--hidden", "8", "--max-chars", "2300",
                          "--epochs", "2", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fastbptt/torch tokens/s" in run.stdout
    r = json.loads(out.read_text())
    for name in ("fastbptt", "torch"):
        assert math.isfinite(r[name]["ppl"]) and 1 < r[name]["ppl"] < 100, r
        assert r[name]["tokens_per_s"] > 0
    # the same initial weights and first minibatch: the same loss, to float32 rounding
    assert r["first_loss"]["torch"] == pytest.approx(r["first_loss"]["fastbptt"], rel=1e-5)
    assert r["epoch1_ppl"]["torch"] == pytest.approx(r["epoch1_ppl"]["fastbptt"], rel=1e-3)
