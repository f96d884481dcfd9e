"""What a server is besides its engine: where it listens, what it lets a client ask, who may ask.
Each field is a flag of `epdiff serve` (cli.add_dataclass_args); the limits are refused with an
OpenAI error naming the limit and its flag before any work is spent on a request."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..config import ConfigError, is_int, option

API_KEY_ENV = "EPDIFF_API_KEY"


@dataclass(frozen=True)
class ServerConfig:
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "port to listen on")
    max_queue: int = option(64, "requests waiting for their first batch beyond this get 429")
    shutdown_timeout: float = option(30.0, "seconds SIGTERM leaves the requests in flight to finish before they "
                                           "are failed")
    max_inference_steps: int = option(200, "a request asking for more steps gets 400")
    max_images: int = option(10, "a request asking for more images (n) gets 400 (OpenAI's own limit is 10)")
    max_prompt_chars: int = option(10_000, "a longer prompt (or system_prompt, cot_text) gets 400, before it is "
                                           "tokenized")
    max_text_tokens: int = option(4096, "a request asking for a longer text pass (max_new_tokens, for a model that "
                                        "writes before it draws) gets 400")
    max_body_bytes: int = option(1 << 20, "a larger request body gets 413")
    max_upload_bytes: int = option(32 << 20, "a larger image edit (its multipart form, images included) gets 413")
    body_timeout: float = option(30.0, "seconds a client has to send its whole request body; then 408 (0: no "
                                       "limit; a client slow with its headers is a reverse proxy's to cut off)")
    max_connections: int = option(1024, "connections and requests at once beyond this get 503, so that idle or "
                                        "slow clients cannot take every file descriptor (uvicorn's limit_concurrency)")
    request_timeout: float = option(600.0, "seconds a request may take, queue included; then it gets 504 and, once "
                                           "no request wants it, its batch stops at the next step (0: no limit)")
    api_key: str | None = option(None, f"require 'Authorization: Bearer KEY' on every route but /health, /ready "
                                       f"and the page (default: ${API_KEY_ENV}, if set)")
    allowed_origins: str | None = option(None, "comma-separated origins whose web pages may call the API (CORS); "
                                               "default: none, browsers only from the server's own page")

    def resolve(self) -> "ServerConfig":
        """Checks every limit; the API key from the environment where none is given."""
        for name in ("max_queue", "max_inference_steps", "max_images", "max_prompt_chars", "max_text_tokens",
                     "max_body_bytes", "max_upload_bytes", "max_connections"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value!r}")
        for name in ("shutdown_timeout", "request_timeout", "body_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV) or None
        if key is not None and not key.strip():
            raise ConfigError("--api-key is empty")
        return dataclasses.replace(self, api_key=key)

    @property
    def origins(self) -> list[str]:
        return [o.strip() for o in (self.allowed_origins or "").split(",") if o.strip()]
