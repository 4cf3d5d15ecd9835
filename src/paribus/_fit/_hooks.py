"""The host callback and progress bar: an ordered ``io_callback`` at every point of the loop.

The compiled loop does not depend on the callback: it calls :func:`_dispatch` with a run id,
and the run's :class:`Hook` (registered for the duration of the run) does the rest on the host.
So a new callback, ``callback_every`` or progress bar reuses the compiled loop.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from paribus._fit._static import Config
from paribus._fit.records import FitProgress

PyTree = Any


def hook(cfg: Config, hook_id, every, k, value, gnorm, last, done, params):
    """The host callback at theta_k: (stop requested, seconds since theta_0)."""
    shapes = (jax.ShapeDtypeStruct((), bool), jax.ShapeDtypeStruct((), jnp.result_type(float)))
    args = (hook_id, k, value, gnorm, last[0], last[2], done)
    if not cfg.send_params:
        return io_callback(_dispatch, shapes, *args, None, ordered=True)
    # Parameters travel to the host only when the callback will see them.
    return jax.lax.cond(
        done | (k % every == 0),
        lambda: io_callback(_dispatch, shapes, *args, params, ordered=True),
        lambda: io_callback(_dispatch, shapes, *args, None, ordered=True),
    )


_HOOKS: dict[int, Hook] = {}
_HOOK_IDS = itertools.count(1)


def _dispatch(hook_id, k, value, gnorm, damping, accepted, done, params):
    return _HOOKS[int(hook_id)](int(k), value, gnorm, damping, accepted, bool(done), params)


@contextlib.contextmanager
def registered(hook: Hook | None) -> Iterator[np.int32]:
    """The run id the loop passes to :func:`hook` (0: no hook); the bar is closed at the end."""
    if hook is None:
        yield np.int32(0)
        return
    hook_id = np.int32(next(_HOOK_IDS))
    _HOOKS[int(hook_id)] = hook
    try:
        yield hook_id
    finally:
        _HOOKS.pop(int(hook_id), None)
        if hook.bar is not None:
            hook.bar.close()


class Hook:
    """The host end of one run's ``callback`` and progress bar.

    An exception in the callback (``KeyboardInterrupt`` included) is kept, the run is told to
    stop, and :func:`fit` re-raises it once the device returns: the loop never hangs on a
    failed callback and an interrupt is never swallowed by the runtime.
    """

    def __init__(self, callback, every: int, bar, first: int, dtype):
        self.callback, self.every, self.bar, self.first = callback, every, bar, first
        self.dtype = dtype
        self.start: float | None = None
        self.error: BaseException | None = None

    def __call__(self, k, value, gnorm, damping, accepted, done, params):
        now = time.perf_counter()
        self.start = now if self.start is None else self.start
        seconds = now - self.start
        stop = self.error is not None
        if not stop:
            try:
                stop = self._report(k, value, gnorm, damping, accepted, done, params, seconds)
            except BaseException as error:  # noqa: BLE001 - re-raised by fit on the host
                self.error, stop = error, True
        return np.asarray(stop, bool), np.asarray(seconds, self.dtype)

    def _report(self, k, value, gnorm, damping, accepted, done, params, seconds) -> bool:
        if self.bar is not None:
            self.bar.update(k - self.first - self.bar.n)
            self.bar.set_postfix_str(f"loss {float(value):.4e}", refresh=False)
        if self.callback is None or not (done or (k - self.first) % self.every == 0):
            return False
        record = FitProgress(
            k, float(value), float(gnorm), float(damping), bool(accepted), seconds, params
        )
        return bool(self.callback(record)) and not done


def progress_bar(total: int):
    """A tqdm bar for ``progress=True``."""
    try:
        from tqdm.auto import tqdm
    except ImportError as error:  # tqdm is in the "experiments" extra, not a core dependency
        raise ImportError(
            "pb.fit(progress=True) draws its bar with tqdm: pip install tqdm (or "
            "paribus[experiments]), or pass a callback= instead."
        ) from error
    return tqdm(total=total, desc="pb.fit", unit="step", leave=False)
