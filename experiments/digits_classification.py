"""Digit classification: generalised Gauss-Newton / Levenberg-Marquardt against Adam and SGD.

Question: for a small classifier trained with softmax cross-entropy, do Levenberg-Marquardt
steps on the generalised Gauss-Newton (GGN) matrix, full-batch or on minibatches, in the dual
(kernel) or the matrix-free (conjugate-gradient) form, reach a low training loss and a high test
accuracy sooner than Adam and SGD with momentum, per epoch and per second of wall-clock?

Setup: scikit-learn's ``load_digits`` (1,797 grey-scale 8 x 8 images, 10 classes; shipped with
the package), pixel values divided by 16, one fixed stratified split into 1,437 training and
360 test images. Network: 64-64-10 tanh MLP (``pb.nets.mlp``, LeCun-normal initialisation, P =
4,810), float32. Loss: ``pb.losses.softmax_cross_entropy()``, summed over the examples of the
batch; the residual function ``pb.losses.network_outputs(apply)`` returns (logits, labels), so
LM linearises the logits and whitens them with the Hessian square root of the loss (GGN). Every
method runs ``pb.fit`` from the same initial parameters (one per seed) with the same residual
function; minibatch runs draw the same shuffled minibatches of 128 per seed (``batch_indices``):

- "LM-CG full batch": ``pb.levenberg_marquardt(solve="cg", loss=...)`` on all 1,437 images
  (R = 14,370 whitened residuals > P: the dual form would need a 14,370^2 kernel);
- "LM-dual minibatch": ``solve="dual"`` on minibatches of 128 (R = 1,280 < P: one 1,280^2
  Cholesky of the whitened NTK per step);
- "LM-CG minibatch": ``solve="cg"`` on the same minibatches;
- "Adam" and "SGD+momentum" (0.9) on the same minibatches, each over a small learning-rate
  grid; the rate with the lowest median final training loss is reported (all are in the CSV).

An epoch is one pass over the training images by the gradient (a full-batch step, or 1,437 /
128 minibatch steps; an LM trial counts whether accepted or not). The mean training loss over all
1,437 images and the test accuracy are recorded by a probe inside the optimiser; wall-clock
seconds are host timestamps taken as the jitted loop runs (compile time is not in them; the
probe's own cost, measured apart, is subtracted).

Finding: see the report (``results/digits_classification/report.md``), which quotes the measured
numbers of the run that wrote it; they are also in the README.

    python experiments/digits_classification.py            # a few minutes on 2 CPU cores
    python experiments/digits_classification.py --quick    # seconds (CI)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

# XLA's CPU Cholesky and eigh call LAPACK through OpenBLAS, whose worker threads spin when the
# cores are shared: on a busy 2-core machine a 129 x 129 Cholesky took 300 ms with the default
# threads (0.1 ms when idle). One thread; set before jax loads, an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import paribus as pb

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

NAME = "digits_classification"
COLORS = {
    "LM-CG full batch": "tab:blue",
    "LM-dual minibatch": "tab:purple",
    "LM-CG minibatch": "tab:cyan",
    "Adam": "tab:orange",
    "SGD+momentum": "tab:olive",
}


class Config(NamedTuple):
    hidden: int
    batch_size: int
    epochs_full: int  # full-batch LM steps (= epochs)
    epochs_lm_minibatch: int
    epochs_first_order: int
    cg_max_steps: int
    adam_rates: tuple[float, ...]
    sgd_rates: tuple[float, ...]  # per example: divided by the batch size (the loss is a sum)
    n_train: int | None  # None: all; a subset in --quick


FULL = Config(64, 128, 60, 15, 100, 50, (3e-3, 1e-2), (0.1, 0.3), None)
QUICK = Config(16, 64, 4, 2, 4, 10, (3e-3,), (0.1,), 256)


# ------------------------------------------------------------------------------------ the data


def load(n_train: int | None):
    """(x_train, y_train, x_test, y_test): pixels / 16, a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    if n_train is not None:
        x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    as_jax = lambda a, dt: jnp.asarray(a, dt)  # noqa: E731
    return (
        as_jax(x_tr, jnp.float32),
        as_jax(y_tr, jnp.int32),
        as_jax(x_te, jnp.float32),
        as_jax(y_te, jnp.int32),
    )


# ----------------------------------------------------------------------------------- the probe


def probe_fn_for(apply, loss, x_tr, y_tr, x_te, y_te):
    """params -> [mean training loss over all training images, test accuracy]."""
    batched = jax.vmap(apply, (None, 0))

    def probe(params):
        train = jnp.mean(jax.vmap(loss.value)(batched(params, x_tr), y_tr))
        accuracy = jnp.mean(jnp.argmax(batched(params, x_te), axis=1) == y_te)
        return jnp.stack([train, accuracy.astype(train.dtype)])

    return probe


