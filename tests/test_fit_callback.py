"""pb.fit's host callback and progress bar: order, records, stopping, errors, interrupts."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import count_compiles

import paribus as pb

X0 = jnp.array([3.0, -2.0, 0.5])
OPT = optax.sgd(0.05)


def quadratic(params, batch):
    """r = theta - (1, 2, 3): gradient descent converges geometrically, never in 40 steps."""
    del batch
    return params - jnp.array([1.0, 2.0, 3.0])


def test_callback_sees_every_kth_point_the_last_one_and_the_clock():
    records = []
    result = pb.fit(quadratic, X0, OPT, None, max_steps=12, callback=records.append,
                    callback_every=5)  # fmt: skip
    assert [r.step for r in records] == [0, 5, 10, 12]
    hist = result.history
    np.testing.assert_allclose([r.loss for r in records], hist.loss[[0, 5, 10, 12]], rtol=1e-14)
    np.testing.assert_allclose([r.grad_norm for r in records], hist.grad_norm[[0, 5, 10, 12]])
    assert all(r.accepted == hist.accepted[r.step] for r in records)
    assert all(r.params is None for r in records)
    # Wall-clock per point: starts at 0 once compiled, never decreases, and the callback saw it.
    assert hist.time.shape == hist.loss.shape and hist.time[0] == 0
    assert np.all(np.diff(hist.time) >= 0)
    np.testing.assert_allclose([r.seconds for r in records], hist.time[[0, 5, 10, 12]])


def test_callback_params_are_the_iterates():
    records = []
    result = pb.fit(quadratic, X0, OPT, None, max_steps=6, callback=records.append,
                    callback_every=3, callback_params=True)  # fmt: skip
    assert [r.step for r in records] == [0, 3, 6]
    np.testing.assert_allclose(records[0].params, X0)
    np.testing.assert_allclose(records[-1].params, result.params)
    # theta_3 by hand: theta_(k+1) = theta_k - 0.05 (theta_k - t)
    target = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(records[1].params, target + 0.95**3 * (np.asarray(X0) - target))


def test_returning_true_stops_the_run_at_that_point():
    result = pb.fit(quadratic, X0, OPT, None, max_steps=40, callback=lambda r: r.step == 7)
    assert result.stop_reason == "callback" and not result.converged
    assert result.steps == 7 and result.history.loss.shape == (8,)
    np.testing.assert_allclose(result.history.loss[-1], pb.loss(quadratic, result.params, None))


def test_a_raising_callback_ends_the_run_with_its_exception():
    def callback(record):
        if record.step == 2:
            raise RuntimeError("stop here, please")

    with pytest.raises(RuntimeError, match="stop here, please"):
        pb.fit(quadratic, X0, OPT, None, max_steps=40, callback=callback)


def test_new_callbacks_reuse_the_compiled_loop():
    pb.fit(quadratic, X0, OPT, None, max_steps=3, callback=lambda r: None)

    def again():
        pb.fit(quadratic, X0, OPT, None, max_steps=5, callback=lambda r: False, callback_every=2)
        return pb.fit(quadratic, X0, OPT, None, max_steps=4, callback=lambda r: None,
                      callback_every=3).params  # fmt: skip

    assert count_compiles(again) == 0


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    result = pb.fit(quadratic, X0, OPT, None, max_steps=20, progress=True)
    assert "pb.fit" in capsys.readouterr().err
    assert result.history.time is not None and result.steps == 20


def test_progress_without_tqdm_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        pb.fit(quadratic, X0, OPT, None, max_steps=3, progress=True)


def test_hooks_outside_jit_only_and_progress_is_a_flag():
    with pytest.raises(ValueError, match="outside jax.jit"):
        jax.jit(lambda x: pb.fit(quadratic, x, OPT, None, max_steps=3, callback=print).params)(X0)
    with pytest.raises(TypeError, match="callback=fn"):
        pb.fit(quadratic, X0, OPT, None, max_steps=3, progress=print)
    with pytest.raises(ValueError, match="callback_every"):
        pb.fit(quadratic, X0, OPT, None, max_steps=3, callback=print, callback_every=0)


def run_as_at_a_terminal(script: str, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``script`` in a fresh Python with Python's own SIGINT handler, as at a terminal.

    A process started in the background by a shell without job control (``cmd &``, as the
    suite may be started) inherits SIGINT ignored and Python leaves it so: os.kill(SIGINT)
    would do nothing and a test would fail for the shell's reason, not pb.fit's (it did, in a
    CI run started with nohup ... &: "finished", exit 0, empty stderr).
    """
    prelude = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_sigint_during_a_run_does_not_exit_zero():
    """An interrupt that lands in the callback is re-raised by pb.fit, never swallowed."""
    script = """
        import os, signal
        import jax.numpy as jnp, optax, paribus as pb

        def callback(record):
            if record.step == 3:
                os.kill(os.getpid(), signal.SIGINT)

        pb.fit(lambda p, b: p - 1.0, jnp.zeros(3), optax.sgd(1e-3), None, max_steps=100000,
               callback=callback)
        print("finished")
    """
    proc = run_as_at_a_terminal(script, timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert "KeyboardInterrupt" in proc.stderr and "finished" not in proc.stdout


@pytest.mark.parametrize("callback", [False, True], ids=["no callback", "callback"])
def test_ctrl_c_stops_a_long_run_and_raises(callback):
    """SIGINT from another thread (as Ctrl-C arrives) during a run of 10^9 steps (SGD at a
    learning rate of 1e-7: about a microsecond a step, no stop rule fires for minutes): Python
    raises KeyboardInterrupt once the main thread is back from the chunk it waits on (256
    steps), so pb.fit stops within seconds and never finishes silently."""
    script = f"""
        import os, signal, threading, time
        import jax.numpy as jnp, optax, paribus as pb

        threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.perf_counter()
        try:
            pb.fit(lambda p, b: p - 1.0, jnp.zeros(3), optax.sgd(1e-7), None,
                   max_steps=10**9, callback={"lambda r: None" if callback else "None"})
        finally:
            print(f"seconds {{time.perf_counter() - start:.1f}}")
        print("finished")
    """
    proc = run_as_at_a_terminal(script, timeout=300)
    assert proc.returncode != 0, proc.stdout
    assert "KeyboardInterrupt" in proc.stderr and "finished" not in proc.stdout, proc.stderr
    assert float(proc.stdout.split("seconds")[1]) < 120, proc.stdout
