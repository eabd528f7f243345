"""The simulated model: deterministic text at a set token rate, offline.

It is the default provider, and the model used by the demo, the tests and the benchmarks.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncGenerator
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


class SimulatedProvider:
    """Deterministic text: the same prompt and params always give the same words.

    Params (all optional): ``tokens_per_second`` (0 = as fast as possible),
    ``max_tokens`` (how many tokens), ``echo`` (start by repeating the prompt),
    ``fail_after`` (raise a provider error after that many tokens), ``stamp`` (each token is
    its creation time in nanoseconds, for latency benchmarks).
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
        self._settings(request.params)

    def _settings(self, params: dict[str, Any]) -> tuple[float, int, bool, int | None, bool]:
        known = {"tokens_per_second", "max_tokens", "echo", "fail_after", "stamp"}
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
        return float(rate), count, echo, fail_after, stamp

    async def stream(
        self, request: GenerationRequest, *, run: GenerationRun
    ) -> AsyncGenerator[ProviderChunk, None]:
        """The deterministic answer, paced at ``tokens_per_second``."""
        rate, count, echo, fail_after, stamp = self._settings(request.params)
        prompt = request.prompt
        words = prompt.split() if echo else []
        seed = zlib.crc32(prompt.encode())
        start = anyio.current_time()
        for i in range(count):
            if rate > 0:
                delay = start + i / rate - anyio.current_time()
                if delay > 0:
                    await anyio.sleep(delay)
            elif i % 256 == 0:
                await anyio.lowlevel.checkpoint()
            if fail_after is not None and i >= fail_after:
                raise ProviderError(f"simulated failure after {i} tokens", kind="simulated_failure")
            if stamp:
                token = f"{time.time_ns()} "
            elif i < len(words):
                token = words[i] + " "
            else:
                token = VOCABULARY[(seed + i * 11) % len(VOCABULARY)] + " "
            yield ProviderChunk(token)
        if fail_after == count:
            raise ProviderError(f"simulated failure after {count} tokens", kind="simulated_failure")
        input_tokens = sum(len(m.content.split()) for m in request.messages)
        yield ProviderChunk(usage={"input_tokens": input_tokens, "output_tokens": count})

    async def aclose(self) -> None:
        """Nothing to release."""
        return None
