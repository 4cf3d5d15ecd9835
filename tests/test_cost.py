"""solve="auto": the cost estimates of each form and the choice between them."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest
from jax import lax

import paribus as pb
from paribus.solvers import _cost, _model
from paribus.solvers._linear import FORMS

BIG = 1 << 40  # bytes: room for every dense form


def plan_of(residual_fn, params, batch, loss=None):
    """The linearisation's plan, traced only (no numbers computed)."""
    out = {}

    def probe(p):
        model = _model.build(residual_fn, p, batch, loss, where="test")
        out["plan"] = model.linearization.plan
        return model.r

    jax.eval_shape(probe, params)
    return out["plan"]


def classifier(n, sizes=(64, 16, 10), seed=0):
    """A tanh MLP classifier with softmax cross-entropy on random inputs (the digits' shapes)."""
    init, apply = pb.nets.mlp(list(sizes), "tanh")
    loss = pb.losses.softmax_cross_entropy()
    xs = jax.random.normal(jax.random.key(seed + 1), (n, sizes[0]))
    labels = jax.random.randint(jax.random.key(seed + 2), (n,), 0, sizes[-1])
    return init(jax.random.key(seed)), pb.losses.network_outputs(apply, loss), (xs, labels), loss


def regression(sizes, n, seed=0):
    init, apply = pb.nets.mlp(list(sizes), "tanh")
    xs = jax.random.normal(jax.random.key(seed + 1), (n, sizes[0]))
    return init(jax.random.key(seed)), pb.regression_residuals(apply), (xs, jnp.sin(3 * xs)), None


