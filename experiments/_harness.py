"""The harness every study stands on: command line, output, seeds, timing, curves, plots, report.

A study is a module docstring (question, setup, finding), two configurations (``FULL`` and
``QUICK``) and ``run(cfg, args, out) -> str`` that computes, draws into ``out`` and returns its
report; ``main`` does the rest:

- arguments are checked before anything is computed: ``--seeds`` >= 1, and ``--out`` a folder
  that can be written and holds nothing but an earlier run's results;
- the run writes into a staging folder beside ``--out``, published whole at the end (an earlier
  run's folder is swapped out in one rename): never a new CSV beside an old plot. Files and
  folders get the user's umask;
- an interrupted run (SIGINT, even one swallowed by a JAX host callback) publishes nothing and
  exits with status 130.

Timing has one way (:func:`time_fit`): a compiled ``pb.fit`` (compiled by a warm-up call),
timed whole and without host hooks, the fixed cost of a call (a run stopped before its first
step) subtracted, per step. What a run does along the way (a test error, a relative L2 error)
is traced by a second run of the same fit with ``callback=`` (:func:`trace_fit`), whose own time
is not used: ``pb.fit``'s host hook costs 0.5-1 ms a step on a CPU, more than a whole Adam step.
"""

from __future__ import annotations

import os

# XLA's CPU Cholesky and eigh call LAPACK through OpenBLAS, whose worker threads spin when the
# cores are shared: on a busy 2-core machine a 500 x 500 Cholesky took 450 ms with the default
# threads and 2.3 ms with one. Studies import this module before jax; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterable, Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import paribus as pb  # noqa: E402

RESULT_SUFFIXES = {".md", ".csv", ".png"}
MANIFEST = "MANIFEST"  # the files of one run, written last into the staging folder
INTERRUPTED = 130  # the shell's status for a run ended by SIGINT


# --------------------------------------------------------------------------- command line


