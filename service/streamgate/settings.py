"""The one place configuration is read: environment variables and the env file.

Every field is `STREAMGATE_<NAME>` in the environment and in the env file that Ansible templates
(`STREAMGATE_ENV_FILE`, e.g. /etc/streamgate/streamgate.env). The standard `OPENAI_API_KEY` and
`OPENAI_BASE_URL` are honoured when the `STREAMGATE_UPSTREAM_*` ones are unset, as the openai SDK
does. gunicorn_conf.py reads the same class, so the env file is the single source for both.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .auth import parse_key_hashes

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
ENV_FILE_VARIABLE = "STREAMGATE_ENV_FILE"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMGATE_",
        extra="ignore",  # the env file also holds the simulator's STREAMGATE_SIM_* settings
        env_file_encoding="utf-8",
        # A rejected value is never echoed into the error (and so the journal): it may be a key.
        hide_input_in_errors=True,
        # Each field's docstring is its description: the README's settings table and the app
        # role's defaults, argument specs, env template and README are written from it
        # (tools/settings_docs.py).
        use_attribute_docstrings=True,
    )

    upstream_base_url: str | None = None
    """The LLM server: its OpenAI-compatible base URL (`…/v1`: OpenAI, vLLM, Ollama, llama.cpp,
    the simulator). Unset: `OPENAI_BASE_URL`, else `https://api.openai.com/v1`."""
    upstream_api_key: SecretStr | None = None
    """The LLM server's API key (a secret, never logged). Unset: `OPENAI_API_KEY`."""
    default_model: str = "gpt-4o-mini"
    """Model used when a request names none; must be one of `STREAMGATE_ALLOWED_MODELS` when
    that is set."""

    connect_timeout_s: float = Field(5.0, gt=0)
    """Seconds to connect to the upstream."""
    first_token_timeout_s: float = Field(60.0, gt=0)
    """Seconds from the request sent upstream to its first token (then 504)."""
    token_gap_timeout_s: float = Field(30.0, gt=0)
    """Longest silence between two tokens, in seconds (then an in-band error)."""
    total_timeout_s: float = Field(600.0, gt=0)
    """Longest whole request, in seconds, sends to a slow client included."""
    upstream_retries: int = Field(1, ge=0, le=5)
    """Retries of an upstream request (0 to 5), only before its first byte."""
    upstream_transport: Literal["auto", "lean", "sdk", "aiohttp"] = "auto"
    """Upstream HTTP client. `lean`: the kit's own HTTP/1.1 transport (about a third of `sdk`'s
    gateway CPU per chunk and half of `aiohttp`'s at 500 streams, see the README's Benchmark), no
    proxies; `sdk`: the openai SDK's own client, which follows `HTTP(S)_PROXY`, `ALL_PROXY` and
    `NO_PROXY`; `aiohttp`: the SDK's aiohttp client (the `aiohttp` extra, there to be measured);
    `auto`: `sdk` only when a proxy applies to the upstream URL. Logged at worker start."""
    upstream_include_usage: bool = True
    """Ask the upstream for `stream_options.include_usage`; false for servers that reject it
    (usage is then null in the log and in `event: done`)."""

    # Client-side deadlines (worker.py, routes/chat.py).
    request_head_timeout_s: float = Field(15.0, gt=0)
    """Seconds for a client's request head to arrive, from the connection or the request's first
    byte (then 408, and the connection is closed)."""
    request_body_timeout_s: float = Field(15.0, gt=0)
    """Seconds for a request's body to arrive after its head (then 408)."""
    send_timeout_s: float = Field(30.0, gt=0)
    """Seconds a client may take no byte of its answer before it is cut and its upstream request
    released (logged `send_timeout`)."""

    client_key_hashes: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict, repr=False)
    """Client keys as `name:sha256-hex` entries, comma-separated (hashes only, never keys); the
    chat routes then need `Authorization: Bearer <key>` (401 otherwise). Empty: no key is asked
    for. A malformed entry stops the start, naming the setting."""
    # The request policy (chat_request.py).
    allowed_models: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    """Models clients may name: `name` or `alias=upstream-model` entries, comma-separated; any
    other model is a 403. Must list `STREAMGATE_DEFAULT_MODEL`. Empty: any model."""
    max_tokens_limit: int | None = Field(None, gt=0)
    """Highest `max_tokens` or `max_completion_tokens` a request may ask for (400 above); sent
    upstream as `max_tokens` when a request names neither. Unset: no cap."""
    max_n: int | None = Field(None, gt=0)
    """Highest `n` a request may ask for (400 above). Unset: no cap (OpenAI's own 128)."""

    max_prompt_chars: int = Field(32_000, gt=0)
    """Longest prompt, in characters of text (413 above)."""
    word_flush_ms: int = Field(150, ge=0)
    """Word granularity: the longest a partial word is held before it is sent, in milliseconds."""
    heartbeat_s: float = Field(15.0, gt=0)
    """Seconds between SSE `: ping` comments while the first token is slow (keeps proxies from
    timing out)."""

    bind: str = "127.0.0.1:8000"
    """Address the gateway listens on: TCP `host:port` or `unix:/path`."""
    workers: int = Field(0, ge=0)
    """gunicorn workers; 0: one per CPU this process may use."""
    graceful_timeout_s: float = Field(630.0, gt=0)
    """Seconds a stopping or reloaded worker may drain its open streams before it is killed; at
    least `STREAMGATE_TOTAL_TIMEOUT_S` (the gateway refuses to start otherwise)."""
    keepalive_s: int = Field(75, gt=0)
    """Seconds an idle client connection is kept open; longer than nginx's upstream keep-alive
    (60 s), else sporadic 502s."""
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    """Level of the gateway's and gunicorn's logs: `debug`, `info`, `warning`, `error` or
    `critical`."""

    # The openai SDK's own variables, used only when the STREAMGATE_ ones are unset.
    openai_base_url: str | None = Field(None, validation_alias="OPENAI_BASE_URL", exclude=True)
    openai_api_key: SecretStr | None = Field(
        None, validation_alias="OPENAI_API_KEY", exclude=True, repr=False
    )

    @field_validator("client_key_hashes", mode="before")
    @classmethod
    def _parse_key_hashes(cls, value: Any) -> Any:
        return parse_key_hashes(value) if isinstance(value, str) else value

    @field_validator("allowed_models", mode="before")
    @classmethod
    def _parse_allowed_models(cls, value: Any) -> Any:
        return parse_model_map(value) if isinstance(value, str) else value

    @field_validator("max_tokens_limit", "max_n", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _resolve_upstream(self) -> Settings:
        if not self.upstream_base_url:
            self.upstream_base_url = self.openai_base_url or OPENAI_DEFAULT_BASE_URL
        self.upstream_base_url = self.upstream_base_url.rstrip("/")
        if self.upstream_api_key is None or not self.upstream_api_key.get_secret_value():
            self.upstream_api_key = self.openai_api_key
        if self.graceful_timeout_s < self.total_timeout_s:
            raise ValueError(
                "graceful_timeout_s must cover the longest stream (>= total_timeout_s): "
                f"{self.graceful_timeout_s} < {self.total_timeout_s}"
            )
        if self.allowed_models and self.default_model not in self.allowed_models:
            raise ValueError(
                f"STREAMGATE_DEFAULT_MODEL {self.default_model!r} must be one of the names in "
                "STREAMGATE_ALLOWED_MODELS (requests that name no model get it)"
            )
        return self

    @property
    def upstream_configured(self) -> bool:
        """OpenAI itself needs a key; any other base URL (vLLM, Ollama, simulator) may not."""
        key = self.upstream_api_key
        has_key = key is not None and bool(key.get_secret_value())
        return has_key or self.upstream_base_url != OPENAI_DEFAULT_BASE_URL

    def effective_workers(self, cpu_count: int | None = None) -> int:
        """0 means one worker per CPU: the work is CPU-bound relaying, not waiting."""
        if self.workers:
            return self.workers
        if cpu_count is None:
            # The CPUs this process may run on (cgroup/affinity aware), not the host's total.
            cpu_count = (
                len(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity")
                else (os.cpu_count() or 1)
            )
        return max(1, cpu_count)

    def public_dict(self) -> dict[str, object]:
        """What may be logged: everything except secrets."""
        shown = self.model_dump(exclude={"upstream_api_key", "client_key_hashes"})
        shown["upstream_api_key_set"] = self.upstream_api_key is not None
        shown["client_key_names"] = list(self.client_key_hashes)  # names only: no hash
        shown["upstream_base_url"] = url_without_secrets(self.upstream_base_url or "")
        return shown


def url_without_secrets(url: str) -> str:
    """The URL to log: no user:password@, no query string (tokens travel in both)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.split("?", 1)[0]
    authority, slash, path = rest.partition("/")
    host = authority.rpartition("@")[2]
    shown = f"{scheme}://{'***@' if '@' in authority else ''}{host}{slash}{path}"
    return shown.split("?", 1)[0] + ("?***" if "?" in path else "")


def parse_model_map(text: str) -> dict[str, str]:
    """STREAMGATE_ALLOWED_MODELS: `name` or `alias=upstream-model`, comma-separated -> {name a
    client may send: model asked of the upstream}."""
    models: dict[str, str] = {}
    for number, entry in enumerate((e.strip() for e in text.split(",")), start=1):
        if not entry:
            continue
        alias, sep, upstream = (part.strip() for part in entry.partition("="))
        if not alias or (sep and not upstream) or alias in models:
            raise ValueError(
                f"STREAMGATE_ALLOWED_MODELS: entry {number} ({entry!r}) must be a "
                "model name or alias=upstream-model, each name once"
            )
        models[alias] = upstream if sep else alias
    return models


def load_settings() -> Settings:
    """Read the environment and the env file named by STREAMGATE_ENV_FILE (if any), uncached."""
    env_file = os.environ.get(ENV_FILE_VARIABLE) or None
    return Settings(_env_file=env_file)  # type: ignore[call-arg]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings for this process; tests call get_settings.cache_clear() or pass their own."""
    return load_settings()


def check_env_file(argv: list[str] | None = None) -> int:
    """`python -m streamgate.settings FILE`: 0 when FILE makes valid settings, else 1 and what is
    wrong on stderr (values are never shown). For Ansible's `validate:` before the env file is
    put in place: gunicorn's master exits when a reload meets settings it cannot load."""
    import sys

    from pydantic import ValidationError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m streamgate.settings ENV_FILE", file=sys.stderr)
        return 2
    try:
        Settings(_env_file=args[0])  # type: ignore[call-arg]
    except ValidationError as exc:
        print(f"{args[0]}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(check_env_file())
