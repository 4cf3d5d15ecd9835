"""Strict test settings (STYLE.md rule 13).

- float64 everywhere by default: accuracy is asserted in x64; float32 tests cast explicitly.
- rank promotion raises, so a silent (N,) + (N, 1) broadcast is a test failure.
- warnings are errors (pyproject's ``filterwarnings``).
- eight host CPU devices (XLA_FLAGS), for the sharded tests.
- hypothesis is derandomised: CI sees the same examples on every run.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Eight host devices, so the sharding tests run on any CPU machine (CI included). Single-device
# code still runs on device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compiled executables after each test module. Each holds memory maps of its
    machine code, and one pytest process compiles thousands: the kernel's limit of 65,530
    maps per process was reached once the suite grew (XLA then segfaulted inside a compile in
    tests/test_minpack.py; benchmarks/lm_watchdog_seeds.py hit the same limit as "Cannot
    allocate memory")."""
    yield
    jax.clear_caches()
