"""Run every benchmark on whatever device JAX sees; append one dated section to RESULTS.md.

    python benchmarks/run_all.py --quick          # a few minutes on a GPU, compile included
    python benchmarks/run_all.py                  # the full sizes
    python benchmarks/run_all.py --only scale jacobian

Each benchmark script (``scale.py``, ``jacobian.py``, ``curvature.py``, ``lm_step.py``,
``time_to_target.py``, then any other ``benchmarks/*.py``) runs in its own subprocess, one after
the other, so each gets the whole device and a crash or an out-of-memory ends only that one. Its
``results.md`` (written by ``_common.write_results`` under ``--out``) is collected; a script that
is missing, fails or runs out of time gets a line saying so, with the end of its output.

The section appended to ``benchmarks/RESULTS.md`` says when, on which device
(``jax.devices()[0].device_kind``), with which jax, and what was run; it is appended whole or not
at all (the new file is written beside the old one, then renamed over it). A time budget
(``--budget-s``; default 420 s with ``--quick``, leaving room inside an 8-minute limit) is shared
by the scripts in order; the section is written before the budget ends, whatever happened.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The headline figure first, so a tight budget still records it.
ORDER = ("scale", "jacobian", "curvature", "lm_step", "time_to_target")
SKIP = {"run_all", "_common"}
# Seconds kept back for each script still to run, so one slow script cannot starve the rest.
RESERVE_PER_SCRIPT = 45.0
# Seconds kept back at the end for writing the section.
RESERVE_END = 10.0
PROBE = """
import json, platform, jax
d = jax.devices()[0]
print(json.dumps({"platform": d.platform, "kind": getattr(d, "device_kind", d.platform),
    "count": jax.device_count(), "jax": jax.__version__,
    "jaxlib": getattr(jax.lib, "__version__", None) or __import__("jaxlib").__version__,
    "python": platform.python_version(),
    "matmul_precision": str(jax.config.jax_default_matmul_precision or "default")}))
"""


def scripts(only: list[str] | None) -> list[str]:
    """Benchmark names to run, in ORDER then alphabetical; ``only`` keeps those named."""
    found = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in SKIP)
    names = [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]
    if only:
        unknown = sorted(set(only) - set(found))
        if unknown:
            raise SystemExit(f"run_all: no benchmark named {unknown}; have {names}.")
        names = [n for n in names if n in only]
    return names


def probe_device(env: dict[str, str]) -> dict:
    """The device JAX sees, asked in a subprocess: the parent must not hold the GPU (JAX
    preallocates most of its memory) while the benchmarks run."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    if out.returncode:
        raise SystemExit(f"run_all: JAX could not start:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_one(name: str, args, timeout: float, env: dict[str, str]) -> dict:
    """Run ``benchmarks/<name>.py`` in a subprocess; returns status, seconds, markdown, log."""
    out_dir = args.out / name
    results = out_dir / "results.md"
    if results.exists():
        results.unlink()  # a stale file from an earlier run must not pass for this one
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(out_dir)]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--x64"] if args.x64 else []
    print(f"run_all: {' '.join(cmd[1:])} (timeout {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    # A process group of its own, so a timeout ends the script and anything it started.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        status = f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - t0
    markdown = results.read_text() if results.exists() and status == "ok" else None
    if status == "ok" and markdown is None:
        status = f"no results.md in {out_dir}"
    print(f"run_all: {name}: {status} in {seconds:.0f} s", flush=True)
    if status != "ok":
        print(log[-3000:], flush=True)
    return {"name": name, "status": status, "seconds": seconds, "markdown": markdown, "log": log}


def _demote(markdown: str) -> str:
    """Headings two levels down: each benchmark's "## title" nests under its "### name"."""
    lines = markdown.strip().splitlines()
    return "\n".join("##" + line if line.startswith("#") else line for line in lines)


def section(device: dict, runs: list[dict], args, started: dt.datetime) -> str:
    when = started.strftime("%Y-%m-%d %H:%M UTC")
    name = device["kind"] if device["platform"] != "cpu" else f"cpu ({os.cpu_count()} cores)"
    mode = "--quick" if args.quick else "full"
    lines = [
        f"## {when}: {name} x{device['count']}, jax {device['jax']} ({mode})",
        "",
        f"Device: {device['platform']}: {device['kind']}, {device['count']} visible; jax "
        f"{device['jax']}, jaxlib {device['jaxlib']}, Python {device['python']}; "
        f"{'float64' if args.x64 else 'float32'}, jax_default_matmul_precision "
        f"{device.get('matmul_precision', 'default')}; load average at start "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} host cores. Command: "
        f"`python benchmarks/run_all.py {' '.join(sys.argv[1:])}`.",
        "",
        "| benchmark | status | wall time (incl. start and compile) |",
        "|---|---|---|",
    ]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.0f} s |" for r in runs]
    for r in runs:
        lines += ["", f"### {r['name']}", ""]
        if r["markdown"]:
            lines.append(_demote(r["markdown"]))
        else:
            tail = "\n".join(r["log"].strip().splitlines()[-15:]) if r["log"] else ""
            lines += [f"{r['status']}; the end of its output:", "", "```", tail, "```"]
    return "\n".join(lines) + "\n"


def append_whole(path: Path, text: str) -> None:
    """Append ``text`` to ``path``: the old contents and the new section are written to a
    temporary file beside it, then renamed over it (whole or not at all)."""
    old = path.read_text() if path.exists() else (
        "# Benchmark results\n\nOne section per `python benchmarks/run_all.py` run, newest last "
        "(device, jax version and command in each). Compare ratios within a section.\n"
    )  # fmt: skip
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(old.rstrip("\n") + "\n\n" + text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main() -> None:
    p = argparse.ArgumentParser(prog="benchmarks/run_all.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="each benchmark's small sizes")
    p.add_argument("--x64", action="store_true", help="float64 (default float32)")
    p.add_argument("--only", nargs="+", default=None, help="run only these benchmarks")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds for all scripts (default 420 with --quick, else 3600)",
    )
    p.add_argument("--out", type=Path, default=HERE / "out", help="each script's --out parent")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args()
    started = dt.datetime.now(dt.UTC)
    deadline = time.perf_counter() + (args.budget_s or (420.0 if args.quick else 3600.0))
    names = scripts(args.only)

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # The repository's src/ first, so the benchmarks run this checkout's paribus.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    device = probe_device(env)
    if device["platform"] == "cpu":
        # OpenBLAS threads spin-wait when the cores are busy: a 256 x 256 Cholesky then takes
        # 250 ms instead of 0.6 ms. One BLAS thread per process keeps CPU figures meaningful.
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
    print(f"run_all: {device['kind']} x{device['count']}, jax {device['jax']}: {names}")

    runs = []
    for i, name in enumerate(names):
        left = deadline - time.perf_counter() - RESERVE_END
        timeout = left - RESERVE_PER_SCRIPT * (len(names) - i - 1)
        if timeout < 20:
            runs.append({"name": name, "status": "not run: time budget spent", "seconds": 0.0,
                         "markdown": None, "log": ""})  # fmt: skip
            continue
        runs.append(run_one(name, args, timeout, env))
    text = section(device, runs, args, started)
    append_whole(args.results, text)
    print(text)
    print(f"run_all: appended to {args.results}")


if __name__ == "__main__":
    main()
