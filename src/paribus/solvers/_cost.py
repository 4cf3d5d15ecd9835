"""How "auto" picks a solve form: the cheapest in estimated time among those that fit in memory.

With R = N m rows, P parameters and W the work of one forward pass of the batch (2 N sum_l
q_l |theta_l| flops for the parameters theta_l used at q_l positions, 2 N P for an MLP, plus
the activations), one Levenberg-Marquardt update costs, besides what every form shares
(linearising, the m backward passes that give the layers' output cotangents, the trial loss:
about (4 + 2 m) W):

| form   | flops                                                 | memory                   |
|--------|-------------------------------------------------------|--------------------------|
| primal | J (2 R P) + J^T J (2 R P^2) + Cholesky P^3 / 3        | R P + P^2                |
| qr     | J + Householder QR of [J; sqrt(lam D)]: 2 (R + P) P^2 | (R + P) P                |
| dual   | kernel J J^T (below) + Cholesky R^3 / 3 + one VJP     | R^2 (+ R |theta| "rows") |
| cg     | k (JVP + VJP) ~ 4 k W, k = min(cg_max_steps, R, P)    | O(R + P)                 |

The kernel comes from ``Linearization.plan``: a "factored" dense layer (C x F, q positions)
adds 2 N^2 q^2 C + 2 R^2 q^2 F (its inputs' and cotangents' Gram products; a fused bias adds
nothing), a "rows" leaf 2 R q |theta| + 2 R^2 |theta| (its per-example rows, then their
products), a "columns" or "opaque" leaf |theta| forward passes and 2 R^2 |theta|. Dense J
(no plan) is the 2 R^2 P of J J^T.

Flops become seconds at throughputs measured per kind of operation (:data:`CPU`): matrix
products, Cholesky, QR, network passes (dense layers; convolutions apart, 25x slower per flop
on the CPU), activations, and fixed costs per call and per cg iteration. Measured with
``benchmarks/solve_forms.py`` (CPU, 2 cores shared with other jobs, float32; one jitted LM update;
est: this model):

| case (R, P)                         | primal  | qr      | dual    | cg      | auto   |
|-------------------------------------|---------|---------|---------|---------|--------|
| digits 64-16-10 GGN (14,370, 1,210) | 1.9 s   | 5.2 s   | (15 s)  | 21 ms   | cg     |
|   est                               | 0.58 s  | 1.2 s   | 40 s    | 25 ms   |        |
| 1-64-64-1, N = 64 (64, 4,353)       | 2.4 s   |         | 0.33 ms | 2.0 ms  | dual   |
|   est                               | 1.2 s   | 3.0 s   | 0.29 ms | 4.4 ms  |        |
| 16-256-256-1, N = 256 (256, 70,401) |         |         | 4.1 ms  | 107 ms  | dual   |
|   est                               | 4,700 s |         | 9.9 ms  | 0.2 s   |        |
| 1-20-1 tanh, N = 2,000 (2,000, 61)  | 1.1 ms  | 1.5 ms  | 400 ms  | 3.8 ms  | primal |
|   est                               | 0.63 ms | 0.85 ms | 119 ms  | 6.2 ms  |        |
| CNN 3x3x8 + dense GGN (14,370, 1,370) | 2.4 s | 5.2 s   |         | 9.7 s   | primal |
|   est                               | 0.96 s  | 1.8 s   | 41 s    | 3.9 s   |        |
| CNN, N = 64 (640, 1,370)            | 232 ms  | 408 ms  | 12 ms   | 37 ms   | dual   |
|   est                               | 78 ms   | 169 ms  | 16 ms   | 176 ms  |        |

Blank: not timed (dual at the digits classifier: 15 s as measured on the issue). Estimates are
within about 3x of the measurements (the CNN's cg within 5x: its convolutions slow down more than
linearly in N inside the loop), while the forms differ by 10x to 10^6x; in every case auto's
form was the fastest measured.

"auto" picks among dual (R < P), primal (R >= P) and cg; qr is estimated but never picked (see
:func:`choose`). cg is inexact (its step stops at ``cg_max_steps``) where the factorised forms
are exact, so it is picked only when estimated at least :data:`CG_MARGIN` times cheaper than
the factorised form that fits: then the per-update price of exactness is at most that factor.
"""

from __future__ import annotations

import re
from typing import NamedTuple

MAX_DENSE = 8192
"""Largest side of a matrix "auto" factorises: (1/3) 8192^3 = 1.8e11 flops, seconds on a CPU and
milliseconds on a GPU. Above it matrix-free CG is cheaper in every case measured."""

CG_MARGIN = 1.5
"""cg is chosen over an exact (factorised) form only when estimated this many times cheaper."""

DEFAULT_CG_STEPS = 50
"""cg's iteration cap when the caller does not say (``CGOptions.max_steps``)."""


