"""Who runs this step: iteration-level scheduling over a token budget. No torch here.

Every sequence wants ``num_tokens - num_computed_tokens`` tokens computed. Each step:

1. running sequences that need one token (decoding) get it first, then running sequences
   with more to compute (a prompt prefilled in chunks, a resumed sequence), all in
   (priority, arrival) order, within ``max_num_batched_tokens``;
2. when blocks run out, the least important running sequence (highest priority value,
   then latest arrival) is preempted: its blocks are freed and it waits to be recomputed,
   keeping the tokens it generated;
3. if nothing was preempted, waiting sequences are admitted in (priority, arrival) order
   while the budget, ``max_num_seqs`` and the blocks allow; a prefix-cache hit counts as
   computed tokens. A request's sample 0 takes a seat for each of its ``n`` samples until they
   fork from it (after its prefill), so the running samples never outnumber ``max_num_seqs``.
   A sequence whose structured-output grammar is still compiling (``ready`` False) keeps its
   place and is passed over.

Example, budget 256: running decoders A, B and a 2,000-token prompt C mid-prefill get
1 + 1 + 254 tokens this step.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from model.batch import Batch, Chunk
from scheduler.block_manager import BlockManager, PrefixHit
from scheduler.request import EngineRequest, SequenceState, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


@dataclass(frozen=True)
class ScheduledSequence:
    seq: SequenceState
    num_tokens: int  # computed this step
    sample: bool  # the chunk reaches the sequence's last token: sample the next one
    prompt_logits: bool  # every row's logits are wanted (prompt logprobs)

    @property
    def num_logits(self) -> int:
        return self.num_tokens if self.prompt_logits else int(self.sample)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[SequenceState] = field(default_factory=list)
    admitted: list[SequenceState] = field(default_factory=list)  # scheduled for the first time

    def batch(self, blocks: BlockManager, copies: list[tuple[int, int]]) -> Batch:
        chunks = []
        for item in self.scheduled:
            seq = item.seq
            table, first = blocks.block_table(seq.seq_id)
            start = seq.num_computed_tokens
            tokens = seq.all_token_ids[start : start + item.num_tokens]
            chunks.append(Chunk(tokens, start, list(table), first, item.num_logits))
        return Batch(chunks, copies)


def _order(seq: SequenceState) -> tuple[int, float, str, int]:
    return (seq.request.priority, seq.request.arrival_time, seq.request.request_id, seq.index)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.clock = clock
        self.waiting: list[SequenceState] = []  # sorted by _order
        self.running: list[SequenceState] = []
        self.num_preemptions = 0

    # -- admission -----------------------------------------------------------------------

    def add(self, request: EngineRequest) -> SequenceState:
        seq = SequenceState(request.request_id, request, 0, request.text_stream)
        seq.all_token_ids = list(request.prompt_token_ids)
        bisect.insort(self.waiting, seq, key=_order)
        return seq

    def add_forked(self, parent: SequenceState, child: SequenceState) -> None:
        """A parallel sample that shares ``parent``'s blocks and runs from now on."""
        self.blocks.fork(parent.seq_id, child.seq_id)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def finish(self, seq: SequenceState) -> None:
        """Remove a sequence (done, aborted, failed) and free its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if self.blocks.has(seq.seq_id):
            self.blocks.free(seq.seq_id)
        seq.status = SequenceStatus.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def has_ready_work(self) -> bool:
        """Something a step can run now (not only sequences waiting for their grammar)."""
        return bool(self.running) or any(seq.ready for seq in self.waiting)

    # -- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[SequenceState] = set()
        for seq in sorted(self.running, key=lambda s: (s.num_tokens - s.num_computed_tokens > 1, *_order(s))):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.allocate_slots(seq.seq_id, n):
                victim = max((s for s in self.running if s not in scheduled), key=_order)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                out.scheduled.append(self._scheduled(seq, n))
                scheduled.add(seq)
                budget -= n
        if not out.preempted:
            budget = self._admit(out, budget)
        return out

    @staticmethod
    def _seats(seq: SequenceState) -> int:
        """Running sequences ``seq`` stands for: its parallel samples too, until they fork."""
        return seq.request.params.n if seq.index == 0 and not seq.output_token_ids else 1

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        taken = sum(self._seats(seq) for seq in self.running)
        i = 0
        while i < len(self.waiting) and budget > 0 and taken < self.config.max_num_seqs:
            seq = self.waiting[i]
            if not seq.ready:
                i += 1
                continue
            if taken + self._seats(seq) > self.config.max_num_seqs:
                break  # in order: a later, smaller request does not overtake it
            wants_prompt_logits = self._wants_prompt_logits(seq)
            hit = PrefixHit() if wants_prompt_logits else self.blocks.lookup_prefix(seq.all_token_ids)
            n = min(seq.num_tokens - hit.num_tokens, budget)
            if not self.blocks.allocate_slots(seq.seq_id, n, hit):
                break
            self.blocks.count_prefix_query(seq.num_tokens)
            self.waiting.pop(i)
            seq.num_computed_tokens = hit.num_tokens
            if seq.first_scheduled is None:
                seq.first_scheduled = self.clock()
                seq.num_cached_tokens = hit.num_tokens
                out.admitted.append(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            taken += self._seats(seq)
            out.scheduled.append(self._scheduled(seq, n))
            budget -= n
        return budget

    def _scheduled(self, seq: SequenceState, n: int) -> ScheduledSequence:
        sample = seq.num_computed_tokens + n == seq.num_tokens
        return ScheduledSequence(seq, n, sample, self._wants_prompt_logits(seq))

    @staticmethod
    def _wants_prompt_logits(seq: SequenceState) -> bool:
        """Prompt logprobs are computed once, during sample 0's first prefill."""
        return seq.request.params.prompt_logprobs is not None and seq.index == 0 and not seq.output_token_ids

    def _preempt(self, seq: SequenceState) -> None:
        """Recompute later: free the blocks, keep the generated tokens."""
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_order)
        self.num_preemptions += 1

    def commit(self, item: ScheduledSequence) -> None:
        """After the forward pass: the chunk's KV is in the cache."""
        seq = item.seq
        seq.num_computed_tokens += item.num_tokens
        self.blocks.commit(seq.seq_id, seq.all_token_ids, seq.num_computed_tokens)
