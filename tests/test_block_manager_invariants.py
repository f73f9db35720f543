"""Random allocate / append / commit / fork / free / preempt sequences keep the pool consistent."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler.block_manager import BlockManager

NUM_BLOCKS = 12
# Few distinct tokens and shared stems: prompts often share cached prefixes.
prompts = st.lists(st.integers(0, 2), min_size=1, max_size=30)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm: BlockManager | None = None
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.counter = 0

    @precondition(lambda self: self.bm is None)
    @rule(block_size=st.sampled_from([1, 2, 4]), window=st.sampled_from([None, 3, 8]), caching=st.booleans())
    def start(self, block_size: int, window: int | None, caching: bool) -> None:
        self.bm = BlockManager(range(1, NUM_BLOCKS + 1), block_size, window, caching)

    def _new_id(self) -> str:
        self.counter += 1
        return f"s{self.counter}"

    @precondition(lambda self: self.bm is not None)
    @rule(prompt=prompts, chunk=st.integers(1, 12))
    def add(self, prompt: list[int], chunk: int) -> None:
        assert self.bm is not None
        seq_id = self._new_id()
        hit = self.bm.lookup_prefix(prompt)
        assert hit.num_tokens < len(prompt)
        n = min(chunk, len(prompt) - hit.num_tokens)
        free_before = self.bm.num_free_blocks
        if self.bm.allocate_slots(seq_id, n, hit):
            self.tokens[seq_id] = list(prompt)
            self.computed[seq_id] = hit.num_tokens
        else:
            assert not self.bm.has(seq_id) and self.bm.num_free_blocks == free_before

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 6))
    def append_and_compute(self, data: st.DataObject, n: int) -> None:
        """Compute what has slots, then give the sequence slots for n more tokens."""
        assert self.bm is not None
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        tokens = self.tokens[seq_id]
        have = self.bm.num_tokens(seq_id)
        while len(tokens) < have:
            tokens.append(data.draw(st.integers(0, 2)))
        self.computed[seq_id] = have
        self.bm.commit(seq_id, tokens, have)
        table_before = self.bm.block_table(seq_id)
        if not self.bm.allocate_slots(seq_id, n):
            assert self.bm.block_table(seq_id) == table_before and self.bm.num_tokens(seq_id) == have
        self.bm.take_copies()

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        assert self.bm is not None
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self._new_id()
        self.bm.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        self.computed[child] = self.computed[parent]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), preempt=st.booleans())
    def free(self, data: st.DataObject, preempt: bool) -> None:
        """Finish, abort or preempt (recompute later from its tokens) a sequence."""
        assert self.bm is not None
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(seq_id)
        tokens = self.tokens.pop(seq_id)
        del self.computed[seq_id]
        if preempt and len(tokens) > 1:
            self.add(tokens, 4)

    @invariant()
    def pool_is_consistent(self) -> None:
        if self.bm is None:
            return
        refs = {b: self.bm.ref_count(b) for b in range(1, NUM_BLOCKS + 1)}
        assert all(r >= 0 for r in refs.values())
        used = sum(1 for r in refs.values() if r > 0)
        assert self.bm.num_free_blocks + used == NUM_BLOCKS
        held = [b for s in self.tokens for b in self.bm.block_table(s)[0]]
        assert sum(refs.values()) == len(held)  # every ref is a table entry, and back
        for seq_id in self.tokens:
            blocks, first = self.bm.block_table(seq_id)
            assert len(set(blocks)) == len(blocks)
            assert first * self.bm.block_size + len(blocks) * self.bm.block_size >= self.bm.num_tokens(seq_id)

    def teardown(self) -> None:
        if self.bm is None:
            return
        for seq_id in list(self.tokens):
            self.bm.free(seq_id)
        assert self.bm.num_free_blocks == NUM_BLOCKS
        assert all(self.bm.ref_count(b) == 0 for b in range(1, NUM_BLOCKS + 1))


BlockManagerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase
