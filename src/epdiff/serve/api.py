"""The OpenAI image API's request and response, mapped onto the engine's SamplingParams.

Every value a request carries is checked by `SamplingParams.resolve` (the one place the CLI, the
Python API and the server share); this module only parses what is the API's own (the body, the
"WxH" size, response_format, output_format, stream) and renames the engine's fields to the API's in
the error it returns. A streamed request's answer is OpenAI's server-sent events (`server_sent_event`
and the event builders below).
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import time
from dataclasses import dataclass

from ..config import is_int
from ..engine import RequestError, RequestOutput, SamplingParams
from ..engine.files import IMAGE_FORMATS, write_image
from ..sampling.step_cache import StepCacheConfig
from .config import ServerConfig

# OpenAI's names; "jpg" too, since the CLI takes .jpg.
OUTPUT_FORMATS = {ext.lstrip("."): fmt for ext, fmt in IMAGE_FORMATS.items()}
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
ENGINE_FIELDS = ("prompt", "n", "size", "num_inference_steps", "guidance_scale", "seed", "cache", "solver",
                 "system_prompt", "task", "max_new_tokens", "temperature", "top_k", "top_p", "cot_text",
                 "partial_images")
API_FIELDS = ENGINE_FIELDS + ("response_format", "output_format", "stream")
# Checked against --max-prompt-chars before anything is tokenized.
TEXT_FIELDS = ("prompt", "system_prompt", "cot_text")
# Sent by OpenAI clients; accepted and ignored (this server serves one model, with no notion of
# DALL-E's quality or style presets, nor moderation).
IGNORED_FIELDS = ("model", "user", "quality", "style", "moderation")
# A seed left out is drawn from this range, so that seed + n - 1 stays far inside the engine's.
RANDOM_SEED_RANGE = 2**31


class ApiError(Exception):
    """An HTTP error with the OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


@dataclass(frozen=True)
class GenerationRequest:
    params: SamplingParams  # resolved by the engine's rules
    output_format: str  # PIL's name: PNG, JPEG or WEBP
    size: str | None  # as the client wrote it (for error messages)
    stream: bool = False  # answered as server-sent events


def parse_size(size) -> tuple[int | None, int | None]:
    """'WxH' -> (height, width); None or 'auto' -> (None, None): the model's choice where it writes
    before drawing (SamplingParams.resolve), else its default size."""
    if size is None or size == "auto":
        return None, None
    match = re.fullmatch(r"\s*([0-9]{1,6})\s*[xX×]\s*([0-9]{1,6})\s*", size) if isinstance(size, str) else None
    if match is None:
        raise bad_request("size", f"size must be 'WIDTHxHEIGHT' (e.g. '1024x1024') or 'auto', got {size!r}")
    width, height = int(match.group(1)), int(match.group(2))
    return height, width


# OpenAI's edit form: the files (`image`, or `image[]` for several) and text fields; these are numbers.
EDIT_IMAGE_FIELDS = ("image", "image[]")
EDIT_INTEGER_FIELDS = ("n", "num_inference_steps", "seed", "max_new_tokens", "top_k", "partial_images")
EDIT_NUMBER_FIELDS = ("guidance_scale", "temperature", "top_p")
EDIT_BOOLEAN_FIELDS = ("stream",)


def parse_edit(form: list[tuple[str, object]], engine_config, limits: ServerConfig) -> GenerationRequest:
    """An edit's multipart form (key, value) -> a resolved request: the files under `image` or
    `image[]` are the input images (bytes), every other field is read as the JSON body's."""
    images, body = [], {}
    for key, value in form:
        if key == "mask":
            raise bad_request("mask", "mask is not supported: epdiff edits whole images (describe the change in "
                                      "the prompt)")
        if key in EDIT_IMAGE_FIELDS:
            if isinstance(value, str):
                raise bad_request(key, f"{key} must be an uploaded file, got the text {value[:40]!r}")
            images.append(value)
            continue
        if not isinstance(value, str):
            raise bad_request(key, f"{key} must be a text field, got a file")
        if key in body:
            raise bad_request(key, f"{key} is given twice")
        body[key] = value
    if not images:
        raise bad_request("image", "an edit needs at least one image (the form field image or image[])",
                          code="missing_required_parameter")
    for key in EDIT_INTEGER_FIELDS + EDIT_NUMBER_FIELDS:
        if key in body:
            try:
                body[key] = int(body[key]) if key in EDIT_INTEGER_FIELDS else float(body[key])
            except ValueError:
                kind = "an integer" if key in EDIT_INTEGER_FIELDS else "a number"
                raise bad_request(key, f"{key} must be {kind}, got {body[key]!r}") from None
    for key in EDIT_BOOLEAN_FIELDS:  # a form's text: OpenAI's clients send "true" and "false"
        if key in body:
            body[key] = {"true": True, "false": False}.get(body[key].strip().lower(), body[key])
    if isinstance(body.get("cache"), str) and body["cache"].lstrip().startswith("{"):
        try:
            body["cache"] = json.loads(body["cache"])
        except (ValueError, RecursionError) as e:  # (JSONDecodeError is a ValueError; so is an over-long integer)
            raise bad_request("cache", f"cache is not a kind or a JSON object: {str(e)[:120]}") from None
    return parse_generation(body, engine_config, limits, images)


def parse_generation(body, engine_config, limits: ServerConfig, images=None) -> GenerationRequest:
    """The request body -> a resolved request; ApiError (400) names the field and the value, or
    the server's limit and its flag. Tokenizes the prompt: run it off the event loop. images: an
    edit's input images (their files' bytes)."""
    if not isinstance(body, dict):
        raise bad_request(None, f"the request body must be a JSON object, got {type(body).__name__}")
    body = {key: value for key, value in body.items() if value is not None}  # clients send unset fields as null
    unknown = sorted(set(body) - set(API_FIELDS) - set(IGNORED_FIELDS))
    if unknown:
        raise bad_request(unknown[0], f"unknown field {unknown[0]!r}; the fields are {', '.join(API_FIELDS)}",
                          code="unknown_parameter")
    if "prompt" not in body:
        raise bad_request("prompt", "prompt is required", code="missing_required_parameter")
    response_format = body.get("response_format", "b64_json")
    if response_format != "b64_json":
        raise bad_request("response_format", f"response_format {response_format!r} is not supported: this server "
                                             f"returns the images in the response; use 'b64_json'")
    output_format = body.get("output_format", "png")
    if not isinstance(output_format, str) or output_format not in OUTPUT_FORMATS:
        raise bad_request("output_format", f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, "
                                           f"got {repr(output_format)[:80]}")
    n = body.get("n", 1)
    if is_int(n) and n > limits.max_images:
        raise bad_request("n", f"n must be at most {limits.max_images} on this server (--max-images), got {n}")
    steps = body.get("num_inference_steps")
    if is_int(steps) and steps > limits.max_inference_steps:
        raise bad_request("num_inference_steps", f"num_inference_steps must be at most {limits.max_inference_steps} "
                                                 f"on this server (--max-inference-steps), got {steps}")
    tokens = body.get("max_new_tokens")
    if is_int(tokens) and tokens > limits.max_text_tokens:
        raise bad_request("max_new_tokens", f"max_new_tokens must be at most {limits.max_text_tokens} on this server "
                                            f"(--max-text-tokens), got {tokens}")
    for key in TEXT_FIELDS:
        text = body.get(key)
        if isinstance(text, str) and len(text) > limits.max_prompt_chars:
            raise bad_request(key, f"{key} is {len(text)} characters, over this server's limit of "
                                   f"{limits.max_prompt_chars} (--max-prompt-chars)")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream", f"stream must be true or false, got {stream!r}")
    partial_images = body.get("partial_images", 0)
    if is_int(partial_images) and partial_images > 0 and not stream:
        raise bad_request("partial_images", f"partial_images {partial_images} needs stream: true (the previews are "
                                            "sent as events of the stream)")
    size = body.get("size")
    height, width = parse_size(size)
    seed = body.get("seed")
    params = SamplingParams(
        prompt=body["prompt"], height=height, width=width, num_inference_steps=body.get("num_inference_steps"),
        guidance_scale=body.get("guidance_scale"), n=n,
        seed=secrets.randbelow(RANDOM_SEED_RANGE) if seed is None else seed, cache=parse_cache(body.get("cache")),
        solver=body.get("solver"), system_prompt=body.get("system_prompt"), images=images, task=body.get("task"),
        max_new_tokens=tokens, temperature=body.get("temperature"), top_k=body.get("top_k"),
        top_p=body.get("top_p"), cot_text=body.get("cot_text"), partial_images=partial_images)
    try:
        params = params.resolve(engine_config)
    except RequestError as e:
        raise request_error(e, size) from None
    return GenerationRequest(params, OUTPUT_FORMATS[output_format], size, stream)