def parser(name: str, doc: str, *, seeds: int | None) -> argparse.ArgumentParser:
    """``--quick`` (seconds, for CI), ``--seeds`` (None: no default), ``--out`` and
    ``--no-progress``."""
    p = argparse.ArgumentParser(
        prog=f"experiments/{name}.py",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds (CI)")
    default = f"default {seeds}" if seeds is not None else "default: each study's own"
    p.add_argument("--seeds", type=int, default=seeds, help=f"number of seeds ({default})")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results") / name,
        help=f"output folder (default results/{name}/)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad arguments before anything is computed (``p.error`` exits with status 2)."""
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1; got {args.seeds}.")
    problem = out_problem(args.out)
    if problem:
        p.error(f"--out {args.out}: {problem}")


def out_problem(out: Path) -> str | None:
    """Why ``out`` cannot receive this run's results (None: it can)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            return "exists and is not a folder; give a folder (it is created if missing)."
        stray = [
            p.name
            for p in out.iterdir()
            if p.name != MANIFEST and (p.is_dir() or p.suffix not in RESULT_SUFFIXES)
        ]
        if stray:
            return (
                f"holds files that are not an earlier run's results ({', '.join(sorted(stray)[:3])}"
                f"{', ...' if len(stray) > 3 else ''}); it would be replaced whole. Give a new or "
                "empty folder."
            )
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not a writable folder."
    return None


# --------------------------------------------------------------------------------- output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Output:
    """A staging folder beside the final one; :meth:`publish` swaps it into place whole."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.final.absolute().parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(
            tempfile.mkdtemp(
                prefix=f".{self.final.name}.", suffix=".staging", dir=self.final.absolute().parent
            )
        )
        os.chmod(self.path, 0o777 & ~_umask())  # mkdtemp makes it 0700
        self.files: list[str] = []

    def _write(self, name: str, data: bytes) -> Path:
        path = self.path / name
        with open(path, "wb") as fh:  # a plain open: the mode follows the umask
            fh.write(data)
        self.files.append(name)
        return path

    def text(self, name: str, text: str) -> Path:
        return self._write(name, text.encode())

    def csv(self, name: str, rows: Sequence[Mapping[str, Any]]) -> Path:
        """Dict rows as CSV; the columns are the union of the keys, in first-seen order."""
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return self.text(name, buf.getvalue())

    def figure(self, name: str, fig: Any, *, dpi: int = 110) -> Path:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        return self._write(name, buf.getvalue())

    def publish(self) -> None:
        """The manifest last, then one rename into place (an earlier run's folder is moved
        aside first and removed after)."""
        self.text(MANIFEST, "".join(f"{name}\n" for name in self.files))
        old = None
        if self.final.exists():
            old = self.path.with_name(self.path.name.replace(".staging", ".old"))
            os.rename(self.final, old)
        os.rename(self.path, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class Interrupts:
    """SIGINT raises KeyboardInterrupt as usual and is remembered: a run whose interrupt was
    swallowed (an exception inside a JAX host callback is logged, not raised) still fails."""

    def __init__(self):
        self.seen = False

    def __call__(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)
        return False


def main(
    name: str,
    doc: str,
    run: Callable,
    *,
    full: Any,
    quick: Any,
    seeds: int,
    argv: Sequence[str] | None = None,
    extra: Callable | None = None,
) -> int:
    """Parse and check the command line, run the study into a staging folder, publish it.

    ``extra(parser)`` adds a study's own flags. Returns the exit status (0, or 130 when
    interrupted); errors raise.
    """
    p = parser(name, doc, seeds=seeds)
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    check_args(p, args)
    use_agg()
    t0 = time.perf_counter()
    with Interrupts() as interrupts:
        out = Output(args.out)
        try:
            args.started = describe_machine()
            report = run(quick if args.quick else full, args, out)
            if interrupts.seen:
                raise KeyboardInterrupt
            out.text("report.md", report)
            out.publish()
        except KeyboardInterrupt:
            out.discard()
            print(f"{name}: interrupted; nothing written to {args.out}", file=sys.stderr)
            return INTERRUPTED
        except BaseException:
            out.discard()
            raise
    print(f"{name}: wrote {args.out}/ ({', '.join(out.files)}) in {time.perf_counter() - t0:.0f} s")
    return 0


def exit(status: int) -> None:
    """End the script with ``status``. An interrupted run ends at once (``os._exit``): an
    interpreter teardown while XLA's threads still hold the interrupted computation crashed
    with SIGSEGV, which would hide the 130."""
    sys.stdout.flush()
    sys.stderr.flush()
    if status == INTERRUPTED:
        os._exit(status)
    sys.exit(status)


def use_agg() -> None:
    """Headless plotting."""
    import matplotlib

    matplotlib.use("Agg")


def describe_machine() -> str:
    """The device, and the CPU load when the run started (timings on a shared machine are
    good as ratios within one run only)."""
    d = jax.devices()[0]
    if d.platform != "cpu":
        return f"{d.device_kind}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = f"{os.cpu_count()} cores" + (
        f" ({usable} given to this run)" if usable != os.cpu_count() else ""
    )
    return f"CPU, {cores}, load average {load:.1f} at the start"


def command(name: str, args: argparse.Namespace) -> str:
    flags = (" --quick" if args.quick else "") + f" --seeds {args.seeds}"
    return f"python experiments/{name}.py{flags}"


def progress(iterable: Iterable[Any], *, desc: str, disable: bool, total: int | None = None):
    """A tqdm bar on stderr, or the bare iterable."""
    if disable:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


# ------------------------------------------------------------------------------ seeds


def minibatches(seed: int, n: int, batch_size: int, epochs: int) -> jax.Array:
    """(epochs * (n // batch_size), batch_size) example indices for ``pb.fit(...,
    batch_indices=)``: a fresh permutation of the n examples per epoch (the remainder of each
    dropped), the same for every method of a seed."""
    rng = np.random.default_rng(1000 + seed)
    per_epoch = n // batch_size
    rows = [
        rng.permutation(n)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
        for _ in range(epochs)
    ]
    return jnp.asarray(np.concatenate(rows), jnp.int32)


