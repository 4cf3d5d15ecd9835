"""``pb.fit``'s arguments, checked at the call: bad configuration raises before anything runs.

Each check says what to do instead (STYLE.md rule 10); shapes are read with
``jax.eval_shape``, so nothing is computed or compiled here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paribus._fit.records import FitState

PyTree = Any


def is_traced(tree: PyTree) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(tree))


def check_config(
    residual_fn, opt, max_steps, loss, callback, callback_every, progress, compile_mode
):
    if not isinstance(max_steps, int | np.integer) or max_steps < 1:
        raise ValueError(f"pb.fit: max_steps must be an int >= 1; got {max_steps!r}.")
    if not callable(residual_fn):
        raise TypeError(f"pb.fit: residual_fn must be callable; got {residual_fn!r}.")
    if not hasattr(opt, "init") or not hasattr(opt, "update"):
        raise TypeError(
            f"pb.fit: opt must be an optax GradientTransformation (e.g. optax.adam(1e-3) or "
            f"pb.levenberg_marquardt()); got {opt!r}."
        )
    if loss is not None and not _is_loss(loss):
        raise TypeError(
            "pb.fit: loss must be None (L = 1/2 ||r||^2) or an OutputLoss such as "
            f"pb.losses.softmax_cross_entropy(); got {loss!r}."
        )
    if callback is not None and not callable(callback):
        raise TypeError(f"pb.fit: callback must be callable or None; got {callback!r}.")
    if not isinstance(progress, bool | np.bool_):
        raise TypeError(
            f"pb.fit: progress is True (a tqdm bar) or False; got {progress!r}. To call a "
            "function as the run goes, pass callback=fn (and callback_every=)."
        )
    if not isinstance(callback_every, int | np.integer) or callback_every < 1:
        raise ValueError(f"pb.fit: callback_every must be an int >= 1; got {callback_every!r}.")
    if compile_mode not in ("auto", "quick", "full"):
        raise ValueError(
            f'pb.fit: compile_mode must be "auto", "quick" or "full"; got {compile_mode!r}.'
        )


def check_number(name: str, value, *, allow_inf: bool = False) -> None:
    if value is None or is_traced(value):
        return
    v = np.asarray(value)
    if v.shape != () or not np.issubdtype(v.dtype, np.number) or np.isnan(v):
        raise ValueError(f"pb.fit: {name} must be a number; got {value!r}.")
    if v < 0 or (np.isinf(v) and not allow_inf):
        raise ValueError(f"pb.fit: {name} must be finite and >= 0; got {value!r}.")


def check_target(target_loss) -> None:
    if target_loss is None or is_traced(target_loss):
        return
    v = np.asarray(target_loss)
    if v.shape != () or not np.issubdtype(v.dtype, np.number) or np.isnan(v):
        raise ValueError(f"pb.fit: target_loss must be a number (or None); got {target_loss!r}.")


def _output_shapes(residual_fn, params, batch) -> PyTree:
    try:
        return jax.eval_shape(residual_fn, params, batch)
    # DeprecationWarning: what jnp.shape of a tuple batch raises where warnings are errors.
    except (TypeError, jax.errors.JAXTypeError, DeprecationWarning) as error:
        raise TypeError(
            f"pb.fit: residual_fn(params, batch) failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}). pb.fit calls residual_fn(params, batch) once "
            "with the whole batch and expects the residuals r (or (outputs, targets) with "
            "loss=). A network's apply(params, x) of one example is not a residual function: "
            "pass pb.regression_residuals(apply), or pb.per_example(fn) of fn(params, example)."
        ) from error


def check_outputs(residual_fn, params, batch, loss) -> int:
    """What ``residual_fn(params, batch)`` returns, from shapes alone (``jax.eval_shape``);
    returns the number of residuals (of outputs, with a loss's (outputs, targets) pair)."""
    out = _output_shapes(residual_fn, params, batch)
    if loss is not None and isinstance(out, tuple | list) and len(out) == 2:
        z = out[0]
        if hasattr(z, "shape") and len(z.shape) >= 1 and z.shape[0] == 0:
            raise ValueError(
                "pb.fit: residual_fn returned outputs for 0 examples (an empty batch?)."
            )
        # the model checks the (outputs, targets) pair when it is traced
        return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(z))
    leaves = jax.tree.leaves(out)
    if not leaves or not all(jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves):
        raise TypeError(
            "pb.fit: residual_fn(params, batch) must return a float array or a pytree of "
            f"float arrays (the residuals r); got {out}."
        )
    if len(leaves) == 1 and leaves[0].shape == ():
        raise ValueError(
            "pb.fit: residual_fn(params, batch) returned a scalar. pb.fit minimises "
            "L = 1/2 ||r||^2 of the residuals it returns: return the residuals r, not the "
            "loss (shape (1,) for one residual)."
        )
    n_resid = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    if n_resid == 0:
        raise ValueError(
            "pb.fit: residual_fn(params, batch) returned no residuals (an empty batch?); "
            "expected at least one."
        )
    return n_resid


