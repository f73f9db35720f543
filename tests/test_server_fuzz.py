"""Hypothesis throws 500 well-formed requests with extreme and odd values at a real server:
only OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED come back, and it stays SERVING."""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mistralserve.v1 import generation_pb2 as pb

from tests.server_process import ServerProcess

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
odd_text = st.text(
    alphabet=st.one_of(
        st.characters(exclude_categories=["Cs"]),
        st.sampled_from("😀🇫🇷👨‍👩‍👧日本語中文é\x00\x01\x7f\u200b\ufeff\r\n\t"),
    ),
    max_size=40,
)
EXTREME_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([-0.0, 1e-38, 3.4e38, -3.4e38, float("nan"), float("inf"), float("-inf")]),
)


def mostly(sane: st.SearchStrategy, extreme: st.SearchStrategy) -> st.SearchStrategy:
    """One draw in 25 extreme: with ~20 fields, about half the requests are valid and generate.
    (``one_of(sane, sane, ..., extreme)`` would not do: hypothesis collapses repeated branches.)"""
    return st.sampled_from([True] + [False] * 24).flatmap(lambda wild: extreme if wild else sane)


FIELDS = {
    "temperature": mostly(st.floats(0, 2, width=32), EXTREME_FLOATS),
    "top_p": mostly(st.floats(0.0625, 1, width=32), EXTREME_FLOATS),
    "min_p": mostly(st.floats(0, 0.5, width=32), EXTREME_FLOATS),
    "repetition_penalty": mostly(st.floats(0.5, 2, width=32), EXTREME_FLOATS),
    "presence_penalty": mostly(st.floats(-2, 2, width=32), EXTREME_FLOATS),
    "frequency_penalty": mostly(st.floats(-2, 2, width=32), EXTREME_FLOATS),
    "top_k": mostly(st.integers(-1, 50), st.sampled_from([-2, -(2**31), 2**31 - 1])),
    "seed": mostly(st.integers(0, 1000), st.sampled_from([-(2**63), 2**63 - 1, -1])),
}
huge_uint32 = st.sampled_from([2**31 - 1, 2**32 - 1, 600, 511, 510])


@st.composite
def requests(draw: st.DrawFn) -> pb.GenerateRequest:
    request = pb.GenerateRequest()
    kind = draw(st.sampled_from(["prompt", "prompt", "prompt", "messages", "ids", "none"]))
    if kind == "prompt":
        request.prompt = draw(odd_text)
    elif kind == "messages":
        roles = mostly(st.sampled_from(["user", "assistant", "system"]), st.sampled_from(["", "robot", "USER"]))
        for _ in range(draw(st.integers(0, 3))):
            request.messages.messages.add(role=draw(roles), content=draw(odd_text))
    elif kind == "ids":
        ids = st.lists(mostly(st.integers(0, 127), huge_uint32), max_size=8)
        request.prompt_token_ids.ids.extend(draw(ids))
    for name, strategy in FIELDS.items():
        if draw(st.booleans()):
            setattr(request.sampling, name, draw(strategy))
    stopping = request.stopping
    stopping.max_tokens = draw(mostly(st.integers(1, 12), st.sampled_from([0, 2**32 - 1, 600, 509])))
    stopping.min_tokens = draw(mostly(st.integers(0, 3), st.sampled_from([13, 2**32 - 1])))
    stopping.stop.extend(draw(mostly(st.lists(odd_text.filter(bool), max_size=3), st.lists(odd_text, max_size=18))))
    stopping.stop_token_ids.extend(draw(st.lists(mostly(st.integers(0, 127), huge_uint32), max_size=3)))
    stopping.ignore_eos = draw(st.booleans())
    stopping.include_stop_str_in_output = draw(st.booleans())
    if draw(st.booleans()):
        request.n = draw(mostly(st.integers(1, 3), st.sampled_from([0, 16, 17, 2**32 - 1])))
    request.logprobs = draw(st.booleans())
    if draw(st.booleans()):
        request.top_logprobs = draw(mostly(st.integers(0, 5), st.sampled_from([20, 21, 2**32 - 1])))
    request.priority = draw(mostly(st.integers(-3, 3), st.sampled_from([-(2**31), 2**31 - 1])))
    request.request_id = draw(mostly(st.text(alphabet="abcdef0123456789-", max_size=36), odd_text))
    return request


@pytest.mark.slow
@settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(request=requests())
def test_fuzzed_requests_get_only_ok_invalid_argument_or_resource_exhausted(
    server: ServerProcess, request: pb.GenerateRequest
) -> None:
    with server.channel() as channel:
        try:
            response = server.stub(channel).Generate(request, timeout=60)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
            response = None
    event(code.name)
    assert code in ALLOWED
    if response is not None:
        assert len(response.completions) == (request.n if request.HasField("n") else 1)
        assert all(c.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH) for c in response.completions)
        temperature = request.sampling.temperature if request.sampling.HasField("temperature") else 1.0
        assert math.isfinite(temperature) and temperature >= 0


def test_still_serving_after_the_fuzz(server: ServerProcess) -> None:
    assert server.health() == "SERVING"