def keys(seeds: int, base: int = 0) -> jax.Array:
    """One PRNG key per seed."""
    return jax.random.split(jax.random.key(base), seeds)


def median(values) -> float:
    """The median of the finite ``values`` (NaN when none)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else math.nan


def seed_median(curves: np.ndarray) -> np.ndarray:
    """Per-step median over seeds (rows) of curves padded with NaN past each run's end, shown
    only while at least half of the seeds still run (else it jumps as runs stop)."""
    finite = np.isfinite(curves)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        med = np.nanmedian(np.where(finite, curves, np.nan), axis=0)
    return np.where(finite.sum(0) * 2 >= len(curves), med, np.nan)


def stack_padded(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Rows of different lengths as one (S, T) array, NaN past each row's end."""
    out = np.full((len(rows), max(len(r) for r in rows)), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def first_at_or_below(values: np.ndarray, target: float) -> np.ndarray:
    """The first index along the last axis with value <= target; -1 where there is none."""
    hit = np.asarray(values) <= target
    return np.where(hit.any(-1), hit.argmax(-1), -1)


def last_finite(values: np.ndarray) -> np.ndarray:
    """The last finite entry along the last axis (inf where there is none)."""
    values = np.asarray(values, float)
    finite = np.isfinite(values)
    last = np.where(finite.any(-1), values.shape[-1] - 1 - finite[..., ::-1].argmax(-1), 0)
    out = np.take_along_axis(values, last[..., None], -1)[..., 0]
    return np.where(finite.any(-1), out, np.inf)


def best_index(reached: np.ndarray, final: np.ndarray) -> int:
    """The grid point (row) with the most seeds at the target, then the fewest median steps to
    it, then the lowest median final value. reached: steps to target (-1: never), (G, S)."""

    def key(i):
        ok = reached[i] >= 0
        steps = np.median(reached[i][ok]) if ok.any() else np.inf
        return (-ok.mean(), steps, median(final[i]))

    return min(range(len(reached)), key=key)


# ------------------------------------------------------------------------------ runs


class Sweep(NamedTuple):
    """Runs of one method over a grid x seeds, as numpy arrays: losses (G, S, T + 1) with NaN
    past each run's stop; accepted likewise; steps and stop reasons (G, S)."""

    losses: np.ndarray
    accepted: np.ndarray
    steps: np.ndarray
    stops: np.ndarray


def sweep(
    residual_fn,
    init,
    make_opt,
    grid: Sequence[float],
    seed_keys,
    batch,
    *,
    max_steps: int,
    **fit_kwargs,
) -> Sweep:
    """``pb.fit`` from ``init(key)`` with ``make_opt(value)`` for every grid value and seed key:
    one jitted ``vmap`` for a grid (the value is traced: one compilation), or for one value the
    seeds one after another through ``pb.fit``'s own compiled loop (which the timing reuses)."""
    if len(grid) == 1:
        return _seed_by_seed(
            residual_fn,
            init,
            make_opt(grid[0]),
            seed_keys,
            batch,
            max_steps=max_steps,
            **fit_kwargs,
        )

    def one(value, key):
        r = pb.fit(
            residual_fn, init(key), make_opt(value), batch, max_steps=max_steps, **fit_kwargs
        )
        return r.history.loss, r.history.accepted, r.steps, r.stop_reason.code

    run = jax.jit(jax.vmap(jax.vmap(one, (None, 0)), (0, None)))
    out = jax.block_until_ready(run(jnp.asarray(grid, float), seed_keys))
    losses, accepted, steps, codes = (np.asarray(o) for o in out)
    stops = np.asarray(pb.STOP_REASONS)[codes]
    return Sweep(losses.astype(np.float64), accepted, steps, stops)


def _seed_by_seed(residual_fn, init, opt, seed_keys, batch, *, max_steps, **fit_kwargs):
    shape = (1, len(seed_keys), max_steps + 1)
    losses, accepted = np.full(shape, np.nan), np.zeros(shape, bool)
    steps, stops = np.zeros(shape[:2], int), np.empty(shape[:2], object)
    for s, key in enumerate(seed_keys):
        r = pb.fit(residual_fn, init(key), opt, batch, max_steps=max_steps, **fit_kwargs)
        losses[0, s, : r.steps + 1] = r.history.loss
        accepted[0, s, : r.steps + 1] = r.history.accepted
        steps[0, s], stops[0, s] = r.steps, r.stop_reason.name
    return Sweep(losses, accepted, steps, stops)


def with_rate(factory: Callable) -> tuple[Any, Callable]:
    """(opt, state_at): an optax optimiser whose learning rate lives in its state
    (``optax.inject_hyperparams``), and ``state_at(params, lr)``, its initial state at a rate,
    for ``pb.fit(..., state=state_at(params, lr))``: every rate of a grid runs one compiled
    loop (a rate in the optimiser's closure would compile one per rate)."""
    import optax

    opt = optax.inject_hyperparams(factory)(learning_rate=1.0)

    def state_at(params, lr):
        state = opt.init(params)
        dtype = state.hyperparams["learning_rate"].dtype
        state.hyperparams["learning_rate"] = jnp.asarray(lr, dtype)
        return state

    return opt, state_at


class Timing(NamedTuple):
    """A compiled ``pb.fit`` run, timed: its result, seconds per step (the fixed cost of a
    call removed), seconds of the whole call, and the first call's compile time."""

    result: Any
    per_step: float
    seconds: float
    compile_s: float


def _seconds(fn) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out.params)
    return out, time.perf_counter() - t0