def _solver_loss(opt) -> tuple[bool, Any]:
    """(found, loss) from the closure of a paribus solver's update (loss= of its factory).

    A stand-in until the solvers expose their loss: the factories keep it in their closure.
    """
    update = getattr(opt, "update", None)
    code, cells = getattr(update, "__code__", None), getattr(update, "__closure__", None)
    if code is None or not cells or not getattr(update, "__module__", "").startswith("paribus."):
        return False, None
    cells = dict(zip(code.co_freevars, cells, strict=True))
    if "loss" not in cells:
        return False, None
    loss = cells["loss"].cell_contents
    return loss is None or _is_loss(loss), loss


def _is_loss(x: Any) -> bool:
    return callable(getattr(x, "value", None)) and callable(getattr(x, "whiten", None))


def _same_loss(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # e.g. an array field compared elementwise
        return False


def resolve_loss(residual_fn, loss):
    """``loss``, or the one ``residual_fn`` carries (``pb.losses.network_outputs(apply, loss)``)."""
    carried = getattr(residual_fn, "loss", None)
    if not _is_loss(carried):
        return loss
    if loss is None:
        return carried
    if not _same_loss(carried, loss):
        raise ValueError(
            f"pb.fit: residual_fn carries loss {getattr(carried, 'name', carried)!r} but "
            f"pb.fit got loss={getattr(loss, 'name', loss)!r}; give the loss once."
        )
    return loss


def check_loss_agrees(opt, loss, residual_fn=None) -> None:
    found, solver_loss = _solver_loss(opt)
    if not found or _same_loss(solver_loss, loss):
        return
    carried = getattr(residual_fn, "loss", None)
    if solver_loss is None and _is_loss(carried) and _same_loss(carried, loss):
        return  # the solver linearises residual_fn, which carries this loss
    name = lambda x: None if x is None else getattr(x, "name", repr(x))  # noqa: E731
    raise ValueError(
        f"pb.fit: the optimiser was built with loss={name(solver_loss)!r} but pb.fit "
        f"minimises loss={name(loss)!r}; one run minimises one objective: build the optimiser "
        "with the same loss (e.g. pb.levenberg_marquardt(loss=loss))."
    )


def check_indices(batch_indices, batch) -> Any:
    if isinstance(batch, Iterator):
        raise ValueError(
            "pb.fit: batch is an iterator and batch_indices is given; batch_indices selects "
            "examples of one full batch: give one or the other."
        )
    if batch is None:
        raise ValueError("pb.fit: batch_indices needs the full data set as batch; got None.")
    indices = batch_indices if is_traced(batch_indices) else np.asarray(batch_indices)
    if indices.ndim != 2 or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(
            "pb.fit: batch_indices must be an (S, B) integer array; got "
            f"{indices.dtype}{indices.shape}."
        )
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "pb.fit: with batch_indices every leaf of batch needs the same leading (example) "
            f"axis; got leading sizes {sorted(map(str, sizes))}."
        )
    (n,) = sizes
    if (
        isinstance(indices, np.ndarray)
        and indices.size
        and (indices.min() < 0 or indices.max() >= n)
    ):
        bad = indices[(indices < 0) | (indices >= n)]
        raise ValueError(
            f"pb.fit: batch_indices must lie in [0, {n}) for a batch of {n} examples; got "
            f"{bad[:5].tolist()}."
        )
    # device_put, not jnp.asarray: that compiles a copy kernel on the first call.
    return indices if is_traced(indices) else jax.device_put(indices)


def _fresh_state(opt_state, dtype) -> FitState:
    zero = np.int32(0)
    nan, inf, nought = (np.asarray(v, dtype) for v in (np.nan, np.inf, 0))
    return FitState(opt_state, zero, nan, inf, nought, inf, zero, zero, zero)


def start_state(state, opt, params, shape_state, dtype) -> tuple[FitState, bool]:
    """The FitState to start from and whether the optimiser state is still to be made."""
    if state is None:
        try:
            placeholder = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shape_state)
        except TypeError:  # e.g. a PRNG key in the state: no numpy placeholder
            placeholder = opt.init(params)
        return _fresh_state(placeholder, dtype), True
    fs = state if isinstance(state, FitState) else _fresh_state(state, dtype)
    given = (
        jax.tree.structure(fs.opt_state),
        [(np.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(fs.opt_state)],
    )
    expected = (
        jax.tree.structure(shape_state),
        [(s.shape, s.dtype) for s in jax.tree.leaves(shape_state)],
    )
    if given != expected:
        raise ValueError(
            "pb.fit: state does not belong to this optimiser and these params: its structure "
            f"is {given[0]}, opt.init(params) gives {expected[0]}. Pass the state of a run "
            "with the same optimiser (result.state)."
        )
    return fs, False
