"""Run every study and write ``results/REPORT.md``: every finding and every plot in one place.

Every ``experiments/*.py`` study (not this runner, not ``_harness.py``) runs in its own Python
process, in alphabetical order, with ``--out <out>/<name>/`` and the flags given here
(``--quick``, ``--seeds``, ``--no-progress``) passed through. A study that fails does not stop
the others: its exit status and the tail of its output go into the report, and this runner then
exits with status 1. Arguments (every output folder included) are checked before anything runs;
each study publishes its folder whole; ``REPORT.md`` is written last, once every study has run;
an interrupted run writes no report and exits with status 130.

    python experiments/run_all.py                 # every study in full (tens of minutes)
    python experiments/run_all.py --quick         # smoke run (seconds per study)
    python experiments/run_all.py --only gd_vs_gauss_newton pinn_poisson
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _harness as h

HERE = Path(__file__).resolve().parent


def studies(only: list[str] | None = None) -> list[Path]:
    found = sorted(
        p for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py"
    )
    if not only:
        return found
    names = {p.stem: p for p in found}
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise SystemExit(f"run_all: unknown studies {unknown}; expected some of {sorted(names)}")
    return [names[n] for n in only]


def title(script: Path) -> str:
    doc = ast.get_docstring(ast.parse(script.read_text())) or script.stem
    return doc.strip().splitlines()[0].rstrip(".")


def finding_of(report: Path) -> str:
    """The "## Finding (this run)" section of a study's report."""
    if not report.exists():
        return ""
    text = report.read_text()
    start = text.find("## Finding (this run)")
    if start < 0:
        return ""
    body = text[start:].split("\n", 1)[1]
    end = body.find("\n## ")
    return body[: end if end >= 0 else len(body)].strip().split("\n\n")[0]


def run_one(script: Path, out: Path, args, seeds_given: bool) -> dict:
    cmd = [sys.executable, str(script), "--out", str(out)]
    cmd += ["--quick"] * args.quick + ["--no-progress"] * args.no_progress
    cmd += ["--seeds", str(args.seeds)] if seeds_given else []
    print(f"run_all: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    # stderr passes through (progress bars); stdout is kept for the report of a failure
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode == h.INTERRUPTED:
        raise KeyboardInterrupt
    return {
        "study": script.stem,
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "tail": proc.stdout[-2000:],
    }


def section(run: dict, script: Path, out: Path, root: Path) -> str:
    status = "ok" if run["returncode"] == 0 else f"FAILED (exit status {run['returncode']})"
    lines = [
        f"## {run['study']}",
        "",
        f"*{title(script)}.* `experiments/{script.name}`: {status}, {run['seconds']:.0f} s.",
        "",
    ]
    if run["returncode"] != 0:
        return "\n".join([*lines, "```", run["tail"].strip(), "```", ""])
    lines += [finding_of(out / "report.md"), ""]
    files = sorted(p.relative_to(root).as_posix() for p in out.iterdir() if p.is_file())
    lines.append(
        "Report and data: "
        + ", ".join(f"[{Path(f).name}]({f})" for f in files if Path(f).suffix in (".md", ".csv"))
    )
    lines += ["", *(f"![{Path(f).stem}]({f})" for f in files if f.endswith(".png")), ""]
    return "\n".join(lines)


def write_whole(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file renamed over it, with the umask's mode."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes it 0600
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = h.parser("run_all", __doc__, seeds=None)
    p.set_defaults(out=Path("results"))
    p.add_argument("--only", nargs="+", default=None, help="run only these studies (names)")
    args = p.parse_args(argv)
    seeds_given = args.seeds is not None
    if seeds_given and args.seeds < 1:
        p.error(f"--seeds must be at least 1; got {args.seeds}.")
    root = args.out
    if root.exists() and not root.is_dir():
        p.error(f"--out {root}: exists and is not a folder.")
    todo = studies(args.only)
    for script in todo:
        problem = h.out_problem(root / script.stem)
        if problem:
            p.error(f"--out {root}: {root / script.stem} {problem}")
    root.mkdir(parents=True, exist_ok=True)
    started = h.describe_machine()
    runs, sections = [], []
    with h.Interrupts():
        try:
            for script in todo:
                runs.append(run_one(script, root / script.stem, args, seeds_given))
                sections.append(section(runs[-1], script, root / script.stem, root))
        except KeyboardInterrupt:
            print("run_all: interrupted; REPORT.md not written", file=sys.stderr)
            return h.INTERRUPTED
    failed = [r["study"] for r in runs if r["returncode"] != 0]
    flags = " ".join(
        f for f, on in (("--quick", args.quick), (f"--seeds {args.seeds}", seeds_given)) if on
    )
    head = [
        "# paribus studies: report",
        "",
        f"Written by `python experiments/run_all.py {flags}`".rstrip() + f" ({started}); "
        f"{len(runs)} studies, {sum(r['seconds'] for r in runs) / 60:.1f} min in all"
        + (f"; FAILED: {', '.join(failed)}." if failed else "; all succeeded."),
        "",
        h.table(
            [
                {
                    "study": f"[{r['study']}](#{r['study']})",
                    "seconds": r["seconds"],
                    "status": "ok" if r["returncode"] == 0 else f"exit {r['returncode']}",
                }
                for r in runs
            ]
        ),
        "",
    ]
    write_whole(root / "REPORT.md", "\n".join(head) + "\n" + "\n".join(sections))
    print(f"run_all: wrote {root / 'REPORT.md'}")
    if failed:
        print(f"run_all: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    h.exit(main())