def time_fit(
    residual_fn, params, opt, batch, *, max_steps: int, repeats: int = 3, **fit_kwargs
) -> Timing:
    """Time ``pb.fit`` the one way the studies do: a warm-up call compiles the loop (``max_steps``
    is not a compile-time constant), then the median of up to ``repeats`` calls (fewer once they
    add up to 2 s), each ended by ``block_until_ready``, minus that of a call stopped before its
    first step (argument checks, dispatch, copying the history back), over the steps taken.
    The loop is compiled with XLA's full settings (``compile_mode="full"``, what a long run
    gets): the timing leaves compile out, and ``"auto"`` could give the one-step warm-up the
    quick settings and the timed run the other loop."""
    kw = {"compile_mode": "full", **fit_kwargs}
    target = kw.pop("target_loss", None)

    def call(steps, tgt):
        return lambda: pb.fit(
            residual_fn, params, opt, batch, max_steps=steps, target_loss=tgt, **kw
        )

    _, first = _seconds(call(1, target))
    runs = [_seconds(call(max_steps, target))]
    while len(runs) < repeats and sum(s for _, s in runs) < 2.0:  # long runs: one is enough
        runs.append(_seconds(call(max_steps, target)))
    result = runs[0][0]
    full = float(np.median([s for _, s in runs]))
    zero = float(np.median([_seconds(call(1, math.inf))[1] for _ in range(repeats)]))
    steps = max(int(result.steps), 1)
    # Timer noise larger than the work (a few tiny steps): the whole call, an upper bound.
    work = full - zero if full - zero > 0.1 * full else full
    return Timing(result, work / steps, full, max(first - zero, 0.0))


class Trace(NamedTuple):
    """``metric(params)`` at steps ``steps`` of a run: values (K, M)."""

    steps: np.ndarray
    values: np.ndarray


def trace_fit(
    residual_fn, params, opt, batch, metric: Callable, *, every: int, max_steps: int, **fit_kwargs
) -> tuple[Trace, Any]:
    """(trace, result): ``metric(params)`` (a jitted function returning a vector) at theta_0,
    every ``every`` steps and at the end, recorded by ``pb.fit``'s host callback."""
    steps, values = [], []

    def record(progress: pb.FitProgress) -> None:
        steps.append(progress.step)
        values.append(np.atleast_1d(np.asarray(metric(progress.params), float)))

    result = pb.fit(
        residual_fn,
        params,
        opt,
        batch,
        max_steps=max_steps,
        callback=record,
        callback_every=every,
        callback_params=True,
        **fit_kwargs,
    )
    return Trace(np.asarray(steps), np.stack(values)), result


