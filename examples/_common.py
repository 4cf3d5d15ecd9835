"""The plumbing every example shares, so that each script reads as its idea alone.

- ``run(main, plot=...)``: parse ``--quick`` (and ``--out DIR`` where the example draws a
  picture) and call ``main``.
- ``save_figure(fig, out, name)``: write a PNG whole (a temporary file in the same folder, then
  ``os.replace``), so a reader never sees half a picture.
- ``timed_fit(...)``: ``pb.fit`` once to compile, once more to time; compile time kept out.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import matplotlib

import paribus as pb

matplotlib.use("Agg")  # files only, never a window: the examples run headless too

DEFAULT_OUT = Path("results/examples")


def run(main, *, plot: bool) -> None:
    """``python examples/x.py [--quick] [--out DIR]`` -> ``main(quick=..., out=...)``."""
    doc = sys.modules[main.__module__].__doc__ or ""
    parser = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run of a few seconds")
    if plot:
        parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the plot")
    args = parser.parse_args()
    if plot:
        main(quick=args.quick, out=args.out)
    else:
        main(quick=args.quick)


def save_figure(fig, out: Path, name: str) -> Path:
    """Write ``fig`` to ``out/name`` atomically and close it; returns the path."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".png", dir=out)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out / name)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return out / name


def timed_fit(residual_fn, params, opt, batch, **kwargs):
    """``(result, seconds)``: the second of two identical ``pb.fit`` calls, compile excluded."""
    jax.block_until_ready(pb.fit(residual_fn, params, opt, batch, **kwargs).params)
    start = time.perf_counter()
    result = pb.fit(residual_fn, params, opt, batch, **kwargs)
    jax.block_until_ready(result.params)
    return result, time.perf_counter() - start
