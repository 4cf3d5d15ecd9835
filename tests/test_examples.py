"""The examples in examples/: each runs with --quick, writes the plot it promises, and prints a
finding that says what its header says.

Every script runs in its own process, as a user runs it (a clean JAX configuration: no x64 or
rank-promotion settings from conftest, one CPU device), except the sharding example, which gets
the eight host devices it is about, and with warnings as errors (``python -W error``). The
selected scripts run two at a time, started together by one fixture, so the whole file costs
about half their sum. A new script without an entry in EXAMPLES fails
``test_every_example_is_checked``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "examples"
SCRIPTS = sorted(p.stem for p in EXAMPLES_DIR.glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 300
EIGHT = "--xla_force_host_platform_device_count=8"
NUM = r"([0-9.]+(?:e[+-]?\d+)?)"


def _num(pattern: str, text: str) -> float:
    match = re.search(pattern.replace("NUM", NUM), text)
    assert match, f"{pattern!r} not in {text!r}"
    return float(match.group(1))


def check_partial(finding: str) -> None:
    # float64: a central difference with h ~ 6e-6 is good to ~1e-10; J^T r is the gradient.
    assert _num(r"derivative to NUM \(relative\)", finding) < 1e-7
    assert _num(r"gradient to NUM", finding) < 1e-12


def check_gd_vs_lm(finding: str) -> None:
    lm = _num(r"Levenberg-Marquardt: NUM steps", finding)
    for other in ("Adam", "gradient descent"):
        match = re.search(rf"{other}: {NUM} steps", finding)
        if match:  # the other method reached the target too: LM took fewer steps
            assert lm < float(match.group(1)), finding
        else:
            assert f"{other}: not in" in finding, finding


def check_own_model(finding: str) -> None:
    for name in ("Equinox", "Flax NNX"):
        match = re.search(
            rf"{name}: (\d+)/(\d+) leaves placed \(\d+ factored\), target reached", finding
        )
        assert match and match.group(1) == match.group(2), finding


def check_digits(finding: str) -> None:
    assert _num(r"GGN-LM reached test accuracy NUM%", finding) >= 90.0


def check_minibatch(finding: str) -> None:
    assert _num(r"LM NUM", finding) < _num(r"Adam NUM", finding)


def check_pinn(finding: str) -> None:
    lm, adam = _num(r"LM NUM", finding), _num(r"Adam NUM", finding)
    assert lm < 1e-3 and lm < adam / 10, finding


def check_mislabelled(finding: str) -> None:
    n_flip = _num(r"of NUM flipped", finding)
    assert _num(r"gradient norm hold NUM", finding) >= n_flip / 2, finding
    assert _num(r"leave-one-out error NUM", finding) >= n_flip - 1, finding


def check_sharding(finding: str) -> None:
    assert "over 8 device(s)" in finding, finding
    assert _num(r"one-device run to NUM", finding) < 1e-2, finding
    assert "replicated: True" in finding, finding


def check_curve_fit(finding: str) -> None:
    assert _num(r"parameters within NUM", finding) < 1e-6, finding
    ours, scipy = _num(r"in NUM trials", finding), _num(r"against scipy's NUM", finding)
    assert ours <= scipy + 2, finding


# script -> (plot it writes or None, check of its FINDING line, extra XLA flags)
EXAMPLES = {
    "01_partial_and_jacobian": ("01_jacobian.png", check_partial, ""),
    "02_gd_vs_lm": ("02_gd_vs_lm.png", check_gd_vs_lm, ""),
    "03_your_own_model": (None, check_own_model, ""),
    "04_digits_ggn_lm": ("04_digits.png", check_digits, ""),
    "05_minibatch_lm": ("05_minibatch_lm.png", check_minibatch, ""),
    "06_pinn_poisson_1d": ("06_pinn_poisson_1d.png", check_pinn, ""),
    "07_find_mislabelled": ("07_find_mislabelled.png", check_mislabelled, ""),
    "08_sharding": (None, check_sharding, EIGHT),
    "09_curve_fit_minpack": ("09_curve_fit.png", check_curve_fit, ""),
}


def _env(xla_flags: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", MPLBACKEND="Agg", OPENBLAS_NUM_THREADS="1")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "").replace(EIGHT, "") + " " + xla_flags).strip()
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def _run(name: str, out: Path) -> subprocess.CompletedProcess:
    plot, _, xla_flags = EXAMPLES[name]
    cmd = [sys.executable, "-W", "error", str(EXAMPLES_DIR / f"{name}.py"), "--quick"]
    if plot:
        cmd += ["--out", str(out)]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=_env(xla_flags), capture_output=True, text=True,
                              timeout=TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired as err:
        return subprocess.CompletedProcess(cmd, -1, err.stdout or "", f"timed out: {err}")


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """name -> (future of its finished process, its --out folder), for the examples selected in
    this session (``-k`` runs only those); two scripts at a time."""
    selected = sorted(
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_example_runs_quick"
    )
    base = tmp_path_factory.mktemp("examples")
    pool = ThreadPoolExecutor(max_workers=2)
    started = {name: (pool.submit(_run, name, base / name), base / name) for name in selected}
    yield started
    pool.shutdown(wait=True)


def test_every_example_is_checked():
    assert SCRIPTS == sorted(EXAMPLES), "add the new example to EXAMPLES with its check"
    table = (EXAMPLES_DIR / "README.md").read_text()
    assert all(f"{name}.py" in table for name in SCRIPTS), "examples/README.md lists every one"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_quick(name: str, runs):
    future, out = runs[name]
    proc = future.result()
    assert proc.returncode == 0, (
        f"{name}.py exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
        f"\n--- stderr ---\n{proc.stderr[-3000:]}"
    )
    findings = [line for line in proc.stdout.splitlines() if line.startswith("FINDING: ")]
    assert len(findings) == 1 and proc.stdout.rstrip().endswith(findings[0]), proc.stdout
    plot, check, _ = EXAMPLES[name]
    if plot:
        written = sorted(p.name for p in out.iterdir())
        assert written == [plot], f"expected only {plot} in {out} (no temporary left): {written}"
        assert (out / plot).stat().st_size > 10_000
    check(findings[0])