CACHE_FIELDS = ("kind", "interval", "order", "threshold")


def parse_cache(cache) -> StepCacheConfig | str | None:
    """'none', 'taylor', 'fbcache' or {"kind": "fbcache", "threshold": 0.1, ...}; None: the server's default.
    The values are checked by SamplingParams.resolve."""
    if cache is None or isinstance(cache, str):
        return cache
    if not isinstance(cache, dict):
        raise bad_request("cache", f"cache must be a kind ('none', 'taylor') or an object with {', '.join(CACHE_FIELDS)}"
                                   f", got {cache!r}")
    unknown = sorted(set(cache) - set(CACHE_FIELDS))
    if unknown:
        raise bad_request("cache", f"cache: unknown field {unknown[0]!r}; the fields are {', '.join(CACHE_FIELDS)}")
    return StepCacheConfig(**{"kind": "taylor", **cache})


def request_error(error: RequestError, size) -> ApiError:
    """The engine's error under the API's field name: height and width are the API's size."""
    message = str(error)
    if error.field == "size":
        message = f"size {size!r} (width x height): {message}"
    elif error.field == "n":
        message = f"n: {message}"
    return bad_request(error.field, message)


class Base64Text(str):
    """Text known to be base64 (no character JSON escapes): json_text writes it as it is."""


def encode_image(pixels, output_format: str, metadata: dict | None = None) -> Base64Text:
    """An image's file in output_format, as base64 text. Tens of milliseconds at 1024²: run it on a
    thread, never on the event loop."""
    buffer = io.BytesIO()
    write_image(buffer, output_format, pixels, metadata or {})
    return Base64Text(base64.b64encode(buffer.getvalue()), "ascii")


def encode_images(output: RequestOutput, output_format: str) -> list[dict]:
    """One OpenAI data item per image: its bytes in base64, its own seed, and the text the model
    wrote before drawing as OpenAI's revised_prompt (where it wrote one)."""
    revised = {} if output.cot_text is None else {"revised_prompt": output.cot_text}
    return [{"b64_json": encode_image(image.pixels, output_format, image.metadata), "seed": image.seed,
             "full_steps": image.full_steps, **revised} for image in output.images]


def json_text(obj: dict) -> str:
    """obj as compact JSON (as JSONResponse writes it, keys reordered), its `b64_json` and that of
    each `data` item put in whole where it is Base64Text (encode_image's): base64 needs no
    escaping, and json.dumps would scan a 1024² PNG's ~4 MB of it on the event loop (47 ms on the
    GPU machine's CPU: BENCHMARKS §23). Any other text is escaped as usual."""
    def dumps(value) -> str:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    items = obj.get("data")
    nested = isinstance(items, list) and all(isinstance(item, dict) for item in items)
    parts = ['"b64_json":"' + obj["b64_json"] + '"'] if isinstance(obj.get("b64_json"), Base64Text) else []
    rest = {key: value for key, value in obj.items() if not (key == "b64_json" and parts or key == "data" and nested)}
    if rest:
        parts.append(dumps(rest)[1:-1])
    if nested:
        parts.append('"data":[' + ",".join(json_text(item) for item in items) + "]")
    return "{" + ",".join(parts) + "}"


