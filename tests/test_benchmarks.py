"""The benchmark scripts the README and the closing notes quote still run and print their tables.

Tiny sizes and one repetition each: these check that the scripts work end to end (and that their numbers
are consistent where that is exact), never how fast anything is.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"


def run_benchmark(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert done.returncode == 0, f"{script} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of the markdown rows whose first cell starts with ``first_cell``."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(first_cell):
            rows.append(cells)
    return rows


def test_attention_benchmark_prints_its_table_and_json(tmp_path: Path) -> None:
    args = "--ns 256,1024 --methods dense,fast,auto --reps 1 --warmup 0 --no-memory --json numbers.json"
    out = run_benchmark("attention.py", *args.split(), cwd=tmp_path)
    assert re.search(r"^device cpu \(.+, \d+ threads\)", out, re.MULTILINE), out.splitlines()[0]
    saved = json.loads((tmp_path / "numbers.json").read_text())
    assert [row["n"] for row in saved["rows"]] == [256, 1024]
    for row in saved["rows"]:
        assert {"dense:fwdbwd", "fast:fwdbwd", "auto:fwdbwd"} <= set(row["times"])
        assert all(t > 0 for t in row["times"].values())
    main_table = [cells for cells in table_rows(out, "") if len(cells) > 8 and cells[0].isdigit()]
    by_n = {int(cells[0]): cells for cells in main_table}
    assert set(by_n) == {256, 1024}, out
    assert any(cell.endswith("(dense)") for cell in by_n[256])  # auto keeps dense for short sequences
    assert by_n[1024][-2].endswith("x")  # the speedup column is filled
    # the saved file prints the same table again
    again = run_benchmark("attention.py", "--from-json", "numbers.json", cwd=tmp_path)
    assert [cells for cells in table_rows(again, "1024") if len(cells) > 8][0][:6] == by_n[1024][:6]


@pytest.mark.parametrize("mode", [["--in-process"], ["--interleave"]], ids=["in-process", "interleave"])
def test_train_step_benchmark_runs_both_backends_on_one_model(tmp_path: Path, mode: list[str]) -> None:
    args = "--seq-len 256 --steps 2 --warmup 0 --backends compact,dense".split()
    out = run_benchmark("train_step.py", *args, *mode, cwd=tmp_path)
    assert re.search(r"^device cpu \(.+, \d+ threads\)", out, re.MULTILINE), out.splitlines()[0]
    compact, dense = table_rows(out, "compact (compact)"), table_rows(out, "dense (dense)")
    assert len(compact) == 1 and len(dense) == 1, out
    assert dense[0][5] == "1.00x"
    assert float(compact[0][1]) > 0 and float(dense[0][1]) > 0
    # same weights, batch and dropout masks: the first losses differ by float32 rounding only
    spread = float(re.search(r"\(spread ([0-9.e+-]+):", out).group(1))
    assert spread < 1e-3, out
    assert not list(tmp_path.iterdir())  # nothing written where it ran


def test_entropy_benchmark_reports_an_exact_error(tmp_path: Path) -> None:
    out = run_benchmark("entropy.py", *"--layers 2 --heads 2 --seq-len 1024".split(), cwd=tmp_path)
    error = table_rows(out, "max abs error vs dense float64")
    assert error, out
    assert float(error[0][1].split()[0]) < 1e-9
    assert table_rows(out, "all 2 layers")


def test_docmap_benchmark_prints_its_table(tmp_path: Path) -> None:
    out = run_benchmark("docmap.py", "--seq-len", "1024", "--heads", "2", "--windows", "32,8,4", cwd=tmp_path)
    rows = table_rows(out, "32,8,4")
    assert len(rows) == 1 and rows[0][-2].endswith("MiB")
    assert float(rows[0][-1]) < 1e-10  # the sentence map equals the dense float64 pooling
