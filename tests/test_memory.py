"""Memory budgets: what the errors say agrees with the rule that decides (issue 12)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from paribus import memory


def _fits(n: int, chunk: int, row: int, budget: int) -> bool:
    """The rule, written plainly: J (n rows of `row` bytes) plus `chunk` rows in flight."""
    return (n + min(chunk, n)) * row <= budget


@pytest.mark.parametrize("n", [1, 7, 100])
@pytest.mark.parametrize("row_params", [1, 6, 1000])
@pytest.mark.parametrize("slack", [-1, 0, 1, 47])
def test_how_many_would_fit_is_the_largest_n_the_rule_accepts(n, row_params, slack):
    row = row_params * 8  # one output, float64
    budget = (n + 1) * row - row // 2 + slack  # J and one row just around the budget
    if _fits(n, 1, row, budget):
        chunk = memory.jacobian_chunk_size(n, 1, row_params, np.float64, budget=budget)
        want = max(c for c in range(1, n + 1) if _fits(n, c, row, budget))
        assert chunk == (None if want == n else want)
        return
    with pytest.raises(memory.MemoryBudgetError) as error:
        memory.jacobian_chunk_size(n, 1, row_params, np.float64, budget=budget)
    message = str(error.value)
    largest = max((k for k in range(0, n + 1) if _fits(k, 1, row, budget)), default=0)
    if largest:
        assert f"at most {largest} examples would fit" in message
        assert not _fits(largest + 1, 1, row, budget)
    else:
        assert "not even one example would fit" in message


def test_the_issue_case_75_examples_fit():
    # 76 rows of budget: J of 75 examples plus one row in flight fits; the old message said 38.
    with pytest.raises(memory.MemoryBudgetError, match="at most 75 examples would fit"):
        memory.jacobian_chunk_size(200, 2, 10, np.float32, budget=76 * 80)


def test_sizes_that_differ_never_print_alike():
    # 26,000 and 25,990 bytes were both "25.4 KiB".
    with pytest.raises(memory.MemoryBudgetError) as error:
        memory.jacobian_chunk_size(25, 1, 130, np.float64, budget=26_000 + 1030 - 10)
    message = str(error.value)
    assert "needs 26,000 B (25.4 KiB) for J" in message
    assert "27,040 B (26.4 KiB) in all, but the memory budget is 27,020 B (26.4 KiB)" in message
    numbers = [int(x.replace(",", "")) for x in re.findall(r"([\d,]+) B\b", message)]
    assert numbers == [26_000, 1_040, 27_040, 27_020]
    with pytest.raises(memory.MemoryBudgetError, match=r"budget of 1,023 B: .* at least 1,024 B"):
        memory.chunk_size(10, 1000, fixed_bytes=24, budget=1023)


class TestExplicitChunkSize:
    """An explicit chunk size is checked by the same rule (pb.jacobian(chunk_size=10,
    memory_budget=1000) ignored the budget)."""

    def test_generic(self):
        assert memory.check_chunk_size(5, 100, 10, fixed_bytes=50, budget=100) == 5
        assert memory.check_chunk_size(None, 5, 10, fixed_bytes=50, budget=100) is None
        with pytest.raises(memory.MemoryBudgetError, match="the largest chunk that fits is 5"):
            memory.check_chunk_size(6, 100, 10, fixed_bytes=50, budget=100)
        with pytest.raises(memory.MemoryBudgetError, match="chunk_size=None .* largest .* is 4"):
            memory.check_chunk_size(None, 8, 10, fixed_bytes=50, budget=90)
        with pytest.raises(memory.MemoryBudgetError, match="at least 60 B"):
            memory.check_chunk_size(1, 100, 10, fixed_bytes=50, budget=59)

    @pytest.mark.parametrize("chunk", [1, 3, 4, 10, 20, 1000, None])
    def test_jacobian_agrees_with_the_auto_chunk(self, chunk):
        n, params, row = 20, 6, 48  # one float64 output
        budget = (n + 4) * row  # J and four rows in flight
        auto = memory.jacobian_chunk_size(n, 1, params, np.float64, budget=budget)
        assert auto == 4
        used = n if chunk is None else min(chunk, n)
        if _fits(n, used, row, budget):
            got = memory.check_jacobian_chunk_size(chunk, n, 1, params, "float64", budget=budget)
            assert got == chunk
        else:
            with pytest.raises(memory.MemoryBudgetError, match="largest chunk that fits is 4"):
                memory.check_jacobian_chunk_size(chunk, n, 1, params, "float64", budget=budget)

    def test_jacobian_that_does_not_fit_at_all(self):
        with pytest.raises(memory.MemoryBudgetError, match="at most 19 examples would fit"):
            memory.check_jacobian_chunk_size(10, 20, 1, 6, "float64", budget=1000)