def render_answer(answer: dict) -> bytes:
    return json_text(answer).encode()


def generation_response(output: RequestOutput, data: list[dict], output_format: str,
                        requested_size: str | None, image_tokens: int) -> dict:
    """The OpenAI answer plus epdiff's own fields; `requested_size` when the size made differs;
    image_tokens: one image's (its usage)."""
    params = output.params
    peak = output.peak_memory_bytes
    made = f"{params.width}x{params.height}"
    extra = {} if requested_size in (None, "auto", made) else {"requested_size": requested_size}
    return {
        "created": int(time.time()),
        "data": data,
        "size": made,
        **extra,
        "output_format": output_format.lower(),
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "cache": params.cache.describe(),
        "solver": params.solver,
        "inference_time_s": round(output.inference_seconds, 4),
        "queue_time_s": round(output.queue_seconds, 4),
        "peak_memory_mb": None if peak is None else round(peak / 2**20, 1),
        "cot_text": output.cot_text,
        "usage": usage(output, image_tokens),
    }


def usage(output: RequestOutput, image_tokens: int) -> dict:
    """OpenAI's usage of an image request, in the model's tokens: in, the prompt and the input
    images' sections; out, every image's tokens and the text written before drawing."""
    made = len(output.images) * image_tokens + output.written_tokens
    given = output.prompt_tokens + output.input_image_tokens
    return {"input_tokens": given, "input_tokens_details": {"text_tokens": output.prompt_tokens,
                                                            "image_tokens": output.input_image_tokens},
            "output_tokens": made, "total_tokens": given + made}


# -- streaming: OpenAI's image stream events (openai-python's ImageGenStreamEvent, ImageEditStreamEvent)
# plus epdiff's: image_index (which of the n images), cot_text, and `<prefix>.text_delta` {type, delta}
# for the text the model writes before drawing (as vLLM-Omni streams its AR stage's text).

STREAM_PREFIXES = {False: "image_generation", True: "image_edit"}
# The settings OpenAI's events echo; epdiff has neither notion (its images are opaque RGB).
STREAM_SETTINGS = {"quality": "auto", "background": "opaque"}


def server_sent_event(data: dict) -> bytes:
    """One SSE message; its `event:` is the data's type (compact JSON has no newline)."""
    return f"event: {data['type']}\ndata: {json_text(data)}\n\n".encode()


def text_delta_event(edit: bool, text: str) -> dict:
    return {"type": f"{STREAM_PREFIXES[edit]}.text_delta", "delta": text}


def partial_image_event(edit: bool, b64_json: str, height: int, width: int, output_format: str,
                        image_index: int, partial_index: int) -> dict:
    return {"type": f"{STREAM_PREFIXES[edit]}.partial_image", "b64_json": b64_json, "created_at": int(time.time()),
            "size": f"{width}x{height}", **STREAM_SETTINGS, "output_format": output_format.lower(),
            "partial_image_index": partial_index, "image_index": image_index}


def completed_events(edit: bool, response: dict) -> list[dict]:
    """One `completed` event per image of a finished request's response (generation_response):
    OpenAI's fields, the image's data item and the response's own (steps, times, cot_text, the
    request's usage)."""
    shared = {key: value for key, value in response.items() if key not in ("created", "data")}
    events = []
    for index, item in enumerate(response["data"]):
        item = {key: value for key, value in item.items() if key != "revised_prompt"}  # cot_text says it
        events.append({"type": f"{STREAM_PREFIXES[edit]}.completed", "created_at": response["created"],
                       **STREAM_SETTINGS, **shared, **item, "image_index": index})
    return events


def error_event(error: ApiError) -> dict:
    """An error once the stream has started (its HTTP status is sent): OpenAI's error body with a
    type, which OpenAI's clients raise as an APIError."""
    return {"type": "error", **error.body()}