class Rates(NamedTuple):
    """Throughputs and fixed costs of a machine (measured, see the module docstring).

    Attributes:
      gemm: flop/s of large matrix products (J^T J, J J^T, the kernel's Gram products).
      factor: flop/s of a Cholesky factorisation.
      qr: flop/s of a Householder QR.
      network: flop/s of a pass through a dense network (per-example products).
      conv: flop/s of a pass through a convolution (XLA's CPU convolutions of few channels run
        far below its matrix products).
      elementwise: flop-equivalents per activation (tanh and its derivative) in a pass.
      iteration: seconds of fixed cost per cg iteration (the loop body's dispatch).
      call: seconds of fixed cost per update.
      copy: bytes/s of writing a dense array (J, J^T J, the kernel).
      cg_pass: forward passes' worth of work per cg iteration (one JVP and one VJP).
      cg_conv_pass: the same for a convolution, which XLA's CPU backend runs far slower inside
        the ``while_loop`` body than in a straight-line pass.
    """

    gemm: float
    factor: float
    qr: float
    network: float
    conv: float
    elementwise: float
    iteration: float
    call: float
    copy: float
    cg_pass: float
    cg_conv_pass: float


CPU = Rates(
    gemm=8e10,
    factor=2.5e10,
    qr=3.7e10,
    network=4e10,
    conv=1.5e9,
    elementwise=20.0,
    iteration=1e-5,
    call=1e-4,
    copy=3e9,
    cg_pass=4.0,
    cg_conv_pass=8.0,
)
"""Measured on the reference CPU (2 cores shared with other jobs, float32, jax 0.10;
``benchmarks/solve_forms.py --calibrate`` and the forward, JVP and VJP passes of its cases):
a 4096 x 1024 J^T J at 7-11e10 flop/s, a 1024 Cholesky at 2.4-2.9e10, a 4096 x 1024 QR at
3.7e10; one forward pass 2.4e10 flop/s (64-16-10 digits, N = 1,437) to 8.4e10 (16-256-256-1,
N = 256), 4e9 for 1-20-1 at N = 2,000 where the tanh of 40,000 activations dominates, 1.4e9 for
a 3x3x8 convolution on 8x8 digits; the linearisation's J v plus J^T u 4-8 forward passes
(digits: 0.64 ms against 0.14 ms); 1-64-64-1 at N = 64: 0.4 ms for a whole dual update."""


class Cost(NamedTuple):
    """Estimated seconds, bytes of dense intermediates, and flops of one update in a form."""

    seconds: float
    bytes: float
    flops: float


class Shape(NamedTuple):
    """What the costs need from the network: N, m, the flops W of one forward pass of the batch
    (in network-rate flops), its convolutions' share of W, the flops of the kernel J J^T, the
    parameters held as per-example rows (R x that many numbers for the kernel), the work of
    forming those rows (for diag(J^T J)), and the parameters whose J columns take forward
    passes."""

    n: int
    m: int
    forward: float
    conv: float
    kernel: float
    row_params: int
    row_work: float
    column_params: int


_OUT = re.compile(r"->\s*\(([\d,\s]*)\)")


