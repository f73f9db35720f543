"""What the front-end process and the engine core process say to each other (pickled, framed).

Front-end -> core: ``RequestSpec`` (a validated request), ``Abort``, ``Shutdown``.
Core -> front-end: ``Ready`` once the model is loaded (or ``StartupFailed``), then one
``StepUpdate`` per engine step: the step's outputs, the finished-request and step records the
metrics need, and a snapshot of the engine's counters. Records come before outputs in every
update, so a client holding its answer never scrapes a count that misses it.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass

from model.config import ModelConfig
from scheduler.engine import EngineStats, StepRecord
from scheduler.request import FinishedRequest, RequestOutput, SamplingParams

HEADER = struct.Struct("<Q")  # payload length


@dataclass(frozen=True)
class RequestSpec:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = 0.0  # time.monotonic() in the front-end (one clock for both processes)


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class ModelInfo:
    """The served model as the engine core loaded it."""

    name: str
    checkpoint_format: str
    config: ModelConfig
    dtype: str
    weight_types: str
    kv_cache_dtype: str
    device: str
    attention_backend: str
    block_size: int
    num_blocks: int
    max_model_len: int
    max_num_seqs: int  # sequences a step may run: every sample of every running request counts


@dataclass(frozen=True)
class Ready:
    info: ModelInfo
    stats: EngineStats


@dataclass(frozen=True)
class StartupFailed:
    error: str  # one line, for the user
    invalid_input: bool  # a bad checkpoint or option (exit 2), not a crash


@dataclass(frozen=True)
class StepUpdate:
    outputs: tuple[RequestOutput, ...]
    finished: tuple[FinishedRequest, ...]
    steps: tuple[StepRecord, ...]
    stats: EngineStats


def frame(message: object) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload
