"""benchmarks/peers.py (lht beside BERT, Longformer, ModernBERT) runs end to end at a tiny size.

Skipped without transformers (``pip install 'lhtcli[peers]'``); checks the script works, never speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_peers_benchmark_prints_every_model(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    args = "--ns 128 --window 16 --steps 1 --warmup 0 --shape 32,2,2,64 --vocab 200 --json peers.json"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "peers.py"), *args.split()],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "peers.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["lht", "bert", "longformer", "modernbert"]
    assert all(r["n"] == 128 and r["tokens_per_s"] > 0 and r["parameters"] > 0 for r in rows)
    assert all(r["lht_speedup"] > 0 for r in rows)
    table = [line for line in done.stdout.splitlines() if line.startswith("| 128 |")]
    assert len(table) == 4 and all(line.rstrip().endswith("x |") for line in table[1:])


def test_masking_rate_benchmark_prints_a_row_per_rate(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "masking_rate.py"), "--rates", "0.15,0.4",
                           "--steps", "1", "--warmup", "0"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 0.")]
    assert [r.split("|")[1].strip() for r in rows] == ["0.15", "0.4"]
    assert rows[0].rstrip().endswith("1.00x |")
