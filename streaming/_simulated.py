"""The simulated model: deterministic text at a set token rate, offline.

It is the default provider, and the model used by the demo, the tests and the benchmarks.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel

from ._exceptions import ProviderError
from ._provider import GenerationRun
from .types import GenerationRequest, ProviderChunk

DEFAULT_TOKENS_PER_SECOND = 50.0
DEFAULT_MAX_TOKENS = 200
MAX_TOKENS_LIMIT = 1_000_000

# A vocabulary with multi-byte text on purpose: accents, CJK, emoji and a combining sequence,
# so that every resume and text-offset path sees more than ASCII.
VOCABULARY = (
    "the",
    "stream",
    "keeps",
    "every",
    "token",
    "safe",
    "while",
    "clients",
    "come",
    "and",
    "go",
    "durable",
    "log",
    "resume",
    "offset",
    "café",
    "naïve",
    "日本語",
    "中文",
    "🙂",
    "🚀",
    "e\u0301",
    "👩‍💻",
    "résumé",
    "données",
    "λ",
    "Ωmega",
    "한국어",
)


@dataclass(frozen=True, slots=True)
class _Params:
    rate: float
    count: int
    echo: bool
    fail_after: int | None
    stamp: bool
    seed: int | None


class SimulatedProvider:
    """Deterministic text: the same prompt, params and ``seed`` always give the same words,
    and an answer continued from any prefix of it (``run.partial``) ends exactly as the
    uninterrupted one would have.

    Params (all optional): ``tokens_per_second`` (0 = as fast as possible),
    ``max_tokens`` (how many tokens), ``echo`` (start by repeating the prompt),
    ``fail_after`` (raise a provider error after that many tokens), ``seed`` (an integer
    that picks another answer for the same prompt), ``stamp`` (each token is its creation
    time in nanoseconds, for latency benchmarks; such an answer cannot be continued).
    """

    name = "simulated"

    def __init__(
        self,
        *,
        tokens_per_second: float = DEFAULT_TOKENS_PER_SECOND,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        self.tokens_per_second = tokens_per_second
        self.max_tokens = max_tokens

    def validate(self, request: GenerationRequest) -> None:
        """Raise ``ValueError`` for params the simulated model does not take."""
        self._params(request.params)

    def can_continue(self, request: GenerationRequest) -> bool:
        """Every answer can be continued from a prefix, but a stamped one (its tokens are
        the times they were made)."""
        return not request.params.get("stamp", False)

    def _params(self, params: dict[str, Any]) -> _Params:
        known = {"tokens_per_second", "max_tokens", "echo", "fail_after", "stamp", "seed"}
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"unknown simulated params: {', '.join(sorted(unknown))}")
        rate = params.get("tokens_per_second", self.tokens_per_second)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1e6:
            raise ValueError("params.tokens_per_second must be a number from 0 to 1000000")
        count = params.get("max_tokens", self.max_tokens)
        if (
            isinstance(count, bool)
            or not isinstance(count, int)
            or not 0 <= count <= (MAX_TOKENS_LIMIT)
        ):
            raise ValueError(f"params.max_tokens must be an integer from 0 to {MAX_TOKENS_LIMIT}")
        echo = params.get("echo", False)
        stamp = params.get("stamp", False)
        if not isinstance(echo, bool) or not isinstance(stamp, bool):
            raise ValueError("params.echo and params.stamp must be booleans")
        fail_after = params.get("fail_after")
        if fail_after is not None and (
            isinstance(fail_after, bool) or not isinstance(fail_after, int) or fail_after < 0
        ):
            raise ValueError("params.fail_after must be a non-negative integer")
        seed = params.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError("params.seed must be an integer")
        return _Params(float(rate), count, echo, fail_after, stamp, seed)

    def answer(self, request: GenerationRequest) -> str:
        """The whole answer to ``request``, at once (``ValueError`` for a stamped one)."""
        params = self._params(request.params)
        if params.stamp:
            raise ValueError("a stamped answer is made of the times its tokens were made")
        return "".join(self._tokens(request, params))

    def _tokens(self, request: GenerationRequest, params: _Params) -> list[str]:
        """The whole answer, token by token (not for ``stamp``, whose tokens are times)."""
        prompt = request.prompt
        words = prompt.split() if params.echo else []
        key = prompt if params.seed is None else f"{params.seed}\0{prompt}"
        seed = zlib.crc32(key.encode())
        return [
            words[i] + " "
            if i < len(words)
            else VOCABULARY[(seed + i * 11) % len(VOCABULARY)] + " "
            for i in range(params.count)
        ]

    async def stream(
        self, request: GenerationRequest, *, run: GenerationRun
    ) -> AsyncGenerator[ProviderChunk, None]:
        """The deterministic answer, paced at ``tokens_per_second``; when ``run.partial`` is
        set, only what follows that prefix of it."""
        params = self._params(request.params)
        tokens = [] if params.stamp else self._tokens(request, params)
        first, head = 0, ""
        if run.partial:
            if params.stamp:
                raise ProviderError("a stamped answer cannot be continued", kind="cannot_continue")
            first, head = continue_after(tokens, run.partial)
        start = now = anyio.current_time()
        for i in range(first, params.count):
            if params.rate > 0:
                due = start + (i - first) / params.rate
                if due > now:  # (the clock is read again only after sleeping)
                    await anyio.sleep(due - now)
                    now = anyio.current_time()
            elif i % 256 == 0:
                await anyio.lowlevel.checkpoint()
            if params.fail_after is not None and i >= params.fail_after:
                raise ProviderError(f"simulated failure after {i} tokens", kind="simulated_failure")
            token = f"{time.time_ns()} " if params.stamp else tokens[i]
            if i == first and head:
                token = head  # the rest of the token the prefix ended inside
            yield ProviderChunk(token)
        if params.fail_after == params.count:
            raise ProviderError(
                f"simulated failure after {params.count} tokens", kind="simulated_failure"
            )
        input_tokens = sum(len(m.content.split()) for m in request.messages)
        yield ProviderChunk(usage={"input_tokens": input_tokens, "output_tokens": params.count})

    async def aclose(self) -> None:
        """Nothing to release."""
        return None


def continue_after(tokens: list[str], partial: str) -> tuple[int, str]:
    """Where the answer ``tokens`` goes on after its prefix ``partial``: the index of the
    next token to send, and what is left of it when ``partial`` ends inside it ("" when
    it ends on a boundary). ``ProviderError`` if ``partial`` is not a prefix of the answer.
    """
    position = 0
    for index, token in enumerate(tokens):
        rest = partial[position:]
        if not rest:
            return index, ""
        if rest.startswith(token):
            position += len(token)
            continue
        if token.startswith(rest):
            return index, token[len(rest) :]
        break
    if position == len(partial):
        return len(tokens), ""
    raise ProviderError(
        "the partial answer is not a prefix of this model's answer", kind="cannot_continue"
    )
