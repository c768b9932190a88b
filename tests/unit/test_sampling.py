import pytest
import torch

from consort.runtime.errors import InvalidRequest
from consort.runtime.sampling import SamplingParams, find_stop, make_generator, sample, stop_holdback


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("top_k", -1), ("stop", [""])],
)
def test_bad_parameters_are_invalid_requests(field: str, value: object) -> None:
    with pytest.raises(InvalidRequest, match=field):
        SamplingParams.create(**{field: value})


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="temprature"):
        SamplingParams.create(temprature=1.0)


def test_greedy_takes_argmax() -> None:
    logprobs = torch.log_softmax(torch.tensor([0.1, 3.0, 0.2]), -1)
    assert sample(logprobs, SamplingParams(temperature=0), make_generator(0)) == 1


def test_seeded_sampling_is_reproducible() -> None:
    logprobs = torch.log_softmax(torch.randn(500, generator=torch.Generator().manual_seed(1)), -1)
    params = SamplingParams(temperature=1.0)
    first = [sample(logprobs, params, g) for g in [make_generator(42)] for _ in range(20)]
    generator = make_generator(42)
    second = [sample(logprobs, params, generator) for _ in range(20)]
    assert first == second
    assert len(set(first)) > 1


def test_top_p_and_top_k_restrict_support() -> None:
    logprobs = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = make_generator(0)
    picks = {sample(logprobs, SamplingParams(top_p=0.7), generator) for _ in range(200)}
    assert picks == {0, 1}
    picks = {sample(logprobs, SamplingParams(top_k=1), generator) for _ in range(50)}
    assert picks == {0}


def test_stop_found_across_piece_boundaries() -> None:
    text = "Hello wor"
    assert find_stop(text, ["world"], 6) is None
    text += "ld!"
    assert find_stop(text, ["world"], 9) == 6
    assert stop_holdback("Hello wo", ["world"]) == 2
    assert stop_holdback("Hello", ["world"]) == 0
