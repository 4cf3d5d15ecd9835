"""Run every experiment script and write ``results/REPORT.md`` linking every report and plot.

Question: what does each experiment find, in one place?

Setup: every ``experiments/*.py`` script except this one and the private helpers (names that
start with ``_``) runs in its own Python process, in alphabetical order, with ``--out
<out>/<name>/`` and the flags given here (``--quick``, ``--seeds``, ``--no-progress``) passed
through. A script that fails does not stop the others; its exit status and the tail of its
output go into the report, and this script then exits with status 1.

Finding: see ``results/REPORT.md``; it is written whole or not at all, after every script has
run, with each script's run time, its markdown report, CSV files and PNG plots.

    python experiments/run_all.py                 # full runs (minutes)
    python experiments/run_all.py --quick         # smoke run (seconds per script)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402


def scripts(only: list[str] | None = None) -> list[Path]:
    """The experiment scripts, in alphabetical order (``only``: a subset by name)."""
    found = sorted(
        p for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py"
    )
    if only:
        names = {p.stem: p for p in found}
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SystemExit(
                f"run_all: unknown script(s) {unknown}; expected some of {sorted(names)}"
            )
        found = [names[n] for n in only]
    return found


def _title(script: Path) -> str:
    """The first line of the script's docstring."""
    import ast

    doc = ast.get_docstring(ast.parse(script.read_text())) or script.stem
    return doc.strip().splitlines()[0].rstrip(".")


def _run(script: Path, out: Path, args) -> dict:
    cmd = [sys.executable, str(script), "--out", str(out)]
    if args.quick:
        cmd.append("--quick")
    if args.seeds_given:
        cmd += ["--seeds", str(args.seeds)]
    if args.no_progress:
        cmd.append("--no-progress")
    print(f"run_all: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    # stderr passes through (progress bars); stdout is kept for the report on failure.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    seconds = time.perf_counter() - t0
    sys.stdout.write(proc.stdout)
    return {
        "script": script.stem,
        "returncode": proc.returncode,
        "seconds": round(seconds, 2),
        "stdout_tail": proc.stdout[-2000:],
    }


def _section(run: dict, script: Path, out: Path, root: Path) -> str:
    name = run["script"]
    lines = [f"## {name}", "", f"*{_title(script)}.*", ""]
    status = "ok" if run["returncode"] == 0 else f"FAILED (exit status {run['returncode']})"
    lines += [f"`experiments/{name}.py`: {status}, {run['seconds']:.1f} s wall-clock.", ""]
    if run["returncode"] != 0:
        lines += ["```", run["stdout_tail"].strip(), "```", ""]
    files = sorted(out.glob("*")) if out.is_dir() else []
    rel = [f.relative_to(root).as_posix() for f in files if f.is_file()]
    docs = [r for r in rel if r.endswith(".md")]
    data = [r for r in rel if r.endswith(".csv")]
    plots = [r for r in rel if r.endswith(".png")]
    if docs:
        lines.append("Report: " + ", ".join(f"[{Path(r).name}]({r})" for r in docs))
    if data:
        lines.append("Data: " + ", ".join(f"[{Path(r).name}]({r})" for r in data))
    lines.append("")
    lines += [f"![{Path(r).stem}]({r})" for r in plots]
    return "\n".join(lines).rstrip() + "\n"


def _plot_times(runs: list[dict], path: Path) -> None:
    _common.use_agg()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(runs) + 1.2))
    names = [r["script"] for r in runs][::-1]
    secs = [r["seconds"] for r in runs][::-1]
    colors = ["tab:blue" if r["returncode"] == 0 else "tab:red" for r in runs][::-1]
    ax.barh(names, secs, color=colors)
    for y, s in enumerate(secs):
        ax.text(s, y, f" {s:.1f} s", va="center", fontsize=9)
    ax.set_xlabel("wall-clock per script, seconds (red: failed)")
    ax.set_xlim(0, max(secs + [1.0]) * 1.2)
    ax.set_title("run_all: time per experiment script")
    _common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("run_all", __doc__)
    p.set_defaults(out=Path("results"))
    p.add_argument("--only", nargs="+", default=None, help="run only these scripts (names)")
    args = p.parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    args.seeds_given = any(a == "--seeds" or a.startswith("--seeds=") for a in raw)
    root = args.out
    root.mkdir(parents=True, exist_ok=True)
    todo = scripts(args.only)
    runs, sections = [], []
    for script in todo:
        out = root / script.stem
        run = _run(script, out, args)
        runs.append(run)
        sections.append(_section(run, script, out, root))
    failed = [r["script"] for r in runs if r["returncode"] != 0]
    total = sum(r["seconds"] for r in runs)
    flags = " ".join(
        f
        for f, on in [
            ("--quick", args.quick),
            (f"--seeds {args.seeds}", args.seeds_given),
            ("--no-progress", args.no_progress),
        ]
        if on
    )
    head = [
        "# paribus experiments: report",
        "",
        f"Written by `python experiments/run_all.py {flags}`".rstrip() + f" on {sys.platform}, "
        f"Python {sys.version.split()[0]}; {len(runs)} scripts, {total:.0f} s in all"
        + (f"; FAILED: {', '.join(failed)}." if failed else "; all succeeded."),
        "",
        _common.markdown_table(
            [
                {
                    "script": f"[{r['script']}](#{r['script']})",
                    "status": "ok" if r["returncode"] == 0 else f"exit {r['returncode']}",
                    "seconds": r["seconds"],
                }
                for r in runs
            ]
        ),
        "",
        "![run times](run_all_times.png)",
        "",
    ]
    _common.write_csv(
        root / "run_all.csv", [{k: v for k, v in r.items() if k != "stdout_tail"} for r in runs]
    )
    _plot_times(runs, root / "run_all_times.png")
    _common.write_text(root / "REPORT.md", "\n".join(head) + "\n" + "\n".join(sections))
    print(f"run_all: wrote {root / 'REPORT.md'} ({total:.0f} s in all)")
    if failed:
        print(f"run_all: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
