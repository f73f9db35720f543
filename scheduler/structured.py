"""Structured output: a request's ``Constraint`` enforced token by token with llguidance.

A constraint becomes an llguidance grammar (JSON schema, any JSON object, regex, a choice
among strings, a Lark or GBNF grammar). ``check_constraint`` validates it without a
tokenizer, for the front-end. In the engine, ``GrammarCompiler`` builds a matcher for the
grammar against the model's vocabulary on its own thread (llguidance drops the GIL while it
builds), caches the pristine matcher by the constraint's text, and hands each sequence a deep
copy. Each step, ``StructuredBatch`` fills one bitmask row (one bit per token) per constrained
row in a single call that runs in parallel over the matchers; the sampler turns the bits into
``-inf`` logits. A sequence's matcher advances with every token it accepts, so preemption
(which keeps generated tokens) needs nothing, and parallel samples fork their parent's matcher.

JSON is generated compactly with the separators ``", "`` and ``": "`` (``json.dumps``'s
defaults): free whitespace between tokens lets a small model wander in spaces until its
``max_tokens`` instead of closing the object.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from llguidance import LLExecutor, LLMatcher, LLParserLimits, LLTokenizer, TokenizerWrapper
from llguidance.gbnf_to_lark import gbnf_to_lark

from scheduler.request import Constraint, ConstraintKind, ReasoningSpan

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
LIMITS = LLParserLimits(verbose_errors=False)  # errors name the reason, not the parser's state
CACHE_SIZE = 256


def grammar_text(constraint: Constraint) -> str:
    """The llguidance grammar of ``constraint``; ValueError naming the field if it cannot be one."""
    answer = _shape(constraint)
    return answer if constraint.reasoning is None else after_reasoning(answer, constraint.reasoning)


def _shape(constraint: Constraint) -> str:
    kind = constraint.kind
    if kind == ConstraintKind.JSON_SCHEMA:
        try:
            schema = json.loads(constraint.text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"json_schema: not valid JSON ({exc})") from None
        if not isinstance(schema, dict | bool):
            raise ValueError(f"json_schema: must be a JSON object or boolean, got {type(schema).__name__}")
        return str(LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS))  # type: ignore[arg-type]
    if kind == ConstraintKind.JSON_OBJECT:
        return str(LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS))  # type: ignore[arg-type]
    if kind == ConstraintKind.REGEX:
        return str(LLMatcher.grammar_from_regex(constraint.text))
    if kind == ConstraintKind.CHOICE:
        return str(LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in constraint.choices)))
    if kind == ConstraintKind.TOOL_CALLS:
        return str(LLMatcher.grammar_from_lark(constraint.text))
    text = constraint.text
    if "::=" in text:  # GBNF (llama.cpp's format); Lark rules use ":"
        try:
            text = gbnf_to_lark(text)
        except Exception as exc:  # the converter raises plain exceptions for syntax errors
            raise ValueError(f"grammar: not a valid GBNF grammar ({exc})") from None
    return str(LLMatcher.grammar_from_lark(text))


def marker(value: int | str) -> str:
    """A Lark terminal for a special token id (``<[5]>``: only that token, never text) or a text."""
    return f"<[{value}]>" if isinstance(value, int) else json.dumps(value)


def _regex_literal(text: str) -> str:
    """``text`` matched literally inside a Lark ``/.../`` regex."""
    return "".join(f"\\{c}" if c in "\\/.^$|?*+()[]{}-&~" else c for c in text)


def _grammar_list(grammar: str) -> list[dict[str, object]]:
    """llguidance takes a grammar as its JSON (``{"grammars": [...]}``) or as bare Lark text."""
    try:
        value = json.loads(grammar)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("grammars"), list):
        return list(value["grammars"])
    return [{"lark_grammar": grammar}]


def after_reasoning(answer: str, span: ReasoningSpan) -> str:
    """``answer`` (llguidance grammar JSON) preceded by an optional reasoning span.

    The span's text is any text up to its end marker: a special token, which text never
    matches, ends it by being one; a text marker is the end of one lexeme that cannot hold the
    marker earlier (``/.*</think>/ & ~/.*</think>.+/``: the first ``</think>`` closes it).
    """
    grammars = _grammar_list(answer)
    grammars[0]["name"] = "answer"
    if isinstance(span.end, int):
        thinking, lexeme = f"THINKING {marker(span.end)}", "THINKING: /(?s:.*)/"
    else:
        end = _regex_literal(span.end)
        thinking, lexeme = "THINKING", f"THINKING: /(?s:.*){end}/ & ~/(?s:.*{end}.+)/"
    if span.start is not None:
        thinking = f"({marker(span.start)} {thinking})?"
    top = f"start: {thinking} @answer\n{lexeme}"
    return json.dumps({"grammars": [{"lark_grammar": top}, *grammars]})


def first_line(error: str) -> str:
    """llguidance's reason without the parser state it may append."""
    return error.strip().splitlines()[0] if error.strip() else "no reason given"


def _byte_tokenizer() -> LLTokenizer:
    """A vocabulary of the 256 bytes and EOS: enough to run a grammar's lexer in the check."""
    tokens = [bytes([b]) for b in range(256)] + [b"<eos>"]
    vocabulary = _Bytes(tokens)
    return LLTokenizer(TokenizerWrapper(vocabulary), n_vocab=len(tokens), eos_token=256)


class _Bytes:
    def __init__(self, tokens: list[bytes]) -> None:
        self.tokens = tokens
        self.eos_token_id = len(tokens) - 1
        self.bos_token_id = None
        self.special_token_ids = [self.eos_token_id]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode())


UNWRITABLE = "this model's vocabulary cannot write any text the constraint allows"
_BYTES: list[LLTokenizer] = []  # built on first use (a few ms), shared: LLTokenizer is immutable
PROBE_STEPS = 16


def probe(grammar: str) -> str:
    """Run the grammar's lexer and parser over ``PROBE_STEPS`` bytes it allows (the smallest
    each time) on a byte vocabulary: a grammar that validates but exceeds the engine's limits
    once tokens arrive (``(a|aa){1000}``: too many lexer expressions at the first byte) fails
    here, in the front-end's check, not in the engine. Returns the error, or "" when none."""
    if not _BYTES:
        _BYTES.append(_byte_tokenizer())
    matcher = LLMatcher(_BYTES[0], grammar, log_level=0, limits=LIMITS)
    for _ in range(PROBE_STEPS):
        if matcher.is_error() or matcher.is_stopped():
            break
        mask = matcher.compute_bitmask()
        allowed = next((b for b in range(256) if mask[b >> 3] >> (b & 7) & 1), None)
        if matcher.is_error() or allowed is None:
            break
        matcher.consume_token(allowed)
    return first_line(matcher.get_error()) if matcher.is_error() else ""


def check_constraint(constraint: Constraint) -> None:
    """ValueError naming the field and llguidance's reason when the constraint does not compile,
    or does not survive its first bytes (``probe``)."""
    grammar = grammar_text(constraint)
    error = LLMatcher.validate_grammar(grammar, limits=LIMITS).strip() or probe(grammar)
    if error:
        raise ValueError(f"{constraint.kind.value}: {error}")


@dataclass(frozen=True)
class Compiled:
    """A pristine matcher for one constraint; ``start`` copies it for a new sequence."""

    matcher: LLMatcher
    seconds: float  # building it; 0.0 when it came from the cache
    cached: bool

    def start(self) -> LLMatcher:
        return self.matcher.deep_copy()


def _as_cached(built: Future[Compiled], future: Future[Compiled]) -> None:
    """``future`` gets what ``built`` got, as a cache hit (its build is counted once)."""
    error = built.exception()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(Compiled(built.result().matcher, 0.0, cached=True))


class GrammarCompiler:
    """Builds matchers off the engine thread and caches them by constraint text (LRU)."""

    def __init__(self, tokenizer: Callable[[], LLTokenizer], cache_size: int = CACHE_SIZE) -> None:
        """``tokenizer`` is called once, on the compiler's thread, before the first grammar
        (reading a vocabulary takes ~0.5 s: servers that never see a constraint never pay it)."""
        self._make_tokenizer = tokenizer
        self._tokenizer: LLTokenizer | None = None
        self.cache_size = cache_size
        self._cache: OrderedDict[Hashable, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[Hashable, Future[Compiled]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")

    def submit(self, constraint: Constraint, done: Callable[[], None] = lambda: None) -> Future[Compiled]:
        """A future of the constraint's matcher (already done on a cache hit); ``done`` runs when ready."""
        key = constraint.key
        future: Future[Compiled] = Future()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                future.set_result(Compiled(hit, 0.0, cached=True))
            elif key in self._building:  # the same text is being built for another request: share it
                self._building[key].add_done_callback(lambda built: _as_cached(built, future))
            else:
                future = self._building[key] = self._pool.submit(self._build, constraint)
        future.add_done_callback(lambda _: done())
        return future

    def _build(self, constraint: Constraint) -> Compiled:
        try:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            start = time.perf_counter()
            matcher = LLMatcher(self._tokenizer, grammar_text(constraint), log_level=0, limits=LIMITS)
            mask = None if matcher.is_error() else matcher.compute_bitmask()  # the first step's, computed once here
            if matcher.is_error():  # limits without verbose errors: the reason, not the parser's state
                raise ValueError(f"{constraint.kind.value}: {matcher.get_error().strip()}")
            if mask is not None and not any(mask):
                raise ValueError(f"{constraint.kind.value}: {UNWRITABLE}")
            seconds = time.perf_counter() - start
        except BaseException:
            with self._lock:
                self._building.pop(constraint.key, None)
            raise
        with self._lock:
            self._building.pop(constraint.key, None)
            self._cache[constraint.key] = matcher
            self._cache.move_to_end(constraint.key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return Compiled(matcher, seconds, cached=False)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class StructuredBatch:
    """Fills the allowed-token bitmask of a step's constrained rows, all matchers in one call."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._executor = LLExecutor()

    def bitmask(self, matchers: Sequence[LLMatcher]) -> torch.Tensor:
        """(len(matchers), words) int32: bit ``t % 32`` of word ``t // 32`` of row i is set where
        token t may follow in ``matchers[i]``'s state."""
        mask = torch.full((len(matchers), self.words), -1, dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(matcher, row) for row, matcher in enumerate(matchers)], mask.data_ptr(), self.words * 4, len(matchers)
        )
        return mask
