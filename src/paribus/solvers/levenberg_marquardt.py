"""Levenberg-Marquardt as an optax ``GradientTransformationExtraArgs``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from paribus.solvers import _common, _damping, _forms, _linear, _minpack, _model
from paribus.solvers._info import StepInfo, empty_step_info, step_info

PyTree = Any
SCALINGS = ("identity", "marquardt")


class LevenbergMarquardtState(NamedTuple):
    """Arrays only, so the state jits, vmaps and serialises.

    ``damping``, ``nu`` and ``radius`` drive the next trial; ``scale`` is the running max of
    diag(J^T J) (Marquardt scaling; ones otherwise); ``tie_step`` is the norm of the last step
    taken at the noise floor of L (0 after any other step; see ``update``). The watchdog
    (see ``levenberg_marquardt(watchdog=...)``): ``anchor`` (flat theta where the current
    excursion began), its loss ``anchor_loss`` (on the last batch; 0 before any) and the
    damping to resume with there, ``excursion`` (trials the excursion has left; 0: none),
    ``excursion_step`` (the length of its last step) and ``failures`` (excursions that ended
    back at their anchor). ``step_info``
    (:class:`pb.StepInfo`) describes the last trial: the loss and gradient norm it was computed
    from, its lam, gain ratio (-inf when the trial was not finite), acceptance, norm, trial
    loss and solve form.
    """

    count: jax.Array
    damping: jax.Array
    nu: jax.Array
    radius: jax.Array
    scale: jax.Array
    tie_step: jax.Array
    anchor: jax.Array
    anchor_loss: jax.Array
    anchor_damping: jax.Array
    excursion: jax.Array
    excursion_step: jax.Array
    failures: jax.Array
    step_info: StepInfo


WATCHDOG_SHRINK = 1e-9
"""An excursion's trials are damped by this factor times the damping LM would otherwise try
(each step): Gauss-Newton's step in all but name, defined where J^T J is singular."""
WATCHDOG_GROWTH = 1e3
"""An excursion starts only with a trial whose loss is at most this multiple of L."""
WATCHDOG_FAILURES = 1
"""Excursions start after rejections only until this many have failed (the first update's
counts)."""
WATCHDOG_AUTO = 8
"""``watchdog="auto"``: the excursion length where it is on (see ``_watchdog_length``)."""
WATCHDOG_STEP_GROWTH = 4.0
"""An excursion goes on only with a step at most this times as long as its last one: Gauss-Newton
that converges takes steps of about the same length, then shorter ones (Flax NNX, N = 6:
2.5, 14, 2.9, 2.9, 1.3, 0.7, ...); one whose steps grow by orders is diverging, on a network
into saturated units (a 3-8-8-2 MLP, N = 32, solve="cg": steps of 111, 6e4, 2e7 and 8e8 from
||theta|| = 4.5 to a flat saturated point, where the run stopped as "converged")."""

TIE_SHRINK = 0.9
"""At the noise floor of L, steps are taken on the model's word while each is at most this
fraction of the one before (the iteration still contracts toward the minimum: MINPACK's ftol
test would stop at the first such step, with theta accurate to about sqrt(eps)); a tie step
that does not shrink is noise, and LM reports ``at_noise_floor``."""


def predicted_decrease(jd, r, extra=0.0) -> jax.Array:
    """m(0) - m(delta) = -(J delta).(r + J delta / 2) - e.delta, with ``extra`` = e.delta (the
    linear term r does not carry; 0 for 1/2 ||r||^2). The factored form avoids the cancellation
    between two nearly equal norms, and is exact for an inexact (cg) solve too."""
    return -jnp.vdot(jd, r + 0.5 * jd) - extra


def gain_ratio(actual, jd, r, ok, extra=0.0) -> jax.Array:
    """rho = (L - L_trial) / (m(0) - m(delta)), -inf for a non-finite trial or no predicted gain.

    ``actual`` is L - L_trial (computed without cancellation by the linearisation); the
    predicted decrease is :func:`predicted_decrease` (``extra``: e.delta, see there).
    """
    predicted = predicted_decrease(jd, r, extra)
    good = ok & jnp.isfinite(actual) & (predicted > 0)
    return jnp.where(good, actual / jnp.where(good, predicted, 1), -jnp.inf)


