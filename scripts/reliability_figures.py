"""Run the fault-injection tests and print the figures the README's reliability section quotes.

    .venv/bin/python scripts/reliability_figures.py            # about 5-10 minutes on 2 cores

Kills: every SIGKILL the kill tests send (each followed by ``--resume auto`` or a rebuild) counts as
survived when its test passes. Bad inputs: one per row of the tables in tests/test_bad_inputs.py, clean
when its row passes (one ``error:`` line, exit 2, no traceback, nothing on disk changed).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILL_TESTS = [
    "tests/test_reliability.py::test_sigkill_at_random_moments_and_inside_writes_resumes_from_the_newest_complete_checkpoint",
    "tests/test_reliability.py::test_sigkill_during_the_kernel_build_and_training_then_resume_auto_carries_on",
    "tests/test_reliability.py::test_concurrent_runs_never_interleave_and_a_killed_holder_never_blocks_resume",
    "tests/test_kernel_build.py::test_sigkill_during_a_real_build_then_the_next_run_builds_at_once",
]
KILLS_PER_TEST = {KILL_TESTS[2]: 1, KILL_TESTS[3]: 1}  # (the first two print their own count)
OTHER_TESTS = ["tests/test_bad_inputs.py", "tests/test_kernel_build.py", "tests/test_reliability.py"]


def main() -> int:
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-rA", "-p", "no:cacheprovider", *OTHER_TESTS]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    out = result.stdout
    passed = set(re.findall(r"^PASSED (\S+)", out, flags=re.M))
    failed = set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M))
    survived = sum(int(a) for a, _ in re.findall(r"reliability: kills survived (\d+)/(\d+)", out))
    tried = sum(int(b) for _, b in re.findall(r"reliability: kills survived (\d+)/(\d+)", out))
    for test, kills in KILLS_PER_TEST.items():
        tried += kills
        survived += kills if test in passed else 0
    for test in KILL_TESTS[:2]:
        if test in failed:
            tried += 1  # (a failed kill test printed nothing: count at least the kill that failed)
    rows = [t for t in passed | failed if "test_bad_input" in t and "[" in t]
    clean = [t for t in rows if t in passed]
    signals = [t for t in passed | failed if "signal" in t and "[" in t]
    print("| fault | survived / tried |")
    print("| --- | --- |")
    print("| SIGKILL at random moments, inside checkpoint/log writes and inside the kernel build | "
          f"{survived} / {tried} |")
    print(f"| bad inputs (one `error:` line, exit 2, nothing changed on disk) | {len(clean)} / {len(rows)} |")
    print(f"| SIGINT / SIGTERM during training or a kernel build | {sum(t in passed for t in signals)} / "
          f"{len(signals)} |")
    print(f"\nall fault-injection tests: {len(passed)} passed, {len(failed)} failed")
    if result.returncode != 0:
        print("\n".join(out.splitlines()[-40:]) + result.stderr[-2000:])
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
