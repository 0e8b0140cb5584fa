"""Through the Python API, a request with a bad prompt or bad sampling parameters finishes at
once with its error (one line naming the field); the requests beside it are unaffected."""
import math

import pytest

from runner import build_runner, compose_config
from runner.errors import RunnerError
from runner.request import SamplingParams

GOOD = SamplingParams(max_tokens=3, ignore_eos=True)
BAD_PARAMS = [
    (dict(temperature=-1.0), "temperature=-1.0"), (dict(temperature=math.nan), "temperature=nan"),
    (dict(temperature=1e-320), "temperature=1e-320"), (dict(temperature="1"), "temperature='1'"),
    (dict(top_p=0.0), "top_p=0.0"), (dict(top_p=2.0), "top_p=2.0"), (dict(top_k=-5), "top_k=-5"),
    (dict(max_tokens=2.5), "max_tokens=2.5"), (dict(max_tokens=0), "max_tokens=0"),
    (dict(seed=1.5), "seed=1.5"),
]
BAD_PROMPTS = [([1.5], "integers"), ("ab", "integers"), (None, "integers"), ([True, 2], "bool"),
               ([2**70], "outside the vocabulary"), ([], "empty prompt")]


@pytest.fixture(scope="module")
def runner():
    return build_runner(compose_config(["model=tiny", "device=cpu"]))


def _run_beside_good_ones(runner, prompt, params):
    good_before = runner.add_request([1, 2, 3], GOOD)
    bad = runner.add_request(prompt, params)
    good_after = runner.add_request([4, 5], GOOD)
    while runner.has_unfinished():
        runner.step()
    for good in (good_before, good_after):
        assert runner.output(good).error is None and len(runner.output(good).token_ids) == 3
    return runner.output(bad)


@pytest.mark.parametrize("change, named", BAD_PARAMS, ids=[n for _, n in BAD_PARAMS])
def test_bad_sampling_parameters_fail_alone(runner, change, named):
    output = _run_beside_good_ones(runner, [7, 8, 9], SamplingParams(**{"max_tokens": 3,
                                                                        **change}))
    assert output.finish_reason == "error" and output.error.startswith(named)
    assert "\n" not in output.error and output.token_ids == []


@pytest.mark.parametrize("prompt, named", BAD_PROMPTS, ids=[repr(p) for p, _ in BAD_PROMPTS])
def test_bad_prompts_fail_alone(runner, prompt, named):
    output = _run_beside_good_ones(runner, prompt, GOOD)
    assert output.finish_reason == "error" and named in output.error


def test_generate_refuses_parameters_shared_by_every_prompt(runner):
    with pytest.raises(RunnerError, match="top_p=2.0"):
        runner.generate([[1, 2]], params=SamplingParams(top_p=2.0))


def test_an_unfinished_request_has_no_finish_reason(runner):
    req_id = runner.add_request([1, 2, 3], GOOD)
    assert runner.output(req_id).finish_reason is None
    while runner.has_unfinished():
        runner.step()
    assert runner.output(req_id).finish_reason == "length"
