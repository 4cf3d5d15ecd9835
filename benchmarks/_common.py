"""Shared benchmark plumbing: compile time apart from run time, ratios, CSV + markdown.

Every benchmark runs paribus and its peers in one process, on the same inputs, and reports
median run times over repeats with the first call's compile time reported separately.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    p.add_argument("--out", type=Path, default=Path("benchmarks") / "out" / name)
    p.add_argument("--x64", action="store_true", help="run in float64 (default float32)")
    return p


def device_name() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    if d.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return f"{d.platform}: {kind}"


def time_fn(fn: Callable[[], Any], *, repeats: int = 10, min_time: float = 0.0) -> dict[str, float]:
    """Time ``fn()`` (already closed over its inputs).

    Returns ``{"compile_s": first call minus a run, "run_s": median of repeats}``. Each call is
    ended by ``jax.block_until_ready`` so asynchronous dispatch does not hide work.
    """
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    runs: list[float] = []
    start = time.perf_counter()
    while len(runs) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
        if len(runs) > 10_000:
            break
    runs.sort()
    run = runs[len(runs) // 2]
    return {"compile_s": max(first - run, 0.0), "run_s": run, "repeats": len(runs)}


def _atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return ""
    ms = seconds * 1e3
    return f"{ms:,.3g} ms" if ms < 1000 else f"{ms:,.0f} ms"


def write_results(
    out: Path, rows: Sequence[Mapping[str, Any]], *, title: str, notes: str = ""
) -> str:
    """Write ``rows`` to ``out/results.csv`` and ``out/results.md`` (each whole or not at all);
    return the markdown."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic(Path(out) / "results.csv", buf.getvalue())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = [f"## {title}", "", f"Device: {device_name()}; jax {jax.__version__}.", ""]
    if notes:
        lines += [notes, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    _atomic(Path(out) / "results.md", md)
    return md