def _scaling(state, model, scaling: str, floor: float):
    """(d or None, new running scale). MINPACK: D_k = max(D_{k-1}, diag(J^T J)), floored."""
    if scaling == "identity":
        return None, state.scale
    running = jnp.maximum(state.scale, model.jtj_diag())
    top = jnp.max(running)
    d = jnp.where(top > 0, jnp.maximum(running, floor * top), 1)
    return d, running


def _first_damping(state, model, d, rule_tau):
    """tau * max diag(J^T J) / D at the first step (Nielsen's relative lam0)."""
    if d is not None:  # diag(J^T J) is at hand already: no cond needed
        first = jnp.asarray(rule_tau * jnp.max(model.jtj_diag() / d), state.damping.dtype)
        return jnp.where(state.count == 0, first, state.damping)

    def relative():
        return jnp.asarray(rule_tau * jnp.max(model.jtj_diag()), state.damping.dtype)

    return jax.lax.cond(state.count == 0, relative, lambda: state.damping)


def _acceleration(residual_fn, params, batch, work, form, model, lam, d, v, cg_options,
                  dual_options, *, where):  # fmt: skip
    """Geodesic acceleration (Transtrum & Sethna 2012, eq. 13) of the velocity ``v``.

    a solves (J^T J + lam D) a = -J^T r_vv with r_vv = d^2/dt^2 r(theta + t v) at t = 0, the
    second directional derivative (nested JVPs: exact, at about the cost of one more
    evaluation; Transtrum's finite difference needs a step length h). Returns (a, bend),
    bend = 2 ||a||_D / ||v||_D (infinite when a is not finite).
    """
    if model.e is not None or model.linearization.loss is not None:
        raise ValueError(
            f"{where}: geodesic acceleration needs the plain loss 1/2 ||r||^2 (loss=None); "
            "pass geodesic=None with a robust or output loss."
        )
    lifted = work.lift(params)
    tangent = work.unravel(v)

    def along(t):
        point = jax.tree.map(lambda p, s: p + (t * s).astype(p.dtype), lifted, tangent)
        out = residual_fn(point, batch)
        return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(out)]).astype(v.dtype)

    one, zero = jnp.ones((), v.dtype), jnp.zeros((), v.dtype)
    rvv = jax.jvp(lambda t: jax.jvp(along, (t,), (one,))[1], (zero,), (one,))[1]
    # The same damped operator as the velocity's, so a is the model's own second-order term;
    # it is factorised again (the forms do not hand back their factors).
    sol = _forms.solve(form, model._replace(r=rvv), lam, d, min_norm=False,
                       cg_options=cg_options, dual_options=dual_options)  # fmt: skip
    a = sol.delta
    vn = _common.scaled_norm(v, d)
    bend = 2 * _common.scaled_norm(a, d) / jnp.where(vn > 0, vn, 1)
    good = _common.finite(a)
    return jnp.where(good, a, 0), jnp.where(good, bend, jnp.inf)


class _Watch(NamedTuple):
    update: jax.Array  # the flat update to return
    accepted: jax.Array  # theta moves (a trial taken, or the return to the anchor)
    revert: jax.Array  # the update is the return to the anchor
    rule_owns: jax.Array  # the damping rule's (lam, nu, radius) stand; else ``damping``
    damping: jax.Array
    fields: dict  # the state's watchdog fields after this update


def _watchdog(state, flat, value, anchor_loss, trial_value, finite, accepted, delta, step, lam,
              plain, rejected_lam, length):  # fmt: skip
    """Chamberlain's watchdog (Chamberlain, Powell, Lemarechal & Pedersen 1982) for LM.

    An excursion starts at the first update (its trial was taken at lam = plain *
    WATCHDOG_SHRINK: Gauss-Newton's step) and at a rejected finite trial while no excursion
    has failed: the trial is taken whatever its gain ratio, if its loss is at most
    WATCHDOG_GROWTH times L, and theta_k is remembered as the anchor. Each later update of the
    excursion takes its trial (damping shrunk by WATCHDOG_SHRINK each time) if it lowers L
    with a step (length ``step``) at most WATCHDOG_STEP_GROWTH times the last; the first
    trial with a loss below the anchor's ends the excursion there (success). After
    ``length`` trials without one, or at a trial that does not lower L (non-finite included)
    or takes a step more than WATCHDOG_STEP_GROWTH times the last, the update returns theta
    to the anchor, lam resumes where the excursion began (as after a rejection; at the first
    update, the ordinary lam0), and no excursion starts again.
    """
    # theta_k below the anchor's loss: the excursion has succeeded (at the trial before);
    # this update is ordinary LM's.
    in_exc = (state.excursion > 0) & ~(value < anchor_loss)
    first = state.count == 0
    allowed = first | (~accepted & (state.failures < WATCHDOG_FAILURES))
    start = ~in_exc & finite & (trial_value <= WATCHDOG_GROWTH * value) & allowed
    success = in_exc & finite & (trial_value < anchor_loss)
    # Gauss-Newton that works lowers L at every trial after its first (superlinearly near
    # the end); one that does not is given up at once, not after ``length`` trials.
    steady = step <= WATCHDOG_STEP_GROWTH * state.excursion_step
    go_on = in_exc & finite & ~success & (state.excursion > 1) & (trial_value < value) & steady
    revert = in_exc & ~success & ~go_on
    take = (accepted & ~in_exc) | start | success | go_on
    back = state.anchor - flat
    update = jnp.where(take, delta, jnp.where(revert, back, 0))
    onward = start | go_on | success
    # First update, no excursion (the trial was NaN): ordinary LM from its own lam0.
    damping = jnp.where(onward, lam * WATCHDOG_SHRINK, jnp.where(revert, state.anchor_damping,
                                                                    plain))  # fmt: skip
    rule_owns = ~onward & ~revert & ~(first & ~accepted)
    resume = jnp.where(first, plain, rejected_lam)  # lam after a return to this anchor
    fields = {
        "anchor": jnp.where(start, flat, state.anchor),
        "anchor_loss": jnp.where(start, value, anchor_loss),
        "anchor_damping": jnp.where(start, resume, state.anchor_damping),
        "excursion": jnp.where(start, length, jnp.where(go_on, state.excursion - 1, 0)),
        "excursion_step": jnp.where(start | go_on, step, state.excursion_step),
        "failures": state.failures + revert.astype(jnp.int32),
    }
    return _Watch(update, take | revert, revert, rule_owns, damping, fields)


def _watchdog_length(watchdog, n_rows: int, n_params: int, dtype) -> int | None:
    """The excursion length for this problem, at trace time. ``watchdog="auto"``: on where
    J delta = -r can be met exactly: R = P (a system of equations: Gauss-Newton's step is
    Newton's for r = 0), and R < P in float64 (the minimum-norm step that interpolates the
    linearised network). Off where R > P (least squares: from a random start Gauss-Newton's
    first step leads networks to worse fits, ``benchmarks/lm_watchdog_seeds.py``), and where
    R < P in float32: with J J^T conditioned beyond 1 / eps, the step at lam ~ 0 is decided by
    rounding, and the run by the order of its sums (a 1-32-32-1 MLP, N = 128: 1 device and 8
    70x apart after 10 trials); monotone LM already needs no more trials than Gauss-Newton
    there in most runs Gauss-Newton solves (13 of 18 against the watchdog's 11)."""
    if watchdog == "auto":
        exact = n_rows < n_params and jnp.dtype(dtype) == jnp.float64
        on = n_rows == n_params or exact
        return WATCHDOG_AUTO if on else None
    return watchdog


def _check_config(solve, damping, scaling, damping_bounds, *, where):
    _linear.check_solve(solve, where=where)
    rule = _damping.get_rule(damping, where=where)
    if scaling is not None and scaling not in SCALINGS:
        raise ValueError(f"{where}: unknown scaling={scaling!r}; expected one of {SCALINGS}.")
    lo, hi = (float(b) for b in damping_bounds)
    if not 0 < lo < hi:
        raise ValueError(f"{where}: damping_bounds must satisfy 0 < low < high; got {lo}, {hi}.")
    return rule, lo, hi


def levenberg_marquardt(
    *,
    solve: str = "auto",
    damping: str = "nielsen",
    scaling: str | None = None,
    init_damping: float | None = None,
    init_damping_relative: bool | None = None,
    damping_bounds: tuple[float, float] = (1e-20, 1e16),
    scaling_floor: float = 1e-12,
    loss: Any = None,
    memory_budget: int | None = _common.DEFAULT_MEMORY_BUDGET,
    cg_max_steps: int = 50,
    cg_tol: float = 1e-10,
    cg_preconditioner: str | None = "jacobi",
    dual_refine_steps: int = 10,
    geodesic: float | None = None,
    watchdog: int | str | None = "auto",
) -> optax.GradientTransformationExtraArgs:
    """Levenberg-Marquardt: one damped Gauss-Newton trial per ``update``, kept if it pays.

    With r (R,) the residuals of ``residual_fn(params, batch)`` (ravelled), J = dr/dtheta
    (R, P) and g = J^T r, each update solves

        (J^T J + lam D) delta = -g,        D = I ("identity") or diag(J^T J) ("marquardt"),

    evaluates the loss at theta + delta on the same batch, and computes the gain ratio
    rho = (L(theta) - L(theta + delta)) / (1/2 ||r||^2 - 1/2 ||r + J delta||^2). The step is
    returned when rho exceeds the rule's threshold, else zeros (a rejection; also when the
    trial is NaN/inf or the factorisation fails). lam then follows the damping rule.

    Args:
      solve: "primal" (Cholesky of J^T J + lam D), "qr" (QR of [J; sqrt(lam D)], for
        ill-conditioned float64 problems), "dual" (Cholesky of J D^-1 J^T + lam I, then one
        J^T product; R x R, for R < P), "cg" (matrix-free, Jacobi-preconditioned), or "auto":
        the cheapest by estimated time (``paribus.solvers._cost``: flops of each form from R,
        P, the linearisation's plan and cg_max_steps, at rates measured on a CPU) among the
        factorised form of the nonsingular side (dual when R < P, else primal) and cg (taken
        only when 1.5x cheaper: its step is inexact); cg when the dense form exceeds
        ``memory_budget`` bytes (default: half the device's free memory) or a factorisation
        would be larger than ``paribus.solvers._cost.MAX_DENSE`` on a side. Chosen at trace
        time; its code is ``state.step_info.form``.
      damping: "nielsen", "marquardt", "delayed", "trust_region" or "minpack" (see
        ``paribus.solvers._damping``). "minpack" is MINPACK's lmder (Moré 1978,
        ``paribus.solvers._minpack``): the trust region's radius is the state and each trial
        is the step on its boundary, par solved from the secular equation through an
        eigendecomposition of J^T J (an SVD of J where that does not resolve the step, and
        for R < P), Gauss-Newton's step whenever it fits; D is Marquardt's scaling unless
        ``scaling`` says otherwise. It needs the dense Jacobian (an error for solve="cg", or
        where "auto" picks cg), and takes no ``init_damping``, geodesic acceleration or int
        watchdog ("auto" leaves it off).
        Measured (``benchmarks/RESULTS.md``, 2026-12-03 14:20): on the MGH problems it
        needs MINPACK's trials (median 1.0x in float64, 41 of 43 starts solved, worst 2.5x;
        Nielsen's damping 1.21x and 5.7x); on the networks users bring with R > P it ends
        3.2x higher after 100 trials in float64 (geometric mean; up to 2,700x on the MLPs,
        ``benchmarks/lm_minpack.py``), and one update there costs 4.6-9.3x Nielsen's. Use
        it for classic curve fits (``pb.least_squares`` does, by default), not for training
        networks. The defaults (nielsen, identity scaling, lam0 = 1e-3 max diag(J^T J),
        watchdog "auto", no geodesic) were measured by ``benchmarks/lm_defaults.py``,
        ``benchmarks/lm_minpack.py``, ``benchmarks/lm_watchdog_nets.py`` and
        ``benchmarks/lm_watchdog_seeds.py`` (MGH problems, MLPs with N < P and N > P, the
        networks users bring over seeds; float64 and float32; ``benchmarks/RESULTS.md``).
      scaling: "identity" (D = I) or "marquardt" (D = running max of diag(J^T J), MINPACK,
        floored at ``scaling_floor`` times its largest entry); None: "marquardt" for
        damping="minpack" with loss=None (MINPACK's), else "identity". With a robust loss the
        whitening weights move diag(J^T J) by orders of magnitude between steps, and
        MINPACK's running max then misleads: arctan(0.1) on an exponential fit with outliers
        ran to max_steps at the wrong point with "marquardt", and reached scipy's minimiser in
        24 steps with "identity" (Nielsen's damping: 32; ``tests/test_robust_fit.py``).
      init_damping: lam0, absolute or (``init_damping_relative``) times max diag(J^T J) / D at
        the first step. Default: the rule's (nielsen, trust_region: 1e-3 relative; marquardt:
        1e-3 absolute).
      damping_bounds: lam is clipped to [low, high].
      loss: None for 1/2 ||r||^2, or an ``OutputLoss``: then residual_fn returns
        (outputs (N, m), targets) and the step is generalised Gauss-Newton (see
        ``paribus.solvers._model``).
      cg_max_steps, cg_tol: iteration cap and relative residual tolerance of "cg".
      cg_preconditioner: "jacobi" (diag(J^T J) + lam D) or None.
      dual_refine_steps: cap on the preconditioned-CG refinement of the "dual" step (D = I)
        when lam is within 10x of the kernel's rounding floor eps ||J J^T||_F, where the
        Cholesky of a kernel formed in floating point is noise (float32 with large P); each
        step costs one VJP and one JVP. 0 keeps the bare Cholesky step.
      watchdog: "auto" (the default): k = 8 where the residuals can be met exactly: R = P (a
        system of equations) and, in float64, R < P (a network with fewer residuals than
        parameters); None where R > P, and where R < P in float32 (there Gauss-Newton's step is
        decided by rounding, and a run's path by the order of its sums: 1 device against 8,
        70x apart after 10 trials); decided at trace time from the shapes and dtype. None:
        monotone LM everywhere (no accepted step raises L). k >= 1: a non-monotone start
        (Chamberlain's watchdog, 1982). The first trial is Gauss-Newton's step (lam shrunk
        1e-9-fold) and is taken whatever its gain ratio (if L_trial <= 1e3 L); the next trials
        too (lam shrunk 1e-9-fold each) while each lowers L, until one is below L(theta_0): from
        there LM goes on as usual. At a trial that does not lower L (or a non-finite one), one
        whose step is over 4x the excursion's last (Gauss-Newton diverging), or after k
        trials, the update returns theta to theta_0 and LM starts over from lam0. While
        no excursion has failed, a rejected trial starts one the same way from the current
        theta; ordinary rejections raise lam to at least 2 ||g|| / ||delta|| (D = I; the next
        step at most half as long). The loss can stay above its best for up to k steps (the
        excursion's first step is accepted with a negative gain ratio in the history); a run
        stopped by ``max_steps`` inside an excursion ends above its best loss. Each update of an
        excursion evaluates the anchor's loss again on its own batch (one more forward pass), so
        with ``pb.fit``'s ``batch_indices`` minibatches every comparison is within one batch.
        Measured (``benchmarks/RESULTS.md``, 2026-12-03 17:30): on the MGH problems "auto"
        solves 41 of 43 starts in float64 (monotone LM 40) with a median of 1.11x MINPACK's
        trials and a worst of 2.5x (monotone 1.21x and 5.7x); on the 1-32-1 MLP with N < P it
        takes 6 trials (Gauss-Newton's) against monotone LM's 161. On the networks users bring
        with N < P in float64 (48 runs over seeds) it takes Gauss-Newton's trials in 15 of the
        19 runs Gauss-Newton solves (monotone LM no more than Gauss-Newton's in 5), solving as
        many as monotone LM (39) at 1.08x its trials in geometric mean (where Gauss-Newton
        fails, the failed excursion costs trials). With R > P the watchdog ended 1.8-2.8x
        higher after 100 trials (geometric mean; up to 1e4x on pb.nets), so "auto" leaves it
        off there, and the default is monotone LM's run, trial for trial. For classic curve
        fits use ``pb.least_squares`` (MINPACK's algorithm: median 1.0x its trials).
      geodesic: None, or alpha > 0 to add geodesic acceleration (Transtrum & Sethna 2012):
        with v the step above, solve (J^T J + lam D) a = -J^T r_vv, r_vv = d^2/dt^2
        r(theta + t v) at t = 0 (two nested JVPs), and try delta = v + a / 2, the
        second-order path along the curved model manifold; a trial with
        2 ||a||_D / ||v||_D > alpha is rejected (Transtrum's alpha = 0.75). rho keeps the
        velocity's predicted decrease. Each trial then costs about one more evaluation and a
        second solve. Plain 1/2 ||r||^2 only.

    Returns:
      ``optax.GradientTransformationExtraArgs``;
      ``update(updates, state, params, *, residual_fn, batch)`` ignores ``updates`` (it forms
      J^T r itself) and returns (step pytree, :class:`LevenbergMarquardtState`).

    Example:
      >>> import jax.numpy as jnp, paribus as pb
      >>> opt = pb.levenberg_marquardt()
      >>> residual_fn = lambda p, b: jnp.sqrt(p) - 1.0
      >>> params = jnp.array([100.0])
      >>> state = opt.init(params)
      >>> step, state = opt.update(None, state, params, residual_fn=residual_fn, batch=None)
      >>> # The first trial leaves sqrt's domain: NaN, rejected.
      >>> bool(state.step_info.accepted), float(step[0])
      (False, 0.0)
    """
    where = "pb.levenberg_marquardt"
    rule, lo, hi = _check_config(solve, damping, scaling, damping_bounds, where=where)
    _common.check_loss(loss, where=where)
    cg_options = _common.check_cg(cg_max_steps, cg_tol, where=where)
    if cg_preconditioner not in ("jacobi", None):
        raise ValueError(
            f"{where}: unknown cg_preconditioner={cg_preconditioner!r}; expected 'jacobi' or None."
        )
    cg_options = cg_options._replace(jacobi=cg_preconditioner == "jacobi")
    if geodesic is not None and not float(geodesic) > 0:
        raise ValueError(
            f"{where}: geodesic must be None or alpha > 0 (e.g. 0.75); got {geodesic}."
        )
    if watchdog not in (None, "auto") and not (
        isinstance(watchdog, int) and not isinstance(watchdog, bool) and watchdog >= 1
    ):
        raise ValueError(
            f"{where}: watchdog must be None, 'auto' or an int >= 1 (trials an excursion may "
            f"take); got {watchdog!r}."
        )
    if damping == "minpack":
        clash = [f"{name}={value!r}" for name, value, bad in (
            ("solve", solve, solve == "cg"),
            ("geodesic", geodesic, geodesic is not None),
            ("init_damping", init_damping, init_damping is not None),
            ("watchdog", watchdog, watchdog not in (None, "auto")),
        ) if bad]  # fmt: skip
        if clash:
            raise ValueError(
                f"{where}: damping='minpack' sets each trial's lam from its trust region "
                f"(a factorisation of J per step), so it cannot be combined with "
                f"{', '.join(clash)}; use damping='nielsen' (or another rule) for those."
            )
    if int(dual_refine_steps) < 0:
        raise ValueError(f"{where}: dual_refine_steps must be >= 0; got {dual_refine_steps}.")
    dual_options = _forms.DualOptions(max_steps=int(dual_refine_steps))
    lam0 = rule.init_damping if init_damping is None else float(init_damping)
    relative = rule.relative if init_damping_relative is None else bool(init_damping_relative)
    if not lam0 > 0:
        raise ValueError(f"{where}: init_damping must be > 0; got {init_damping}.")

    def init_fn(params: PyTree) -> LevenbergMarquardtState:
        _common.check_params(params, where=where)
        flat, _ = ravel_pytree(params)
        dt = _model.work_dtype(flat.dtype)
        radius = 100 * jnp.linalg.norm(flat.astype(dt))
        return LevenbergMarquardtState(
            count=jnp.zeros((), jnp.int32),
            damping=jnp.asarray(lam0, dt),
            nu=jnp.asarray(2, dt),
            radius=jnp.where(radius > 0, radius, 100).astype(dt),
            scale=jnp.zeros(flat.shape, dt),
            tie_step=jnp.zeros((), dt),
            anchor=jnp.zeros(flat.shape, dt),
            anchor_loss=jnp.zeros((), dt),
            anchor_damping=jnp.asarray(lam0, dt),
            excursion=jnp.zeros((), jnp.int32),
            excursion_step=jnp.zeros((), dt),
            failures=jnp.zeros((), jnp.int32),
            step_info=empty_step_info(dt),
        )

    def update_fn(updates, state, params=None, *, residual_fn=None, batch=None, **extra):
        del updates, extra
        work = _common.setup(
            residual_fn,
            params,
            batch,
            loss,
            solve,
            memory_budget,
            where=where,
            cg_max_steps=cg_options.max_steps,
            state=state,
            state_type=LevenbergMarquardtState,
            dense_only=damping == "minpack",  # it decomposes J itself
        )
        model, form = work.model, work.form
        dt = model.r.dtype
        length = _watchdog_length(watchdog, model.r.size, work.flat.size, dt)
        minpack = damping == "minpack"
        if minpack:
            length = None  # watchdog="auto" leaves MINPACK's trust region alone
            if form == "cg":  # only where no dense form fits (setup's dense_only)
                raise ValueError(
                    f"{where}: damping='minpack' decomposes the dense Jacobian (R x P = "
                    f"{model.r.size} x {work.flat.size}), but solve='auto' chose matrix-free "
                    "'cg' here because a dense form exceeds memory_budget or "
                    "paribus.solvers._cost.MAX_DENSE; use damping='nielsen', or raise "
                    "memory_budget if the device can hold J."
                )
        # Marquardt's D for MINPACK's own problem, 1/2 ||r||^2; with a loss the weights move
        # diag(J^T J) by orders of magnitude between steps and a running max of it misleads.
        scaling_now = scaling or ("marquardt" if minpack and loss is None else "identity")
        d, running = _scaling(state, model, scaling_now, scaling_floor)
        if minpack:
            radius = jnp.where(
                state.count == 0, _minpack.initial_radius(work.flat, d), state.radius
            ).astype(dt)
            tr = _minpack.step(model, d, radius)
            sol, lam = tr.solution, tr.par
            plain = lam
        else:
            lam = _first_damping(state, model, d, lam0) if relative else state.damping
            lam = jnp.clip(lam, lo, hi)
            plain = lam  # the damping ordinary LM would try now
            if length is not None:  # the first trial is (almost) Gauss-Newton's step
                lam = jnp.where(state.count == 0, jnp.clip(lam * WATCHDOG_SHRINK, lo, hi), lam)
            sol = _forms.solve(
                form, model, lam, d, min_norm=False, cg_options=cg_options,
                dual_options=dual_options,
            )  # fmt: skip
        ok = _common.finite(sol.delta) & _common.finite(sol.jd)
        delta, jd = jnp.where(ok, sol.delta, 0), jnp.where(ok, sol.jd, 0)
        velocity = delta
        if geodesic is not None:
            accel, bend = _acceleration(
                residual_fn, params, batch, work, form, model, lam, d, velocity, cg_options,
                dual_options, where=where,
            )  # fmt: skip
            # A trial that bends more than alpha is outside the region where the second-order
            # path is trusted: rejected like a non-finite one, without a gain ratio.
            ok = ok & (bend <= geodesic)
            delta = velocity + 0.5 * accel
        # Leaf by leaf, not unravel(flat + delta): on the CPU the latter made XLA rebuild every
        # weight matrix inside the trial's matmuls (143 against 95 ms for solve + trial at
        # 16-1024-1024-1, N = 1024). The trial is the point the update will reach, in the
        # parameters' own dtype.
        trial = jax.tree.map(jnp.add, params, work.unravel(delta))
        _common.trial_structure_check(residual_fn, params, trial, batch, where=where)
        lin = model.linearization
        actual, trial_value = lin.decrease(residual_fn(work.lift(trial), batch))
        extra_term = 0.0 if model.e is None else jnp.vdot(model.e, delta)
        predicted = predicted_decrease(jd, model.r, extra_term)
        rho = gain_ratio(actual.astype(dt), jd, model.r, ok, extra_term)
        # A tie: the model promises less than L's own rounding, and the measured change is
        # within it. Neither can be judged by evaluating L, so the model is trusted (it is exact
        # to second order at such small steps); rejecting would stall a few digits short of the
        # minimum (robust losses: the gradient stuck at 1e-8 against 1e-12 reachable).
        noise = lin.noise.astype(dt)
        tie = ok & jnp.isfinite(actual) & (jnp.abs(predicted) <= noise) & (jnp.abs(actual) <= noise)
        accepted = (rho > rule.threshold) | tie
        snorm = _common.scaled_norm(velocity, d)
        rho_rule = jnp.where(tie, 1.0, rho)
        step_norm = jnp.linalg.norm(delta)
        tie_step = jnp.where(tie, step_norm, 0).astype(dt)
        if minpack:
            # lmder cuts the first radius to the first step's length.
            radius = jnp.where(state.count == 0, jnp.minimum(radius, snorm), radius)
            radius, new_lam = _minpack.next_radius(
                radius, lam, rho_rule, snorm, jd, model.value.astype(dt), trial_value.astype(dt),
                actual.astype(dt),
            )  # fmt: skip
            nu = state.nu
            # No smaller region can move theta in its dtype: MINPACK's xtol test at eps.
            collapsed = ~accepted & (
                radius <= jnp.finfo(dt).eps * _common.scaled_norm(work.flat, d)
            )
        else:
            new_lam, nu, radius = rule.update(
                lam, state.nu, state.radius, rho_rule, accepted, snorm
            )
        update = jnp.where(accepted, delta, 0)
        watch = {}  # the watchdog's state fields, unchanged without it
        if length is not None:
            rejected_lam = rule.update(lam, state.nu, state.radius, -jnp.inf, False, snorm)[0]
            # An ordinary rejection (not an excursion's): after the excursions' tiny lam,
            # doubling lam would take dozens of trials to matter. ||delta(lam)|| <= ||g|| / lam,
            # so lam >= 2 ||g|| / ||delta|| makes the next step at most half as long, in one
            # trial (D = I only: with D it would need D^-1/2 g).
            floor = 0.0 if d is not None else 2 * sol.gnorm / jnp.where(snorm > 0, snorm, jnp.inf)

            def anchor_now():
                # The anchor's loss on this update's batch: with pb.fit's minibatches the
                # stored one was measured on another batch.
                back = jax.tree.map(jnp.add, params, work.unravel(state.anchor - work.flat))
                return lin.decrease(residual_fn(work.lift(back), batch))[1].astype(dt)

            anchor_loss = jax.lax.cond(
                state.excursion > 0, anchor_now, lambda: state.anchor_loss.astype(dt)
            )
            wd = _watchdog(
                state, work.flat, model.value.astype(dt), anchor_loss, trial_value.astype(dt),
                ok & jnp.isfinite(actual), accepted, delta, step_norm, lam, plain, rejected_lam,
                length,
            )  # fmt: skip
            update, accepted = wd.update, wd.accepted
            new_lam = jnp.where(wd.rule_owns & ~wd.accepted, jnp.maximum(new_lam, floor), new_lam)
            new_lam = jnp.where(wd.rule_owns, new_lam, wd.damping)
            nu = jnp.where(wd.rule_owns, nu, state.nu)
            radius = jnp.where(wd.rule_owns, radius, state.radius)
            step_norm = jnp.where(wd.revert, jnp.linalg.norm(update), step_norm)
            watch = wd.fields
        next_lam = jnp.clip(new_lam, lo, hi).astype(lam.dtype)
        at_limit = collapsed if minpack else ~accepted & (next_lam <= lam)
        info = step_info(
            loss=model.value.astype(dt),
            grad_norm=sol.gnorm,
            damping=lam,
            gain_ratio=rho,
            accepted=accepted,
            step_norm=step_norm,
            trial_loss=trial_value,
            form=_linear.CODES[form],
            repair=sol.repair,
            at_damping_limit=at_limit,
            at_noise_floor=tie & (state.tie_step > 0) & (step_norm > TIE_SHRINK * state.tie_step),
        )
        new_state = LevenbergMarquardtState(
            count=state.count + 1,
            damping=next_lam,
            nu=nu.astype(dt),
            radius=radius.astype(dt),
            scale=running,
            tie_step=tie_step,
            anchor=state.anchor,
            anchor_loss=state.anchor_loss,
            anchor_damping=state.anchor_damping,
            excursion=state.excursion,
            excursion_step=state.excursion_step,
            failures=state.failures,
            step_info=info,
        )._replace(**watch)
        return work.unravel(update), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
