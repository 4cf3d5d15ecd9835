"""Smoke test: every experiment script runs with --quick and writes its report, data and plots.

Each script runs in its own process (as a user would run it), on the CPU, with
``--quick --seeds 2 --out <tmp> --no-progress``. New scripts in experiments/ are picked up by
the glob; helpers (names starting with ``_``) and the runner ``run_all.py`` are not experiments.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
SCRIPTS = sorted(
    p for p in EXPERIMENTS.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py"
)
TIMEOUT_S = 300


def test_there_are_experiments():
    assert any(p.stem == "partial_derivatives" for p in SCRIPTS), SCRIPTS


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_experiment_runs_quick_and_writes_report_csv_png(script: Path, tmp_path: Path):
    # The strict test settings (x64, rank promotion) are the test process's, not the script's:
    # each script runs as a user runs it, with a clean JAX configuration, on the CPU.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PLATFORMS"] = "cpu"
    env["MPLBACKEND"] = "Agg"
    out = tmp_path / script.stem
    cmd = [sys.executable, str(script), "--quick", "--seeds", "2", "--out", str(out)]
    try:
        proc = subprocess.run(
            [*cmd, "--no-progress"],
            cwd=EXPERIMENTS.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{script.name} --quick took more than {TIMEOUT_S} s:\n{err.stdout}")
    assert proc.returncode == 0, (
        f"{script.name} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
        f"\n--- stderr ---\n{proc.stderr[-3000:]}"
    )
    written = [p for p in out.rglob("*") if p.is_file()]
    for suffix in (".md", ".csv", ".png"):
        found = [p for p in written if p.suffix == suffix and p.stat().st_size > 0]
        assert found, f"{script.name} wrote no non-empty {suffix} file into {out}: {written}"
    report = next(p for p in written if p.suffix == ".md").read_text()
    assert len(report) > 200, f"{script.name}'s report is nearly empty:\n{report}"