# ---------------------------------------------------------------------------------- the runs


class Method(NamedTuple):
    name: str
    lr: float | None
    opt: Any
    minibatch: bool
    epochs: int


def methods_for(cfg: Config, loss) -> list[Method]:
    lm = lambda solve: pb.levenberg_marquardt(solve=solve, loss=loss, cg_max_steps=cfg.cg_max_steps)  # noqa: E731
    out = [
        Method("LM-CG full batch", None, lm("cg"), False, cfg.epochs_full),
        Method("LM-dual minibatch", None, lm("dual"), True, cfg.epochs_lm_minibatch),
        Method("LM-CG minibatch", None, lm("cg"), True, cfg.epochs_lm_minibatch),
    ]
    out += [
        Method("Adam", lr, optax.adam(lr), True, cfg.epochs_first_order) for lr in cfg.adam_rates
    ]
    out += [
        Method("SGD+momentum", lr, optax.sgd(lr / cfg.batch_size, momentum=0.9), True,
               cfg.epochs_first_order)
        for lr in cfg.sgd_rates
    ]  # fmt: skip
    return out


def run_one(method: Method, probed, residual_fn, loss, params0, data, seed, cfg, probe,
            probe_cost_s, recorder):  # fmt: skip
    """One ``pb.fit`` run; returns the probe curve [(seconds, step, epoch, train loss, test
    accuracy)] and the fit result. Seconds count from the first probe (after compilation),
    minus the probes' own cost."""
    x_tr, y_tr = data
    n = x_tr.shape[0]
    recorder.rows.clear()
    if method.minibatch:
        idx = _common.minibatch_indices(seed, n, cfg.batch_size, method.epochs)
        k_max = int(idx.shape[0])
        # one step more than counted, so that the probe before it records the final point
        result = pb.fit(residual_fn, params0, probed, (x_tr, y_tr), max_steps=k_max + 1,
                        loss=loss, batch_indices=idx)  # fmt: skip
        per_step_epochs = cfg.batch_size / n
    else:
        k_max = method.epochs
        result = pb.fit(residual_fn, params0, probed, (x_tr, y_tr), max_steps=k_max + 1,
                        loss=loss)  # fmt: skip
        per_step_epochs = 1.0
    rows = [row for row in recorder.rows if row[1] <= k_max]
    t0 = rows[0][0]
    curve = [(t - t0 - i * probe_cost_s, k, k * per_step_epochs, tl, acc)
             for i, (t, k, tl, acc) in enumerate(rows)]  # fmt: skip
    last_t, last_k = curve[-1][0], curve[-1][1]
    if k_max > result.steps > last_k > 0:
        # the final parameters were never probed: place them at the average step time
        tl, acc = np.asarray(probe(result.params), float).tolist()
        t_end = last_t + (result.steps - last_k) * last_t / max(last_k, 1)
        curve.append((t_end, result.steps, result.steps * per_step_epochs, tl, acc))
    return curve, result


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(NAME, __doc__.split("\n\n")[0], seeds=3)
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    _common.use_agg()
    t_start = time.perf_counter()

    x_tr, y_tr, x_te, y_te = load(cfg.n_train)
    loss = pb.losses.softmax_cross_entropy()
    init, apply = pb.nets.mlp([64, cfg.hidden, 10], "tanh", dtype=jnp.float32)
    residual_fn = pb.losses.network_outputs(apply)
    probe = jax.jit(probe_fn_for(apply, loss, x_tr, y_tr, x_te, y_te))
    params0 = [init(jax.random.key(seed)) for seed in range(args.seeds)]
    n_params = sum(a.size for a in jax.tree.leaves(params0[0]))
    _, _, probe_cost_s = _common.timed(probe, params0[0], repeats=20)
    recorder = _common.Recorder()
    steps_per_epoch = x_tr.shape[0] // cfg.batch_size

    methods = methods_for(cfg, loss)
    # one probed optimiser per method, reused across seeds: pb.fit compiles once per method
    probed = [_common.with_probe(m.opt, probe, steps_per_epoch if m.minibatch else 1, recorder)
              for m in methods]  # fmt: skip
    jobs = [(i, seed) for i in range(len(methods)) for seed in range(args.seeds)]
    runs, curves = [], []
    for i, seed in _common.progress(jobs, desc=NAME, disable=args.no_progress):
        m = methods[i]
        curve, result = run_one(m, probed[i], residual_fn, loss, params0[seed], (x_tr, y_tr),
                                seed, cfg, probe, probe_cost_s, recorder)  # fmt: skip
        t, k, ep, tl, acc = curve[-1]
        accepted = np.asarray(result.history.accepted[1:], bool)
        runs.append(
            dict(method=m.name, lr="" if m.lr is None else m.lr, seed=seed, steps=k,
                 epochs=ep, seconds=t, stop_reason=result.stop_reason, train_loss=tl,
                 test_accuracy=acc, best_test_accuracy=max(c[4] for c in curve),
                 accepted_fraction=float(accepted.mean()) if m.lr is None else 1.0)
        )  # fmt: skip
        curves += [
            dict(method=m.name, lr="" if m.lr is None else m.lr, seed=seed, step=c[1],
                 epoch=c[2], seconds=c[0], train_loss=c[3], test_accuracy=c[4])
            for c in curve
        ]  # fmt: skip

    best = {}
    grids = {}
    for name in ("Adam", "SGD+momentum"):
        rs = [r for r in runs if r["method"] == name]
        grids[name] = {lr: _common.median([r["train_loss"] for r in rs if r["lr"] == lr])
                       for lr in dict.fromkeys(r["lr"] for r in rs)}  # fmt: skip
        best[name] = min(grids[name], key=grids[name].get)
    shown = [r for r in runs if r["method"] not in best or r["lr"] == best[r["method"]]]
    summary = summarise(shown, curves, best)

    out = args.out
    _common.write_csv(out / "runs.csv", runs)
    _common.write_csv(out / "curves.csv", curves)
    plot(out / "digits_classification.png", curves, best, cfg)
    elapsed = time.perf_counter() - t_start
    sizes = (x_tr.shape[0], x_te.shape[0], n_params)
    report = make_report(summary, grids, best, cfg, args, sizes, elapsed)
    _common.write_text(out / "report.md", report)
    print(report)
    return 0


def _curve(curves, name, lr, seed):
    return [c for c in curves if c["method"] == name and c["lr"] == lr and c["seed"] == seed]


def first_time(curve, key: str, ok) -> float:
    hits = [c["seconds"] for c in curve if ok(c[key])]
    return min(hits) if hits else float("inf")


def summarise(shown, curves, best) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["method"] for r in shown):
        rs = [r for r in shown if r["method"] == name]
        lr = best.get(name, "")
        cs = [_curve(curves, name, lr, r["seed"]) for r in rs]
        label = name if name not in best else f"{name} (lr {lr:g})"
        rows.append(
            {
                "method": label,
                "epochs": _common.median([r["epochs"] for r in rs]),
                "seconds": _common.median([r["seconds"] for r in rs]),
                "s / epoch": _common.median([r["seconds"] / r["epochs"] for r in rs]),
                "final train loss": _common.median([r["train_loss"] for r in rs]),
                "final test acc.": _common.median([r["test_accuracy"] for r in rs]),
                "best test acc.": _common.median([r["best_test_accuracy"] for r in rs]),
                "s to train loss 0.05": _common.median(
                    [first_time(c, "train_loss", lambda v: v <= 0.05) for c in cs]
                ),
                "epochs to train loss 0.05": _common.median(
                    [
                        min([c["epoch"] for c in cc if c["train_loss"] <= 0.05], default=np.inf)
                        for cc in cs
                    ]
                ),  # fmt: skip
                "s to 95% test acc.": _common.median(
                    [first_time(c, "test_accuracy", lambda v: v >= 0.95) for c in cs]
                ),
                "accepted": _common.median([r["accepted_fraction"] for r in rs]),
            }
        )
    return rows


def plot(path, curves, best, cfg) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharex="col")
    for col, xkey, xlabel in ((0, "seconds", "wall-clock seconds (compile excluded)"),
                              (1, "epoch", "epochs (passes over the training set)")):  # fmt: skip
        for row, ykey in enumerate(("train_loss", "test_accuracy")):
            ax = axes[row, col]
            for name, color in COLORS.items():
                lr = best.get(name, "")
                seeds = sorted({c["seed"] for c in curves if c["method"] == name})
                for seed in seeds:
                    pts = _curve(curves, name, lr, seed)
                    label = None
                    if seed == seeds[0]:
                        label = name if name not in best else f"{name} (lr {lr:g})"
                    xs = [max(c[xkey], 1e-3 if xkey == "seconds" else 0) for c in pts]
                    ax.plot(xs, [c[ykey] for c in pts], color=color, lw=1.3, alpha=0.75,
                            label=label)  # fmt: skip
            ax.grid(True, alpha=0.3)
            if ykey == "train_loss":
                ax.set_yscale("log")
                ax.set_ylabel("mean training cross-entropy")
            else:
                lows = [ln.get_ydata()[-1] for ln in ax.get_lines()]
                ax.set_ylim(min(0.8, max(0.0, min(lows) - 0.05)), 1.0)
                ax.set_ylabel("test accuracy")
            if xkey == "seconds":
                ax.set_xscale("log")
            if row == 1:
                ax.set_xlabel(xlabel)
    axes[0, 0].set_title("against wall-clock (one line per seed)")
    axes[0, 1].set_title("against epochs")
    axes[1, 1].legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"load_digits, 64-{cfg.hidden}-10 tanh MLP, softmax cross-entropy; minibatches of "
        f"{cfg.batch_size}"
    )
    fig.tight_layout()
    _common.save_figure(fig, path)


