"""After the forward pass: sample, fork parallel samples, stop, and build each output.

Part of the engine loop (so it may use torch). Stopping order per new token: EOS (unless
``ignore_eos``) or a stop token id -> stop; else the text stream, whose stop-string match
-> stop; then ``max_tokens`` or the model's context -> length. EOS and stop token ids are
banned from sampling until ``min_tokens`` tokens exist, and stop strings do not match
before then either. A constrained sequence's matcher (``scheduler.structured``) takes every
token that does not end it; when its grammar can take nothing more, the sequence stops. A
matcher that refuses a token its own mask allowed, or is in its error state when a step begins
(its mask then allows nothing, or only EOS: the sample would end as if complete), breaks an
invariant (``server.grammar_vocab`` keeps vocabulary and tokenizer in agreement so that it
cannot): that sample alone ends with ``error``, logged with its request id and counted
(``EngineCounters.structured_refused_tokens``); the others go on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import structlog
import torch
from llguidance import LLMatcher

from model.sampler import Sampler, SamplingRow, TokenChoice
from scheduler.request import (
    FinishReason,
    Logprob,
    RequestOutput,
    RequestTimings,
    SequenceState,
    TokenLogprobs,
    Usage,
)
from scheduler.scheduler import Scheduler, SchedulerOutput
from scheduler.structured import StructuredBatch, first_line

log = structlog.get_logger(__name__)


@dataclass
class EngineCounters:
    prompt_tokens: int = 0  # prompts of requests that produced a first token
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in FinishReason})
    rejected_queue_full: int = 0
    steps: int = 0
    structured_refused_tokens: int = 0  # tokens a matcher refused after its mask allowed them, or empty masks


def to_logprobs(choice: TokenChoice) -> TokenLogprobs:
    assert choice.logprob is not None and choice.rank is not None
    top = tuple(Logprob(t, lp, rank) for rank, (t, lp) in enumerate(choice.top, start=1))
    return TokenLogprobs(Logprob(choice.token_id, choice.logprob, choice.rank), top)


class OutputProcessor:
    def __init__(
        self,
        scheduler: Scheduler,
        sampler: Sampler,
        max_model_len: int,
        clock: Callable[[], float],
        counters: EngineCounters,
        device: torch.device,
    ) -> None:
        self.scheduler = scheduler
        self.sampler = sampler
        self.max_model_len = max_model_len
        self.clock = clock
        self.counters = counters
        self.device = device
        self.generators: dict[str, torch.Generator] = {}
        self.matchers: dict[str, LLMatcher] = {}  # constrained sequences by seq_id
        self._structured: StructuredBatch | None = None  # made with the first constrained row

    def process(self, out: SchedulerOutput, logits: torch.Tensor) -> list[tuple[SequenceState, RequestOutput]]:
        """Commit each chunk, sample where a chunk reached the end, return the new outputs."""
        to_sample: list[tuple[SequenceState, int]] = []
        row = 0
        for item in out.scheduled:
            self.scheduler.commit(item)
            seq = item.seq
            if item.prompt_logits:
                self._prompt_logprobs(seq, item.num_tokens, logits[row : row + item.num_tokens])
            if item.sample:
                last = row + item.num_logits - 1
                first_sample = seq.index == 0 and not seq.output_token_ids
                to_sample.append((seq, last))
                if first_sample:
                    to_sample.extend((child, last) for child in self._fork_samples(seq))
            row += item.num_logits
        if not to_sample:
            return []
        index = torch.tensor([r for _, r in to_sample], device=logits.device)
        rows = [self._row(seq) for seq, _ in to_sample]
        constrained = [i for i, (seq, _) in enumerate(to_sample) if seq.seq_id in self.matchers]
        bitmask = None
        stuck: set[int] = set()  # rows whose matcher allows no token at all
        if constrained:
            if self._structured is None:
                self._structured = StructuredBatch(logits.shape[1])
            matchers = [self.matchers[to_sample[i][0].seq_id] for i in constrained]
            bitmask = self._structured.bitmask(matchers)
            empty = set((bitmask == 0).all(dim=1).nonzero().flatten().tolist())
            # a matcher in its error state masks all but EOS: that would end the sample as if complete
            stuck = {constrained[j] for j, matcher in enumerate(matchers) if j in empty or matcher.is_error()}
        choices = self.sampler.sample(logits[index], rows, constrained, bitmask)
        return [
            (seq, self._refused(seq, choice.token_id, self._why_stuck(seq)) if i in stuck
             else self._append(seq, choice))
            for i, ((seq, _), choice) in enumerate(zip(to_sample, choices, strict=True))
        ]  # fmt: skip

    def _fork_samples(self, parent: SequenceState) -> list[SequenceState]:
        children = []
        for i in range(1, parent.request.params.n):
            child = SequenceState(
                f"{parent.request.request_id}#{i}",
                parent.request,
                i,
                parent.text_stream.fork(),
                all_token_ids=list(parent.all_token_ids),
                num_computed_tokens=parent.num_computed_tokens,
                num_cached_tokens=parent.num_cached_tokens,
                first_scheduled=parent.first_scheduled,
            )
            self.scheduler.add_forked(parent, child)
            matcher = self.matchers.get(parent.seq_id)
            if matcher is not None:  # forked before the parent takes its first token
                self.matchers[child.seq_id] = matcher.deep_copy()
            children.append(child)
        return children

    def _row(self, seq: SequenceState) -> SamplingRow:
        params = seq.request.params
        generator = None
        if params.seed is not None:
            generator = self.generators.get(seq.seq_id)
            if generator is None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed((params.seed + seq.index) % 2**64)
                self.generators[seq.seq_id] = generator
        banned: tuple[int, ...] = ()
        if len(seq.output_token_ids) < params.min_tokens:
            banned = params.stop_token_ids + (() if params.ignore_eos else seq.request.eos_token_ids)
        return SamplingRow(
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            generator=generator,
            history=seq.all_token_ids if params.repetition_penalty != 1.0 else (),
            output_ids=seq.output_token_ids,
            banned_ids=banned,
            num_logprobs=params.logprobs,
        )

    def _prompt_logprobs(self, seq: SequenceState, num_tokens: int, rows: torch.Tensor) -> None:
        """Rows predict the next prompt token; the last prompt row predicts the first output."""
        start = seq.num_computed_tokens - num_tokens
        if start == 0:
            seq.prompt_logprobs.append(None)  # nothing predicts the first prompt token
        targets = seq.all_token_ids[start + 1 : min(start + num_tokens + 1, seq.prompt_len)]
        if targets:
            k = seq.request.params.prompt_logprobs or 0
            choices = self.sampler.prompt_logprobs(rows[: len(targets)], targets, k)
            seq.prompt_logprobs.extend(to_logprobs(c) for c in choices)

    def _append(self, seq: SequenceState, choice: TokenChoice) -> RequestOutput:
        params = seq.request.params
        token = choice.token_id
        now = self.clock()
        first_token = not seq.output_token_ids
        seq.append_token(token, now)
        self.counters.generation_tokens += 1
        if first_token and seq.index == 0:
            self.counters.prompt_tokens += seq.prompt_len
        count = len(seq.output_token_ids)
        reason: FinishReason | None = None
        stop_reason: str | int | None = None
        text = ""
        if not params.ignore_eos and token in seq.request.eos_token_ids:
            reason = FinishReason.STOP
        elif token in params.stop_token_ids:
            reason, stop_reason = FinishReason.STOP, token
        else:
            update = seq.text_stream.append(token, allow_stop=count >= params.min_tokens)
            text = update.text
            if update.stop is not None:
                reason, stop_reason = FinishReason.STOP, update.stop
        matcher = self.matchers.get(seq.seq_id)
        if matcher is not None and reason is None:
            if not matcher.consume_token(token):
                return self._refused(seq, token, matcher.get_error().strip(), text, (token,))
            if matcher.is_stopped():  # the grammar is complete and takes nothing more
                reason = FinishReason.STOP
        limit = params.max_tokens or self.max_model_len - seq.prompt_len
        if reason is None and (count >= limit or seq.num_tokens >= self.max_model_len):
            reason = FinishReason.LENGTH
        if reason is not None and not isinstance(stop_reason, str):  # a stop string already cut the text
            text += seq.text_stream.flush()
        output = RequestOutput(
            seq.request.request_id,
            seq.index,
            (token,),
            text,
            logprobs=(to_logprobs(choice),) if params.logprobs is not None else (),
            prompt_logprobs=tuple(seq.prompt_logprobs) if first_token and seq.index == 0 else (),
        )
        if reason is None:
            return output
        return self.finished(seq, reason, stop_reason, output)

    def _why_stuck(self, seq: SequenceState) -> str:
        matcher = self.matchers[seq.seq_id]
        return matcher.get_error().strip() if matcher.is_error() else "the grammar allows no token"

    def _refused(
        self, seq: SequenceState, token: int, why: str, text: str = "", token_ids: tuple[int, ...] = ()
    ) -> RequestOutput:
        """End one sample whose matcher failed: an invariant broken (see the module docstring), or
        the constraint's own doing, which the front-end's check probes but cannot rule out: the
        grammar engine's resource limits (``(a|aa){1000}``'s lexer) or text this vocabulary cannot
        write (``NoExtensionBias``). Those are the request's (``bad_input``), not counted as refused."""
        reason = first_line(why)
        output = RequestOutput(seq.request.request_id, seq.index, token_ids, text)
        if why and "doesn't satisfy the grammar" not in why and "allows no token" not in why:
            log.info("structured output stopped by its constraint", request_id=seq.request.request_id,
                     sample=seq.index, error=reason)  # fmt: skip
            error = (
                "structured output: this model's vocabulary cannot write the text the constraint requires next"
                if "NoExtensionBias" in why
                else f"structured output: the constraint went past the grammar engine's limits ({reason})"
            )
            return replace(self.finished(seq, FinishReason.ERROR, last=output, error=error), bad_input=True)
        self.counters.structured_refused_tokens += 1
        log.error("structured output refused a token", request_id=seq.request.request_id, sample=seq.index,
                  token_id=token, error=why[:2000])  # fmt: skip
        error = f"structured output refused token {token}: {reason}"
        return self.finished(seq, FinishReason.ERROR, last=output, error=error)

    def finished(
        self,
        seq: SequenceState,
        reason: FinishReason,
        stop_reason: str | int | None = None,
        last: RequestOutput | None = None,
        error: str | None = None,
    ) -> RequestOutput:
        """The final output of a sequence: done, aborted or failed. Frees its blocks."""
        self.scheduler.finish(seq)
        self.generators.pop(seq.seq_id, None)
        self.matchers.pop(seq.seq_id, None)
        self.counters.finished[reason.value] += 1
        request = seq.request
        timings = RequestTimings(
            arrival=request.arrival_time,
            first_scheduled=seq.first_scheduled,
            first_token=seq.token_times[0] if seq.token_times else None,
            finished=self.clock(),
            token_times=tuple(seq.token_times),
        )
        usage = Usage(seq.prompt_len, len(seq.output_token_ids), seq.num_cached_tokens)
        base = last or RequestOutput(request.request_id, seq.index, (), "")
        text = base.text if last is not None or reason == FinishReason.ERROR else seq.text_stream.flush()
        return RequestOutput(
            base.request_id,
            base.index,
            base.token_ids,
            text,
            base.logprobs,
            base.prompt_logprobs,
            finish_reason=reason,
            stop_reason=stop_reason,
            usage=usage,
            timings=timings,
            error=error,
        )
