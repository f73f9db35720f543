"""Structured logs of a real server: every line JSON, one `request finished` line per request."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import grpc
import pytest
from mistralserve.v1 import generation_pb2 as pb

from tests.server_process import ServerProcess

PROMPT = "a very secret prompt"


@pytest.mark.parametrize("log_prompts", [False, True], ids=["default", "log_prompts"])
def test_one_finished_line_per_request_with_the_right_values(tiny_checkpoint: Path, log_prompts: bool) -> None:
    args = ["--log-prompts", "true"] if log_prompts else []
    server = ServerProcess(tiny_checkpoint, *args)
    try:
        server.wait_serving()
        with server.channel() as channel:
            stub = server.stub(channel)
            six, four = (
                pb.StoppingOptions(max_tokens=6, ignore_eos=True),
                pb.StoppingOptions(max_tokens=4, ignore_eos=True),
            )
            stub.Generate(pb.GenerateRequest(prompt=PROMPT, request_id="unary-1", stopping=six), timeout=60)
            three_ids = pb.TokenIds(ids=[5, 6, 7])
            streamed = pb.GenerateStreamRequest(prompt_token_ids=three_ids, request_id="stream-2", n=2, stopping=four)
            list(stub.GenerateStream(streamed, timeout=60))
            long = pb.StoppingOptions(max_tokens=400, ignore_eos=True)
            cancelled = stub.GenerateStream(
                pb.GenerateStreamRequest(prompt="cancel", request_id="cancel-3", stopping=long)
            )
            next(cancelled)
            cancelled.cancel()
            with pytest.raises(grpc.RpcError):
                stub.Generate(pb.GenerateRequest(prompt="", request_id="bad-4"), timeout=10)
    finally:
        assert server.terminate() == 0
    raw = Path(server.stderr_file.name).read_text().splitlines()
    lines = [json.loads(line) for line in raw]  # every line is JSON, or this raises
    server.close()
    assert all({"event", "level", "timestamp"} <= set(line) for line in lines)
    finished = [line for line in lines if line["event"] == "request finished"]
    assert Counter(line["request_id"] for line in finished) == {"unary-1": 1, "stream-2": 1, "cancel-3": 1}
    by_id = {line["request_id"]: line for line in finished}
    unary, stream, cancel = by_id["unary-1"], by_id["stream-2"], by_id["cancel-3"]
    assert (unary["prompt_tokens"], unary["completion_tokens"], unary["finish_reason"]) == (len(PROMPT), 6, "length")
    assert (stream["prompt_tokens"], stream["completion_tokens"], stream["finish_reasons"]) == (
        3,
        8,
        ["length", "length"],
    )
    assert cancel["finish_reason"] == "abort" and cancel["completion_tokens"] >= 1
    for line in finished:
        assert line["cached_tokens"] == 0 and line["peer"].startswith("ipv4:127.0.0.1:")
        assert 0 < line["time_to_first_token"] <= line["total_time"]
    rejected = [line for line in lines if line["event"] == "request rejected"]
    assert len(rejected) == 1 and rejected[0]["error"] == "prompt: must not be empty"
    request_lines = [line for line in lines if "request" in line["event"] and line["event"] != "request rejected"]
    assert all("request_id" in line for line in request_lines)  # every line about a request names it
    received = [line for line in lines if line["event"] == "request received"]
    assert len(received) == 3
    assert any(PROMPT in json.dumps(line) for line in lines) == log_prompts