def make_report(summary, grids, best, cfg, args, sizes, elapsed) -> str:
    n_tr, n_te, n_params = sizes
    get = lambda prefix: next(r for r in summary if r["method"].startswith(prefix))  # noqa: E731
    full, dual, cgm = get("LM-CG full"), get("LM-dual"), get("LM-CG mini")
    adam, sgd = get("Adam"), get("SGD")
    grid_text = "; ".join(
        f"{name}: " + ", ".join(f"{lr:g} -> {v:.3g}" for lr, v in g.items())
        for name, g in grids.items()
    )
    accs = [r["final test acc."] for r in summary]
    spread = max(accs) - min(accs)
    lines = [
        "# Digit classification: GGN / Levenberg-Marquardt against Adam and SGD",
        "",
        f"Command: `python experiments/digits_classification.py"
        f"{' --quick' if args.quick else ''} --seeds {args.seeds}`; total run time "
        f"{elapsed:.0f} s (compilation included).",
        "",
        f"Setup: {n_tr} training and {n_te} test images, 64-{cfg.hidden}-10 tanh MLP (P = "
        f"{n_params}), float32, softmax cross-entropy; minibatches of {cfg.batch_size}; "
        f"{args.seeds} seeds (initialisation and minibatch order). LM: Nielsen damping, "
        f"CG capped at {cfg.cg_max_steps} GGN-vector products per step. Times are wall-clock "
        "seconds from the first step (compile time excluded) on a shared 2-core CPU.",
        "",
        "Medians over seeds; 'accepted' is the fraction of LM trials kept:",
        "",
        _common.markdown_table(summary),
        "",
        f"Learning-rate grids (median final training loss; SGD rates are per example, "
        f"divided by the batch size): {grid_text}.",
        "",
        "![curves](digits_classification.png)",
        "",
        "## Finding",
        "",
        f"- Per epoch: training loss {full['final train loss']:.2g} after "
        f"{full['epochs']:.0f} epochs (LM-CG full batch), {dual['final train loss']:.2g} after "
        f"{dual['epochs']:.0f} (LM-dual minibatch), {cgm['final train loss']:.2g} after "
        f"{cgm['epochs']:.0f} (LM-CG minibatch); Adam {adam['final train loss']:.2g} and "
        f"SGD+momentum {sgd['final train loss']:.2g} after {adam['epochs']:.0f}. Epochs to a "
        f"training loss of 0.05: "
        + ", ".join(f"{r['method']} {r['epochs to train loss 0.05']:.3g}" for r in summary)
        + ".",
        f"- Per second: an epoch costs {full['s / epoch']:.2g} s (LM-CG full batch), "
        f"{dual['s / epoch']:.2g} s (LM-dual minibatch), {cgm['s / epoch']:.2g} s (LM-CG "
        f"minibatch), {adam['s / epoch']:.2g} s (Adam), {sgd['s / epoch']:.2g} s (SGD). "
        f"Seconds to a training loss of 0.05: "
        + ", ".join(f"{r['method']} {r['s to train loss 0.05']:.3g}" for r in summary)
        + f"; fastest: {fastest(summary, 's to train loss 0.05')}.",
        "- Test accuracy (final, median): "
        + ", ".join(f"{r['method']} {r['final test acc.']:.3f}" for r in summary)
        + "; seconds to 95% test accuracy: "
        + ", ".join(f"{r['method']} {r['s to 95% test acc.']:.3g}" for r in summary)
        + f"; fastest: {fastest(summary, 's to 95% test acc.')}. The final test accuracies "
        f"span {spread:.3f}"
        + (
            ": a lower training loss buys little test accuracy on this small, unregularised "
            "problem."
            if spread < 0.03
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


def fastest(summary, key: str) -> str:
    best = min(summary, key=lambda r: r[key])
    return best["method"] if np.isfinite(best[key]) else "none reached it"


if __name__ == "__main__":
    raise SystemExit(main())
