"""Server settings: one table that drives the CLI flags, the environment and the README."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "KEEPSTREAM_"
MIN_SIGNING_KEY = 32


def _setting(default: Any, help: str, *, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Settings:
    """Everything ``keepstream serve`` can be told. Each field is flag ``--name-with-dashes``
    and environment variable ``KEEPSTREAM_NAME``; a flag wins over the environment."""

    host: str = _setting("127.0.0.1", "address to bind")
    port: int = _setting(8000, "port to bind (0 picks a free one)")
    db: str = _setting("./keepstream.db", "SQLite database file")
    store: str | None = _setting(
        None,
        "where the data lives: sqlite:///path (default: the --db file) or redis://host:port/db"
        " (any number of nodes on one Redis serve the same streams)",
    )
    redis_prefix: str = _setting("ks:", "Redis: prefix of every key keepstream writes")
    redis_connections: int = _setting(
        64, "Redis: connections to it at most (commands beyond wait for one)"
    )
    redis_allow_volatile: bool = _setting(
        False,
        "Redis: start even when it has no append-only file or may evict keys (a restart of"
        " Redis then loses answers clients have seen)",
    )
    provider: str = _setting(
        "simulated",
        "default provider: simulated, openai, dify, or one a provider factory adds",
    )
    provider_factory: str | None = _setting(
        None,
        "comma-separated package.module:callable factories of more providers (each takes the"
        " settings and returns {name: async generator function or Provider})",
    )
    upstream_url: str | None = _setting(
        None, "base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:11434/v1"
    )
    upstream_api_key: str | None = _setting(None, "API key for the upstream (prefer the env var)")
    model: str | None = _setting(None, "default model name for the openai provider")
    upstream_read_timeout: float = _setting(
        120.0, "seconds an upstream may stall between chunks (0 = no limit)"
    )
    upstream_idle_timeout: float = _setting(
        60.0,
        "seconds an upstream may make no progress (no text, no Dify workflow step), keep-alive"
        " comments or not, before an unfinished answer fails as stalled (0 = no limit)",
    )
    upstream_continuation: str | None = _setting(
        None,
        "JSON body fields with which the upstream continues a final assistant message, e.g."
        ' {"continue_final_message": true, "add_generation_prompt": false} for vLLM; set, '
        "answers cut by a fault or a crash are continued",
    )
    upstream_continuation_message: str | None = _setting(
        None,
        "JSON fields of the final assistant message with which the upstream continues it, e.g."
        ' {"prefix": true} for DeepSeek (beta URL) and Mistral; set, answers cut by a fault or'
        " a crash are continued",
    )
    upstream_retry_attempts: int = _setting(
        4, "calls to the upstream at most for one answer, while it has not started (1 = no retry)"
    )
    upstream_retry_deadline: float = _setting(
        30.0, "seconds the calls and backoffs before an answer starts may take in total"
    )
    dify_url: str | None = _setting(
        None,
        "API base URL of a Dify chat, agent or chatflow app, e.g. https://api.dify.ai/v1"
        " (the upstream timeouts and retries apply to it too)",
    )
    dify_api_key: str | None = _setting(None, "the Dify app's API key (prefer the env var)")
    sim_tokens_per_second: float = _setting(50.0, "simulated model: tokens per second")
    sim_max_tokens: int = _setting(200, "simulated model: tokens per answer")
    flush_interval: float = _setting(
        0.01, "group commit window in seconds, under load (an idle writer commits at once)"
    )
    coalesce_window: float = _setting(
        0.05, "a generation's deltas are written at most once per this many seconds"
    )
    synchronous: str = _setting(
        "NORMAL", "SQLite synchronous mode (FULL survives power loss)", choices=("NORMAL", "FULL")
    )
    max_running: int = _setting(256, "generations running at once")
    max_queued: int = _setting(1024, "generations waiting for a slot before 429")
    max_generations_per_user: int = _setting(
        256, "generations one API-key user may have running or queued (429 beyond)"
    )
    max_streams_per_user: int = _setting(
        32, "event streams (SSE responses) one API-key user may have open (429 beyond)"
    )
    max_stored_bytes_per_user: int = _setting(
        1 << 30, "bytes one API-key user may store: streams, sessions (413 beyond; 0 = no limit)"
    )
    max_pending_writes: int = _setting(
        10_000, "writes the SQLite writer may hold at once; more wait (then 503)"
    )
    write_wait: float = _setting(
        10.0, "seconds a write waits for room in a full writer queue before 503"
    )
    tail_cache_bytes: int = _setting(
        64 * 1_048_576, "bytes of recent stream messages kept in memory, for all streams"
    )
    shutdown_grace: float = _setting(10.0, "seconds running generations get to finish on stop")
    heartbeat_interval: float = _setting(
        2.0, "seconds between a server's heartbeats (and its sweeps for dead peers' work)"
    )
    lease_timeout: float = _setting(
        15.0,
        "seconds without a heartbeat after which a server counts as dead and its generations"
        " are taken over by a peer (on another host; on this one a gone pid counts at once)",
    )
    max_continuations: int = _setting(
        3,
        "times a generation whose process died is taken over and continued from its"
        " committed text, where its provider can (0 = never: it ends interrupted)",
    )
    generation_time_limit: float = _setting(
        3600.0,
        "seconds a generation may run before it ends failed, its text kept (a continued one:"
        " since it was created) (0 = no limit)",
    )
    max_body_bytes: int = _setting(1_048_576, "largest request body accepted (413 beyond)")
    max_json_depth: int = _setting(64, "deepest nesting of arrays and objects a JSON body may have")
    request_head_timeout: float = _setting(
        10.0, "seconds a request line and headers may take to arrive (0 = no limit)"
    )
    request_body_timeout: float = _setting(
        30.0, "seconds a request body may take to arrive after its head (0 = no limit)"
    )
    sse_ping: float = _setting(15.0, "seconds between SSE keep-alive comments")
    sse_send_timeout: float = _setting(
        30.0, "drop an SSE client that accepts nothing for this long"
    )
    sse_lifetime: float = _setting(
        0.0,
        "seconds before a generation's or session's event stream ends, so the client "
        "reconnects from its last event id (0 = never)",
    )
    sse_retry_ms: int = _setting(1000, "reconnect delay suggested to SSE clients (retry:)")
    long_poll_timeout: float = _setting(
        20.0, "Durable Streams: seconds a long-poll waits for data before 204"
    )
    stream_sse_lifetime: float = _setting(
        60.0, "Durable Streams: seconds before an SSE response ends (clients reconnect)"
    )
    max_append_bytes: int = _setting(
        16 * 1_048_576, "Durable Streams: largest PUT or POST body (413 beyond)"
    )
    max_sessions_per_user: int = _setting(10, "open (active or paused) sessions per user")
    max_session_messages: int = _setting(1000, "stored messages per session (oldest trimmed)")
    max_context_bytes: int = _setting(1_000_000, "largest session context, as JSON bytes")
    max_message_chars: int = _setting(100_000, "longest message a session accepts")
    history_chars: int = _setting(32_000, "history sent to the model with a new message")
    idle_timeout: float = _setting(1800.0, "close sessions idle this many seconds")
    retention: float = _setting(30 * 24 * 3600.0, "delete closed sessions after this many s")
    auto_clean: bool = _setting(False, "delete closed sessions once past --retention")
    session_sweep_interval: float = _setting(60.0, "seconds between idle/retention sweeps")
    api_keys: str | None = _setting(
        None, "comma-separated user=key pairs (prefer the env var or --api-keys-file)"
    )
    api_keys_file: str | None = _setting(None, "a file of user=key lines, one per API key")
    cors_origins: str | None = _setting(
        None,
        "comma-separated browser origins allowed to call the API (e.g. http://localhost:3000),"
        " or * for any; none by default (/v1/stream allows any)",
    )
    signed_url_ttl: float = _setting(300.0, "seconds a signed event URL can be opened for")
    url_signing_key: str | None = _setting(
        None, "secret that signs event URLs (prefer the env var); default: derived from the keys"
    )
    allow_remote: bool = _setting(
        False, "allow binding beyond loopback without API keys (anyone could use it)"
    )
    loop: str = _setting("auto", "uvicorn event loop", choices=("auto", "asyncio", "uvloop"))
    http: str = _setting("auto", "uvicorn HTTP parser", choices=("auto", "h11", "httptools"))
    log_level: str = _setting("warning", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = _setting(
        "json", "log lines as JSON objects or plain text", choices=("json", "text")
    )
    access_log: bool = _setting(False, "log every HTTP request")

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot work."""
        if self.provider == "openai" and not self.upstream_url:
            raise ValueError("--provider openai needs --upstream-url")
        if self.provider == "dify" and not self.dify_url:
            raise ValueError("--provider dify needs --dify-url")
        if self.dify_url and not self.dify_api_key:
            raise ValueError("--dify-url needs --dify-api-key (or KEEPSTREAM_DIFY_API_KEY)")
        for name in (
            "flush_interval",
            "shutdown_grace",
            "generation_time_limit",
            "write_wait",
            "sse_send_timeout",
            "sse_ping",
            "request_head_timeout",
            "request_body_timeout",
            "upstream_read_timeout",
            "upstream_idle_timeout",
            "idle_timeout",
            "retention",
            "long_poll_timeout",
            "stream_sse_lifetime",
            "sse_lifetime",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in (
            "max_running",
            "max_generations_per_user",
            "max_streams_per_user",
            "max_pending_writes",
            "max_body_bytes",
            "max_json_depth",
            "max_append_bytes",
            "max_sessions_per_user",
            "max_session_messages",
            "max_context_bytes",
            "max_message_chars",
            "history_chars",
            "session_sweep_interval",
            "upstream_retry_attempts",
            "redis_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.upstream_retry_deadline <= 0:
            raise ValueError("upstream_retry_deadline must be > 0")
        if self.signed_url_ttl <= 0:
            raise ValueError("signed_url_ttl must be > 0")
        if self.url_signing_key is not None and len(self.url_signing_key) < MIN_SIGNING_KEY:
            raise ValueError(f"url_signing_key must be at least {MIN_SIGNING_KEY} characters")
        for origin in self.allowed_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"cors_origins: {origin!r} is not an http(s) origin")
        self.continuation_fields  # noqa: B018 - raises for a value that is not a JSON object
        self.continuation_message_fields  # noqa: B018 - likewise
        if self.heartbeat_interval <= 0 or self.lease_timeout <= self.heartbeat_interval:
            raise ValueError("heartbeat_interval must be > 0 and lease_timeout longer than it")
        if self.max_continuations < 0:
            raise ValueError("max_continuations must be >= 0")
        if self.max_queued < 0:
            raise ValueError("max_queued must be >= 0")
        if self.max_stored_bytes_per_user < 0:
            raise ValueError("max_stored_bytes_per_user must be >= 0")
        if self.tail_cache_bytes < 0:
            raise ValueError("tail_cache_bytes must be >= 0")
        self.store_location  # noqa: B018 - raises for a --store that is neither
        has_keys = bool(self.api_keys or self.api_keys_file)
        loopback = self.host in ("127.0.0.1", "localhost", "::1")
        if not (loopback or has_keys or self.allow_remote):
            raise ValueError(
                f"refusing to bind {self.host} without API keys: configure --api-keys-file "
                "(or KEEPSTREAM_API_KEYS), bind to loopback, or pass --allow-remote"
            )

    @property
    def continuation_fields(self) -> dict[str, Any] | None:
        """``upstream_continuation`` parsed (``ValueError`` if it is not a JSON object)."""
        return _json_object("upstream_continuation", self.upstream_continuation)

    @property
    def continuation_message_fields(self) -> dict[str, Any] | None:
        """``upstream_continuation_message`` parsed (``ValueError`` if it is not a JSON
        object)."""
        return _json_object("upstream_continuation_message", self.upstream_continuation_message)

    @property
    def store_location(self) -> tuple[str, str]:
        """``("sqlite", path)`` or ``("redis", url)`` from ``store`` (``db`` when unset)."""
        if not self.store:
            return "sqlite", self.db
        if self.store.startswith("sqlite:///") and len(self.store) > len("sqlite:///"):
            return "sqlite", self.store.removeprefix("sqlite:///")
        if self.store.startswith(("redis://", "rediss://", "unix://")):
            return "redis", self.store
        raise ValueError(
            f"store must be sqlite:///path or redis://host:port/db, not {self.store!r}"
        )

    @property
    def factories(self) -> list[str]:
        """``provider_factory`` as a list of ``module:callable`` specs."""
        return [s.strip() for s in (self.provider_factory or "").split(",") if s.strip()]

    @property
    def allowed_origins(self) -> list[str]:
        """``cors_origins`` as a list (empty: no browser origin may call the API)."""
        if not self.cors_origins:
            return []
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    @classmethod
    def add_arguments(
        cls, parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None
    ) -> None:
        """A flag for every setting on ``parser``; its default comes from ``env`` (the
        ``KEEPSTREAM_*`` variables) when set there. Each help names the built-in default
        and the variable."""
        env = os.environ if env is None else env
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            variable = ENV_PREFIX + f.name.upper()
            kind = _kind(f)
            default = f.default
            env_value = env.get(variable)
            if env_value is not None:
                default = _parse_env(f.name, kind, env_value)
            shown = "none" if f.default is None else f.default
            help_text = f"{f.metadata['help']} (default: {shown}; env {variable})"
            if kind is bool:
                parser.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
                )
            else:
                parser.add_argument(
                    flag,
                    type=kind,
                    default=default,
                    help=help_text,
                    choices=f.metadata["choices"],
                )

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        """Settings from flags, falling back to ``KEEPSTREAM_*`` variables, then defaults."""
        parser = argparse.ArgumentParser(prog="keepstream serve", description="Run the server.")
        cls.add_arguments(parser, env)
        return cls.from_namespace(parser.parse_args(argv))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> Settings:
        """Settings from parsed flags (extra attributes, such as a subcommand, ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


def _kind(f: dataclasses.Field[Any]) -> type:
    annotation = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if annotation.startswith(name):
            return kind
    return str


def _parse_env(name: str, kind: type, value: str) -> Any:
    if kind is bool:
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise SystemExit(f"{ENV_PREFIX}{name.upper()}: expected a boolean, got {value!r}")
    try:
        return kind(value)
    except ValueError:
        raise SystemExit(
            f"{ENV_PREFIX}{name.upper()}: expected {kind.__name__}, got {value!r}"
        ) from None


def _json_object(name: str, value: str | None) -> dict[str, Any] | None:
    """A setting holding a JSON object, parsed; ``None`` when unset."""
    if not value:
        return None
    try:
        fields = json.loads(value)
    except ValueError:
        raise ValueError(f"{name} must be a JSON object") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{name} must be a JSON object")
    return fields