def _positions(uses: tuple[str, ...], shape: tuple[int, ...]) -> int:
    """Positions a leaf is applied at: its first use's output size over the leaf's last (feature)
    dimension (a conv's pixels, a sequence's tokens; 1 for a dense layer). Read from the plan's
    description of the use, "dot_general (64,) x (64, 16) -> (16,)"; 1 if it does not parse."""
    if not uses or not shape:
        return 1
    hit = _OUT.search(uses[0])
    if hit is None:
        return 1
    out = 1
    for s in hit.group(1).replace(" ", "").split(","):
        if s:
            out *= int(s)
    return max(1, out // max(1, shape[-1]))


def shape_of(plan, n_res: int, n_params: int, rates: Rates | None = None) -> Shape:
    """The :class:`Shape` of a linearisation from its plan (a dense twin when plan is None).

    ``Shape.forward`` is in seconds' worth of network flops at ``rates.network``: convolutions
    count ``rates.network / rates.conv`` times their flops, and every output of a dot or conv
    ``rates.elementwise`` flops for its activation."""
    rates = CPU if rates is None else rates
    if plan is None or plan.n_examples is None or not plan.leaves:
        n = max(1, n_res)
        return Shape(n, 1, 2.0 * n * n_params, 0.0, 2.0 * n * n * n_params, 0, 0.0, n_params)
    n, m = int(plan.n_examples), int(plan.n_outputs)
    r = n * m
    forward = conv_share = kernel = row_work = 0.0
    rows = columns = 0
    for leaf in plan.leaves:
        size, q = leaf.size, _positions(leaf.uses, leaf.shape)
        f = leaf.shape[-1] if leaf.shape else 1
        conv = bool(leaf.uses) and leaf.uses[0].startswith("conv")
        slow = rates.network / rates.conv if conv else 1.0
        forward += 2.0 * n * q * size * slow
        conv_share += 2.0 * n * q * size * slow if conv else 0.0
        if len(leaf.shape) > 1:  # a weight: its outputs go through an activation
            forward += rates.elementwise * n * q * f
        if leaf.form == "factored":
            if leaf.note.startswith("bias of"):
                continue  # a column of ones in its layer's inputs
            kernel += 2.0 * n * n * q * q * (size / f + 1) + 2.0 * r * r * q * q * (f + 1)
        elif leaf.form == "rows":
            kernel += 2.0 * r * q * size + 2.0 * r * r * size
            rows += size
            row_work += 2.0 * r * q * size * slow
        elif leaf.form in ("columns", "opaque"):
            kernel += 2.0 * r * r * size
            columns += size
    return Shape(n, m, forward, conv_share, kernel, rows, row_work, columns)


def estimate(
    n_res: int,
    n_params: int,
    itemsize: int,
    plan=None,
    *,
    cg_max_steps: int = DEFAULT_CG_STEPS,
    rates: Rates = CPU,
) -> dict:
    """Estimated :class:`Cost` of one LM update in each form, keyed by form; also "R" and "P".

    See the module docstring for the model. ``plan`` is the linearisation's
    :class:`pb.linearize` plan (None: a dense network, W = 2 R P).
    """
    r, p = float(n_res), float(n_params)
    s = shape_of(plan, n_res, n_params, rates)
    w = s.forward
    # Every form: linearise (about 3 W), the m output cotangents (2 m W, shared by J, the
    # kernel and diag(J^T J)), the trial loss (W), J^T r.
    shared = (4 + 2 * s.m) * w
    # J's columns that come by forward passes (fallback leaves): one pass per column.
    columns = s.column_params * w

    def seconds(gemm=0.0, factor=0.0, qr=0.0, network=0.0, written=0.0, iterations=0.0):
        return (
            gemm / rates.gemm + factor / rates.factor + qr / rates.qr
            + (shared + columns + network) / rates.network + written / rates.copy
            + iterations * rates.iteration + rates.call
        )  # fmt: skip

    jac_bytes = r * p * itemsize
    out = {"R": n_res, "P": n_params}
    gemm = 2 * r * p * p + 6 * r * p
    out["primal"] = Cost(
        seconds(gemm=gemm, factor=p**3 / 3 + 2 * p * p, written=jac_bytes + p * p * itemsize),
        jac_bytes + p * p * itemsize,
        gemm + p**3 / 3,
    )
    house = 2 * (r + p) * p * p - 2 * p**3 / 3
    out["qr"] = Cost(
        seconds(gemm=6 * r * p, qr=house, written=jac_bytes),
        (r + p) * (p + 1) * itemsize,
        house + 6 * r * p,
    )
    kern = s.kernel + 6 * r * r
    out["dual"] = Cost(
        seconds(gemm=kern, factor=r**3 / 3, network=2 * w, written=r * r * itemsize),
        (r * r + r * s.row_params) * itemsize,
        kern + r**3 / 3,
    )
    k = float(min(cg_max_steps, n_res + 1, n_params + 1))
    # One JVP and one VJP per step (cg_pass forward passes; a convolution's inside the loop
    # body measured cg_conv_pass), and diag(J^T J) for the Jacobi scaling once.
    per_step = rates.cg_pass * (w - s.conv) + rates.cg_conv_pass * s.conv
    out["cg"] = Cost(
        seconds(network=k * per_step + 10 * k * (r + p) + s.row_work, iterations=k),
        10 * (r + p) * itemsize,
        k * per_step,
    )
    return out


def choose(
    solve: str,
    n_res: int,
    n_params: int,
    itemsize: int,
    budget: int,
    plan=None,
    *,
    cg_max_steps: int = DEFAULT_CG_STEPS,
    rates: Rates = CPU,
    dense_only: bool = False,
) -> str:
    """The form "auto" resolves to: the cheapest by :func:`estimate` whose dense intermediates
    fit in ``budget`` bytes and whose factorisation is at most ``MAX_DENSE`` on a side, cg only
    when :data:`CG_MARGIN` times cheaper than that; cg when no factorised form fits.
    ``dense_only`` (a caller that needs J itself, LM's damping="minpack"): cg only then."""
    if solve != "auto":
        return solve
    costs = estimate(n_res, n_params, itemsize, plan, cg_max_steps=cg_max_steps, rates=rates)
    # The factorised form on the side where its matrix can be nonsingular: J J^T (R x R) has
    # rank at most P, so for R > P its Cholesky rounds away every digit once lam is small (Meyer,
    # R = 16, P = 3: dual stalls at f = 94.46, tests/test_zoo.py); J^T J likewise for R < P.
    # qr is not a candidate: it does at least primal's flops (2 (R + P) P^2 against
    # 2 R P^2 + P^3 / 3), and primal switches to it by itself when its Cholesky is not trusted.
    side = {"dual": n_res} if n_res < n_params else {"primal": n_params}
    dense = [f for f in side if costs[f].bytes <= budget and side[f] <= MAX_DENSE]
    if not dense:
        return "cg"
    best = min(dense, key=lambda f: costs[f].seconds)
    if dense_only:
        return best
    return "cg" if CG_MARGIN * costs["cg"].seconds < costs[best].seconds else best
