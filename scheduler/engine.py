"""The engine: a dedicated thread running schedule -> runner -> sample -> update.

Callers on any thread ``submit`` requests (``add`` from an event loop returns an async
iterator) and ``abort`` them; both go through an inbox the engine thread drains before
each step, so scheduler state is only ever touched by that thread. An exception in a step
fails the requests of that step and the engine keeps serving; if the thread itself dies,
``alive`` turns False and every pending request gets an error output.

A request with a structured-output constraint waits in the scheduler, passed over, while
``GrammarCompiler`` builds its matcher on another thread; the compiler posts "compiled" to
the inbox, and the next step gives sample 0 its matcher and lets it be admitted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import structlog
import torch

from model.runner import ModelRunner
from model.sampler import Sampler
from scheduler.block_manager import BlockManager
from scheduler.engine_outputs import EngineCounters, OutputProcessor
from scheduler.output_stream import AsyncOutputStream, OutputSink
from scheduler.request import (
    EngineDeadError,
    EngineRequest,
    FinishedRequest,
    FinishReason,
    QueueFullError,
    RequestOutput,
    RequestTimings,
    SamplingParams,
    SequenceState,
    SequenceStatus,
)
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.structured import Compiled, GrammarCompiler

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_queued_requests: int = 1024
    seed: int | None = None  # for unseeded sampling; None: from the OS

    def __post_init__(self) -> None:
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")


def validate_request(
    prompt: Sequence[int], params: SamplingParams, vocab_size: int, max_model_len: int, max_num_seqs: int
) -> None:
    """ValueError naming the field for a request no engine of this model could serve."""
    if params.n > max_num_seqs:
        raise ValueError(f"n: must be <= {max_num_seqs} (the server's --max-num-seqs), got {params.n}")
    if not prompt:
        raise ValueError("prompt is empty: at least one token is needed")
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt_token_ids: {bad} is outside the vocabulary [0, {vocab_size})")
    room = max_model_len - len(prompt)
    if room < 1:
        raise ValueError(f"prompt has {len(prompt)} tokens; the context allows at most {max_model_len - 1}")
    if params.max_tokens is not None and params.max_tokens > room:
        raise ValueError(
            f"max_tokens must be <= {room} (the rest of the context after the prompt), got {params.max_tokens}"
        )


@dataclass(frozen=True)
class StepRecord:
    index: int
    scheduled: tuple[tuple[str, int], ...]  # (sequence id, tokens computed)
    preempted: tuple[str, ...]
    num_tokens: int
    duration: float  # seconds, the whole step
    forward: float  # seconds inside the model runner
    admitted: tuple[str, ...] = ()  # requests scheduled for the first time (they left the waiting queue)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_usage: float
    kv_blocks_total: int
    kv_blocks_free: int
    preemptions: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    window_released_blocks: int
    counters: EngineCounters
    expert_tokens: tuple[tuple[int, ...], ...] = ()  # MoE: tokens routed to [layer][expert], ever


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        blocks: BlockManager,
        config: EngineConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        grammars: GrammarCompiler | None = None,
    ) -> None:
        self.runner = runner
        self.grammars = grammars
        self.blocks = blocks
        self.config = config = config or EngineConfig()
        self.clock = clock
        model_config = runner.model.config
        self.vocab_size = model_config.vocab_size
        self.max_model_len = self._max_model_len(model_config.max_position_embeddings, model_config.sliding_window)
        self.scheduler = Scheduler(config.scheduler, blocks, clock)
        generator = torch.Generator(device=runner.model.device)
        generator.seed() if config.seed is None else generator.manual_seed(config.seed)
        self.counters = EngineCounters()
        self.outputs = OutputProcessor(
            self.scheduler, Sampler(generator), self.max_model_len, clock, self.counters, runner.model.device
        )
        self.step_listeners: list[Callable[[StepRecord], None]] = []
        # Drained by the metrics (any thread may popleft); bounded so nobody draining costs nothing.
        self.finished_requests: deque[FinishedRequest] = deque(maxlen=100_000)
        self.recent_steps: deque[StepRecord] = deque(maxlen=100_000)
        self._cond = threading.Condition()
        self._inbox: deque[tuple[str, EngineRequest | str, OutputSink | None]] = deque()
        self._queued = 0  # submitted, not yet admitted (the bound of max_queued_requests)
        self._sinks: dict[str, OutputSink] = {}
        self._sequences: dict[str, list[SequenceState]] = {}
        self._unfinished: dict[str, int] = {}  # samples whose final output is not sent yet
        self._finals: dict[str, list[RequestOutput]] = {}
        self._compiling: dict[str, Future[Compiled]] = {}  # constrained requests not ready yet
        self._grammar_seconds: dict[str, float | None] = {}  # compile time per constrained request
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._fatal: BaseException | None = None

    def _max_model_len(self, context: int, window: int | None) -> int:
        """The model's context, capped so that one sequence alone always fits in the cache."""
        capacity = self.blocks.num_blocks * self.blocks.block_size
        needed = context if window is None else window + self.config.scheduler.max_num_batched_tokens
        return context if needed + self.blocks.block_size <= capacity else min(context, capacity)

    # -- public, any thread --------------------------------------------------------------

    def start(self) -> None:
        assert self._thread is None, "engine already started"
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop after the current step; whatever is unfinished gets an abort output."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.grammars is not None:
            self.grammars.shutdown()

    @property
    def has_work(self) -> bool:
        """Something to step: requests in the scheduler, or adds and aborts not taken in yet."""
        with self._cond:
            return self.scheduler.has_ready_work or bool(self._inbox)

    @property
    def compiling(self) -> bool:
        """Some request waits for its grammar (its compiler will post to the inbox)."""
        return bool(self._compiling)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._fatal is None

    def validate(self, request: EngineRequest) -> None:
        """ValueError naming the field for a request the engine could never serve."""
        validate_request(
            request.prompt_token_ids,
            request.params,
            self.vocab_size,
            self.max_model_len,
            self.config.scheduler.max_num_seqs,
        )
        constraint = request.params.constraint
        if constraint is not None and self.grammars is None:
            raise ValueError(f"{constraint.kind.value}: this engine has no structured-output support")

    def submit(self, request: EngineRequest, sink: OutputSink) -> None:
        self.validate(request)
        if self._fatal is not None or self._stopping:
            raise EngineDeadError("the engine is not running")
        with self._cond:
            if self._queued >= self.config.max_queued_requests:
                self.counters.rejected_queue_full += 1
                raise QueueFullError(f"the waiting queue is full ({self.config.max_queued_requests} requests)")
            self._queued += 1
            arrival = request.arrival_time or self.clock()  # a front-end process may have stamped it
            self._inbox.append(("add", replace(request, arrival_time=arrival), sink))
            self._cond.notify_all()

    def add(self, request: EngineRequest) -> AsyncOutputStream:
        """From a running event loop: submit, and iterate the outputs asynchronously."""
        stream = AsyncOutputStream(request.params.n, asyncio.get_running_loop())
        self.submit(request, stream)
        return stream

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._inbox.append(("abort", request_id, None))
            self._cond.notify_all()

    def stats(self) -> EngineStats:
        scheduler, blocks = self.scheduler, self.blocks
        return EngineStats(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting) + self._queued_in_inbox(),
            kv_usage=blocks.usage,
            kv_blocks_total=blocks.num_blocks,
            kv_blocks_free=blocks.num_free_blocks,
            preemptions=scheduler.num_preemptions,
            prefix_queried_tokens=blocks.counters.prefix_queried_tokens,
            prefix_hit_tokens=blocks.counters.prefix_hit_tokens,
            window_released_blocks=blocks.counters.window_released_blocks,
            counters=self.counters,
            expert_tokens=self.runner.expert_tokens(),
        )

    def _queued_in_inbox(self) -> int:
        with self._cond:
            return sum(1 for kind, _, _ in self._inbox if kind == "add")

    # -- engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._inbox or self.scheduler.has_ready_work):
                        self._cond.wait()
                    if self._stopping:
                        break
                self.step()
        except BaseException as exc:
            self._fatal = exc
            log.error("engine thread died", exc_info=exc)
        finally:
            self._drain_inbox()
            reason = FinishReason.ERROR if self._fatal else FinishReason.ABORT
            for request_id in list(self._sequences):
                self._end_request(request_id, reason, "the engine stopped" if self._fatal is None else str(self._fatal))

    def _drain_inbox(self) -> None:
        with self._cond:
            items = list(self._inbox)
            self._inbox.clear()
        for kind, payload, sink in items:
            if kind == "add":
                assert isinstance(payload, EngineRequest) and sink is not None
                self._sinks[payload.request_id] = sink
                seq = self.scheduler.add(payload)
                self._sequences[payload.request_id] = [seq]
                self._unfinished[payload.request_id] = payload.params.n
                if payload.params.constraint is not None:
                    self._compile(seq)
            elif kind == "compiled":
                assert isinstance(payload, str)
                self._compiled(payload)
            else:
                assert isinstance(payload, str)
                self._end_request(payload, FinishReason.ABORT)

    def _compile(self, seq: SequenceState) -> None:
        assert self.grammars is not None and seq.request.params.constraint is not None
        request_id = seq.request.request_id
        seq.ready = False

        def posted() -> None:
            with self._cond:
                self._inbox.append(("compiled", request_id, None))
                self._cond.notify_all()

        self._compiling[request_id] = self.grammars.submit(seq.request.params.constraint, posted)

    def _compiled(self, request_id: str) -> None:
        future = self._compiling.pop(request_id, None)
        seqs = self._sequences.get(request_id)
        if future is None or seqs is None:  # aborted meanwhile
            return
        try:
            compiled = future.result()
        except ValueError as exc:  # the constraint does not compile: the client's to fix
            self._end_request(request_id, FinishReason.ERROR, str(exc), bad_input=True)
            return
        except Exception as exc:
            self._end_request(request_id, FinishReason.ERROR, str(exc))
            return
        self._grammar_seconds[request_id] = None if compiled.cached else compiled.seconds
        self.outputs.matchers[seqs[0].seq_id] = compiled.start()
        seqs[0].ready = True

    def run_until_idle(self) -> None:
        """Step on the calling thread until nothing is left (tests and benchmarks, no thread)."""
        self.step()
        while self.scheduler.has_work:
            if not self.scheduler.has_ready_work:  # only grammars compiling
                time.sleep(0.0005)
            self.step()

    def step(self) -> None:
        """Take in new requests and aborts, then run one iteration."""
        self._drain_inbox()
        if not self.scheduler.has_ready_work:
            return
        start = self.clock()
        out = self.scheduler.schedule()
        self.counters.steps += 1
        if not out.scheduled:
            return
        if out.admitted:
            with self._cond:
                self._queued -= len(out.admitted)
        forward = 0.0
        results: list[tuple[SequenceState, RequestOutput]] = []
        failure: Exception | None = None
        try:
            batch = out.batch(self.blocks, self.blocks.take_copies())
            forward_start = self.clock()
            logits = self.runner.execute(batch)
            forward = self.clock() - forward_start
            results = self.outputs.process(out, logits)
        except Exception as exc:  # fail this step's requests, keep serving the others
            log.error("engine step failed", exc_info=exc)
            failure = exc
        record = StepRecord(
            self.counters.steps,
            tuple((item.seq.seq_id, item.num_tokens) for item in out.scheduled),
            tuple(seq.seq_id for seq in out.preempted),
            sum(item.num_tokens for item in out.scheduled),
            self.clock() - start,
            forward,
            tuple(seq.request.request_id for seq in out.admitted),
        )
        self.recent_steps.append(record)  # before any receiver can see this step's outputs
        if failure is not None:
            for request_id in dict.fromkeys(item.seq.request.request_id for item in out.scheduled):
                self._end_request(request_id, FinishReason.ERROR, f"{type(failure).__name__}: {failure}")
        for seq, output in results:
            if seq.request.request_id in self._sequences and seq not in self._sequences[seq.request.request_id]:
                self._sequences[seq.request.request_id].append(seq)
            self._send(output)
        for listener in self.step_listeners:
            listener(record)

    def _send(self, output: RequestOutput) -> None:
        """Deliver one output; when the receiver is gone, end the request without one."""
        request_id = output.request_id
        if output.finished and request_id in self._unfinished:
            self._unfinished[request_id] -= 1
            self._finals.setdefault(request_id, []).append(output)
            if self._unfinished[request_id] == 0:  # recorded before the receiver can see the end
                self._record_finished(request_id)
        sink = self._sinks.get(request_id)
        if sink is not None:
            try:
                sink.put(output)
            except RuntimeError:  # the receiver's event loop is closed: nobody is listening
                self._sinks.pop(request_id, None)
                self._end_request(request_id, FinishReason.ABORT)
        if self._unfinished.get(request_id) == 0:
            self._sinks.pop(request_id, None)
            del self._sequences[request_id], self._unfinished[request_id]

    def _record_finished(self, request_id: str) -> None:
        finals = sorted(self._finals.pop(request_id), key=lambda o: o.index)
        first = finals[0]
        usage = [o.usage for o in finals if o.usage is not None]
        seqs = self._sequences[request_id]
        empty = RequestTimings(arrival=seqs[0].request.arrival_time, first_scheduled=None, first_token=None,
                               finished=self.clock(), token_times=())  # fmt: skip
        self.finished_requests.append(
            FinishedRequest(
                request_id=request_id,
                finish_reasons=tuple(o.finish_reason for o in finals if o.finish_reason is not None),
                prompt_tokens=len(seqs[0].request.prompt_token_ids),
                generation_tokens=sum(u.completion_tokens for u in usage),
                cached_tokens=usage[0].cached_tokens if usage else 0,
                timings=first.timings or empty,
                num_preemptions=sum(s.num_preemptions for s in seqs),
                constraint=constraint.kind if (constraint := seqs[0].request.params.constraint) else None,
                grammar_compile_seconds=self._grammar_seconds.pop(request_id, None),
            )
        )

    def _end_request(
        self, request_id: str, reason: FinishReason, error: str | None = None, bad_input: bool = False
    ) -> None:
        """Finish every unfinished sample of a request (abort or error), freeing its blocks."""
        seqs = self._sequences.get(request_id)
        if seqs is None:
            return
        self._compiling.pop(request_id, None)
        request = seqs[0].request
        if seqs[0].first_scheduled is None and seqs[0].status == SequenceStatus.WAITING:
            with self._cond:
                self._queued -= 1
        live = {s.index: s for s in seqs}
        for index in range(request.params.n):
            seq = live.get(index)
            if seq is not None and seq.status == SequenceStatus.FINISHED:
                continue
            if seq is None:  # a parallel sample not forked yet
                seq = SequenceState(f"{request_id}#{index}", request, index, request.text_stream.fork())
                seq.status = SequenceStatus.FINISHED
                seqs.append(seq)
                output = RequestOutput(
                    request_id, index, (), "", finish_reason=reason, error=error, bad_input=bad_input
                )
                self.counters.finished[reason.value] += 1
            else:
                output = replace(self.outputs.finished(seq, reason, error=error), bad_input=bad_input)
            self._send(output)
