"""Seeded sampling takes any integer seed (huge or negative ones included) and stays
reproducible: the sampler's per-token key is reduced modulo 2^64, as torch reduces seeds."""
import pytest

from runner import build_runner, compose_config
from runner.request import SamplingParams


@pytest.mark.parametrize("seed", [10**8, -10**8, 2**70])
def test_any_seed_samples_reproducibly(seed):
    runner = build_runner(compose_config(["model=tiny", "device=cpu"]))
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=seed, ignore_eos=True)
    first, second = (runner.generate([[1, 2, 3]], params=params)[0] for _ in range(2))
    assert first.error is None and len(first.token_ids) == 4
    assert first.token_ids == second.token_ids