def time_call(fn: Callable, *args, repeats: int = 5) -> tuple[Any, float, float]:
    """(result, compile seconds, run seconds) of a jitted function: the first call apart, the
    median of ``repeats`` more, each ended by ``block_until_ready``."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    runs = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t0)
    run = float(np.median(runs))
    return out, max(first - run, 0.0), run


# ------------------------------------------------------------------------- plots, report


def plot_seeds(ax, x: np.ndarray, y: np.ndarray, *, color: str, label: str) -> None:
    """Thin lines per seed (rows of y), a thick line for the median over seeds."""
    x = np.broadcast_to(x, y.shape)
    for xs, ys in zip(x, y, strict=True):
        ax.plot(xs, ys, color=color, alpha=0.15, lw=0.8)
    ax.plot(x[0], seed_median(y), color=color, lw=2.2, label=label)


def curves_figure(
    series: Sequence[dict],
    *,
    ylabel: str,
    title: str,
    target: float | None = None,
    xlabel_steps: str = "step + 1",
) -> Any:
    """The standard two panels, against steps and against wall-clock: one entry of ``series``
    per method with ``label``, ``color``, ``steps`` (T,) or (S, T), ``values`` (S, T) and
    ``per_step`` (seconds; the wall-clock axis is steps x per_step)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for s in series:
        k = np.asarray(s["steps"], float)
        plot_seeds(axes[0], k + 1, s["values"], color=s["color"], label=s["label"])
        plot_seeds(
            axes[1], (k + 1) * s["per_step"], s["values"], color=s["color"], label=s["label"]
        )
    for ax in axes:
        if target is not None:
            ax.axhline(target, color="k", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_xlabel(xlabel_steps)
    axes[1].set_xlabel("wall-clock seconds (steps x measured time per step, compile excluded)")
    axes[0].set_ylabel(ylabel)
    axes[0].set_title("against steps (thin: seeds, thick: median)")
    axes[1].set_title("against wall-clock")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title, y=1.02)
    return fig


def fmt(v: Any) -> str:
    """A number to 3 significant digits ("–" for NaN, "never" for inf), anything else as str."""
    if isinstance(v, float | np.floating):
        return "–" if math.isnan(v) else ("never" if math.isinf(v) else f"{v:.3g}")
    return str(v)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table; floats to 3 significant digits."""
    columns = list(columns or (rows[0].keys() if rows else []))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(
    title: str, doc: str, *, name: str, args, seconds: float, finding: str, body: Sequence[str]
) -> str:
    """The report skeleton: title, the command and machine, the study's question and setup (from
    its docstring), the finding computed by this run, then tables and figures."""
    parts = _doc_sections(doc)
    lines = [
        f"# {title}",
        "",
        f"Written by `{command(name, args)}` in {seconds:.0f} s ({args.started}).",
        "",
        *(f"**{k}.** {v}\n" for k, v in parts.items() if k in ("Question", "Setup")),
        "## Finding (this run)",
        "",
        finding.strip(),
        "",
        *body,
    ]
    return "\n".join(lines).rstrip() + "\n"


def _doc_sections(doc: str) -> dict[str, str]:
    """The "Question:", "Setup:", "Finding ...:" paragraphs of a study's docstring (each with
    the paragraphs that follow it), joined into one line."""
    out, key = {}, None
    for para in doc.split("\n\n"):
        text = " ".join(line.strip() for line in para.strip().splitlines())
        head = text.split(":", 1)[0].split(" ")[0]
        if head in ("Question", "Setup", "Finding") and ":" in text:
            key = head
            body = text.split(":", 1)[1].strip()
            out[key] = body[:1].upper() + body[1:]
        elif key is not None and not text.startswith("python "):
            out[key] += " " + text
    return out