def _cnn_apply(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    y = lax.conv_general_dilated(x[None], p["conv"], (1, 1), "SAME", dimension_numbers=dn)[0]
    y = jnp.tanh(y + p["conv_b"][None, None, :])
    return y.reshape(-1) @ p["w"] + p["b"]


def cnn(n, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    params = {
        "conv": 0.3 * jax.random.normal(k[0], (3, 3, 1, 4)),
        "conv_b": jnp.zeros((4,)),
        "w": 0.1 * jax.random.normal(k[1], (8 * 8 * 4, 3)),
        "b": jnp.zeros((3,)),
    }
    xs = jax.random.normal(k[2], (n, 8, 8, 1))
    loss = pb.losses.softmax_cross_entropy()
    labels = jnp.arange(n) % 3
    return params, pb.losses.network_outputs(_cnn_apply, loss), (xs, labels), loss


def sizes_of(plan):
    return plan.n_examples * plan.n_outputs, plan.n_params


# --- the estimates --------------------------------------------------------------------------------


def test_dense_estimates_follow_their_flop_counts():
    """No plan: a dense network. primal 2 R P^2 + P^3 / 3 (+ the R P products), qr Householder
    2 (R + P) P^2 - 2 P^3 / 3 (+ products), dual kernel 2 R^2 P + R^3 / 3; memory R P + P^2,
    (R + P)(P + 1), R^2 and O(R + P) numbers."""
    r, p, item = 3000, 200, 8
    est = _cost.estimate(r, p, item)
    assert est["primal"].flops == pytest.approx(2 * r * p * p + 6 * r * p + p**3 / 3)
    assert est["qr"].flops == pytest.approx(2 * (r + p) * p * p - 2 * p**3 / 3 + 6 * r * p)
    assert est["dual"].flops == pytest.approx(2 * r * r * p + 6 * r * r + r**3 / 3)
    assert est["primal"].bytes == (r * p + p * p) * item
    assert est["qr"].bytes == (r + p) * (p + 1) * item
    assert est["dual"].bytes == r * r * item
    assert est["cg"].bytes == 10 * (r + p) * item
    assert est["R"] == r and est["P"] == p


def test_cg_cost_grows_with_its_iteration_cap_and_stops_at_the_rank():
    est = {k: _cost.estimate(10_000, 500, 4, cg_max_steps=k)["cg"] for k in (5, 50, 400)}
    assert est[5].seconds < est[50].seconds < est[400].seconds
    assert est[50].flops == pytest.approx(10 * est[5].flops)
    # CG needs at most rank(J) + 1 <= min(R, P) + 1 iterations.
    capped = _cost.estimate(10_000, 3, 4, cg_max_steps=50)["cg"]
    assert capped.flops == pytest.approx(4 * _cost.CPU.cg_pass * 2.0 * 10_000 * 3)


def test_the_plan_makes_the_kernel_cheaper_than_dense():
    """Factored dense layers: the kernel from Gram products, far below 2 R^2 P."""
    params, residual_fn, batch, loss = regression((1, 64, 64, 1), 64)
    plan = plan_of(residual_fn, params, batch, loss)
    r, p = sizes_of(plan)
    shape = _cost.shape_of(plan, r, p)
    assert shape.n == 64 and shape.m == 1
    assert shape.kernel < 0.2 * 2.0 * r * r * p
    # The forward pass: 2 N P multiply-adds, plus the activations of 64 + 64 + 1 units.
    acts = _cost.CPU.elementwise * 64 * (64 + 64 + 1)
    assert shape.forward == pytest.approx(2.0 * 64 * p + acts)


def test_positions_are_read_from_the_plan():
    params, residual_fn, batch, loss = cnn(16)
    plan = plan_of(residual_fn, params, batch, loss)
    q = {leaf.name: _cost._positions(leaf.uses, leaf.shape) for leaf in plan.leaves}
    assert q["conv"] == 64 and q["conv_b"] == 64 and q["w"] == 1, plan
    assert _cost._positions(("something else",), (3, 4)) == 1
    assert _cost._positions((), (3, 4)) == 1


# --- the choice ---------------------------------------------------------------------------------


def test_an_explicit_form_is_kept():
    for form in FORMS:
        assert _cost.choose(form, 10**6, 10**6, 4, 0) == form


def test_digits_classifier_shapes_choose_cg():
    """Issue 11: 64-16-10 tanh, softmax cross-entropy, N = 1,437 (R = 14,370, P = 1,210):
    primal took 0.9-1.0 s per update, cg 23 ms, dual 15 s."""
    params, residual_fn, batch, loss = classifier(1437)
    plan = plan_of(residual_fn, params, batch, loss)
    r, p = sizes_of(plan)
    assert (r, p) == (14_370, 1_210)
    assert _cost.choose("auto", r, p, 4, BIG, plan) == "cg"
    est = _cost.estimate(r, p, 4, plan)
    assert est["cg"].seconds * 10 < est["primal"].seconds < est["dual"].seconds


def test_small_p_with_many_rows_chooses_primal():
    """1-20-1 tanh at N = 2,000 (P = 61) and a dense P = 10 at R = 10^6."""
    params, residual_fn, batch, loss = regression((1, 20, 1), 2000)
    plan = plan_of(residual_fn, params, batch, loss)
    assert _cost.choose("auto", *sizes_of(plan), 4, BIG, plan) == "primal"
    assert _cost.choose("auto", 10**6, 10, 8, BIG) == "primal"


def test_fewer_rows_than_parameters_with_room_chooses_dual():
    params, residual_fn, batch, loss = regression((1, 64, 64, 1), 64)
    plan = plan_of(residual_fn, params, batch, loss)
    assert _cost.choose("auto", *sizes_of(plan), 4, BIG, plan) == "dual"
    params, residual_fn, batch, loss = cnn(16)
    plan = plan_of(residual_fn, params, batch, loss)
    assert _cost.choose("auto", *sizes_of(plan), 4, BIG, plan) == "dual"


def test_a_budget_too_small_for_dense_forms_chooses_cg():
    params, residual_fn, batch, loss = regression((1, 64, 64, 1), 64)
    plan = plan_of(residual_fn, params, batch, loss)
    r, p = sizes_of(plan)
    assert _cost.choose("auto", r, p, 4, r * r * 4 - 1, plan) == "cg"
    assert _cost.choose("auto", 10**6, 10, 8, 10**6 * 10 * 8 - 1) == "cg"
    # Nor is a factorisation larger than MAX_DENSE on a side ever chosen.
    assert _cost.choose("auto", 10**7, _cost.MAX_DENSE + 1, 4, BIG) == "cg"


def test_the_factorised_form_is_the_one_whose_matrix_can_be_nonsingular():
    """dual only for R < P (J J^T has rank <= P), primal only for R >= P (qr never: it costs
    more than primal, which repairs itself by QR)."""
    for r, p in [(16, 3), (200, 199), (5000, 50)]:
        assert _cost.choose("auto", r, p, 8, BIG) in ("primal", "cg")
    for r, p in [(3, 16), (199, 200), (50, 5000)]:
        assert _cost.choose("auto", r, p, 8, BIG) in ("dual", "cg")


def test_cg_needs_the_margin_to_replace_an_exact_form():
    est = _cost.estimate(5000, 120, 8)
    cheap = est["primal"].seconds
    assert (_cost.choose("auto", 5000, 120, 8, BIG) == "cg") == (
        _cost.CG_MARGIN * est["cg"].seconds < cheap
    )


# --- auto takes the step of the form it picked ----------------------------------------------------


CASES = {
    "R < P (dual)": lambda: regression((1, 32, 32, 1), 16),
    "R > P (primal)": lambda: regression((1, 8, 1), 300),
    "classifier (cg)": lambda: classifier(1437, sizes=(64, 16, 10)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_auto_takes_the_step_of_the_form_it_picked(case):
    params, residual_fn, batch, loss = CASES[case]()
    plan = plan_of(residual_fn, params, batch, loss)
    dtype = jax.tree.leaves(params)[0].dtype
    assert dtype == jnp.float64
    want = _cost.choose("auto", *sizes_of(plan), 8, pb.memory.default_budget(), plan)
    assert want == case.split("(")[1][:-1]

    def step(solve):
        opt = pb.levenberg_marquardt(solve=solve, loss=loss)
        update = jax.jit(lambda p, s: opt.update(None, s, p, residual_fn=residual_fn,
                                                 batch=batch))  # fmt: skip
        return update(params, opt.init(params))

    (auto, auto_state), (form, form_state) = step("auto"), step(want)
    assert int(auto_state.step_info.form) == FORMS.index(want)
    chex.assert_trees_all_close(auto, form, rtol=1e-12, atol=0)
    assert float(auto_state.step_info.gain_ratio) == float(form_state.step_info.gain_ratio)
