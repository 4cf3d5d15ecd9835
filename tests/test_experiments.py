"""The studies in experiments/: every script runs with --quick and writes its report, data and
plots; the harness checks its arguments before computing, publishes a run whole, follows the
umask and fails when interrupted (issue 12).

Each script runs in its own process (as a user would run it), on the CPU, with
``--quick --seeds 2 --out <tmp> --no-progress``. New scripts in experiments/ are picked up by
the glob; the harness (``_harness.py``) and the runner ``run_all.py`` are not studies.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
SCRIPTS = sorted(
    p for p in EXPERIMENTS.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py"
)
TIMEOUT_S = 300
FAST = EXPERIMENTS / "convergence_rates.py"  # the quickest study, for the command-line cases


def clean_env() -> dict:
    # The strict test settings (x64, rank promotion) are the test process's, not the script's:
    # each script runs as a user runs it, with a clean JAX configuration, on the CPU.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", ""
    )
    return env


def run_script(script: Path, *args: str, timeout: float = TIMEOUT_S):
    cmd = [sys.executable, str(script), *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{script.name} took more than {timeout} s:\n{err.stdout}")


def test_there_are_studies():
    assert {"gd_vs_gauss_newton", "partial_derivatives"} <= {p.stem for p in SCRIPTS}, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_study_header_states_its_finding(script: Path):
    """Every study's docstring has a "Finding" paragraph with a measured number in it."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    paragraphs = [p for p in doc.split("\n\n") if p.startswith("Finding")]
    assert len(paragraphs) == 1, script.name
    assert "PLACEHOLDER" not in doc and re.search(r"\d", paragraphs[0]), paragraphs[0]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_study_runs_quick_and_writes_report_csv_png(script: Path, tmp_path: Path):
    out = tmp_path / script.stem
    proc = run_script(script, "--quick", "--seeds", "2", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, (
        f"{script.name} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
        f"\n--- stderr ---\n{proc.stderr[-3000:]}"
    )
    written = sorted(p.name for p in out.iterdir())
    manifest = (out / "MANIFEST").read_text().split()
    assert sorted([*manifest, "MANIFEST"]) == written, "the manifest lists every file written"
    for suffix in (".md", ".csv", ".png"):
        found = [p for p in out.iterdir() if p.suffix == suffix and p.stat().st_size > 0]
        assert found, f"{script.name} wrote no non-empty {suffix} file into {out}: {written}"
    report = (out / "report.md").read_text()
    assert "## Finding (this run)" in report and len(report) > 400, report
    assert not list(tmp_path.glob(".*staging")), "the staging folder was left behind"


# --- the command line: checked before anything is computed ---------------------------------


def _foreign_folder(tmp: Path) -> Path:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("keep me")
    return tmp / "mine"


def _existing_file(tmp: Path) -> Path:
    (tmp / "a_file").write_text("keep me")
    return tmp / "a_file"


def _under_a_file(tmp: Path) -> Path:
    return _existing_file(tmp) / "out"


BAD_ARGUMENTS = [
    # (case, arguments given the tmp folder, what the message must say)
    ("seeds zero", lambda tmp: ["--seeds", "0", "--out", str(tmp / "o")], "--seeds"),
    ("seeds negative", lambda tmp: ["--seeds", "-3", "--out", str(tmp / "o")], "--seeds"),
    ("out is a file", lambda tmp: ["--out", str(_existing_file(tmp))], "not a folder"),
    ("out under a file", lambda tmp: ["--out", str(_under_a_file(tmp))], "not a writable"),
    ("out holds other files", lambda tmp: ["--out", str(_foreign_folder(tmp))], "notes.txt"),
]


@pytest.mark.parametrize(("case", "make_args", "message"), BAD_ARGUMENTS,
                         ids=[c[0] for c in BAD_ARGUMENTS])  # fmt: skip
def test_bad_arguments_fail_before_computing(case, make_args, message, tmp_path: Path):
    args = make_args(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    t0 = time.perf_counter()
    proc = run_script(FAST, "--quick", "--no-progress", *args, timeout=60)
    assert proc.returncode == 2, (case, proc.returncode, proc.stderr[-2000:])
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert time.perf_counter() - t0 < 30  # an import of jax, no computation
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "a refused run must not touch anything"


def test_unwritable_parent_is_refused(tmp_path: Path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root may write into any folder")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    proc = run_script(FAST, "--quick", "--out", str(locked / "out"), timeout=60)
    assert proc.returncode == 2 and "not a writable" in proc.stderr, proc.stderr


# --- publishing: whole, with the user's umask, never on failure or interrupt -----------------


@pytest.fixture
def harness():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import _harness

        yield _harness
    finally:
        sys.path.remove(str(EXPERIMENTS))


def _old_run(out: Path) -> dict:
    out.mkdir()
    for name in ("report.md", "runs.csv", "old_plot.png"):
        (out / name).write_text(f"old {name}")
    return {p.name: p.read_text() for p in out.iterdir()}


def _study(files: dict, *, fail: BaseException | None = None, swallow_sigint: bool = False):
    def run(cfg, args, out):
        del cfg, args
        for name, text in files.items():
            out.text(name, text)
        if swallow_sigint:  # what a JAX host callback does with an exception: log it
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except KeyboardInterrupt:
                pass
        if fail is not None:
            raise fail
        return "# report\n"

    return run


def _main(harness, out: Path, run) -> int:
    return harness.main("study", "Question: q.", run, full=None, quick=None, seeds=1,
                        argv=["--out", str(out), "--no-progress"])  # fmt: skip


def test_a_run_replaces_the_previous_one_whole(harness, tmp_path: Path):
    out = tmp_path / "out"
    _old_run(out)
    assert _main(harness, out, _study({"runs.csv": "new"})) == 0
    assert sorted(p.name for p in out.iterdir()) == ["MANIFEST", "report.md", "runs.csv"]
    assert (out / "runs.csv").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "staging and old folders removed"


@pytest.mark.parametrize("fail", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_run_publishes_nothing(harness, tmp_path: Path, fail):
    out = tmp_path / "out"
    old = _old_run(out)
    run = _study({"runs.csv": "new"}, fail=fail)
    if isinstance(fail, KeyboardInterrupt):
        assert _main(harness, out, run) == harness.INTERRUPTED
    else:
        with pytest.raises(RuntimeError, match="boom"):
            _main(harness, out, run)
    assert {p.name: p.read_text() for p in out.iterdir()} == old
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_swallowed_sigint_still_fails_the_run(harness, tmp_path: Path):
    out = tmp_path / "out"
    old = _old_run(out)
    assert _main(harness, out, _study({"runs.csv": "new"}, swallow_sigint=True)) == 130
    assert {p.name: p.read_text() for p in out.iterdir()} == old


UMASKS = [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)]


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), UMASKS)
def test_files_follow_the_umask(harness, tmp_path: Path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        assert _main(harness, tmp_path / "out", _study({"runs.csv": "x"})) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == dir_mode
    for p in (tmp_path / "out").iterdir():
        assert p.stat().st_mode & 0o777 == file_mode, p


@pytest.mark.slow
def test_sigint_during_a_real_run_exits_non_zero_and_writes_nothing(tmp_path: Path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(EXPERIMENTS / "gd_vs_gauss_newton.py"), "--seeds", "3", "--out",
           str(out), "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(8)  # past the imports, inside the computation
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert not out.exists() and not list(tmp_path.iterdir()), list(tmp_path.iterdir())
