"""The exactness property on random networks (`random_nets`): for every seed, the compiled
artifact returns what int_infer returns, in either weight format. A few dozen seeds in the fast
tests (`--opt 0` and `3`), two hundred in the slow ones, each at one level where ONNX Runtime
fuses nothing (0 or 1) and one where it fuses (2 or 3), drawn per seed: every level is covered
(the op grid, `test_artifact_exactness.py`, runs all four on every pattern)."""

from __future__ import annotations

import random

import pytest

from artifact_check import compare_with_artifacts
from random_nets import random_case
from test_artifact_exactness import WEIGHTS

FAST_SEEDS = range(24)
SLOW_SEEDS = range(1000, 1200)


def _check(seed: int, opts: tuple[int, ...]) -> None:
    case = random_case(seed)
    weights = (random.Random(seed).choice(WEIGHTS),)
    comparison = compare_with_artifacts(case.net, case.march, size=(16, 16), int16=case.int16, opts=opts,
                                        weights=weights, seed=seed)
    assert not comparison.disagreements, f"{case}\n" + "\n".join(map(str, comparison.disagreements))


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_a_random_network_compiles_to_its_integer_program(seed: int):
    _check(seed, (0, 3))


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_a_random_network_compiles_to_its_integer_program_at_two_levels(seed: int):
    rng = random.Random(seed)
    _check(seed, (rng.choice([0, 1]), rng.choice([2, 3])))
