"""`infllava serve`'s requests: the chat-completions body as Pydantic models (FastAPI
validates them), its errors in the OpenAI shape, and the `ChatRequest` the model is asked.

Validation happens in two steps. FastAPI checks each field against `ChatCompletionRequest`
(types, ranges, the parts of a message); `chat_request` then checks what spans messages
(roles in order, one image) and decodes the image. Both report an OpenAI-style error,
`{"error": {"message", "type", "param", "code"}}`, whose `param` names the field as the
request spells it (`messages[0].content[1].image_url.url`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import secrets
from typing import Annotated, Any, Callable, Literal, Sequence

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field,
                      StrictBool, StrictFloat, StrictInt, StrictStr, model_validator)

from infllava_jax.data import images

MAX_STOPS = 4


class RequestError(ValueError):
  """A request the server refuses; becomes an OpenAI-style error body with `status`."""

  def __init__(self, message: str, param: str | None = None, code: str | None = None,
               status: int = 400, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.message, self.param, self.code, self.status, self.kind = (message, param, code,
                                                                   status, kind)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- the request body (field checks; their messages continue the field's name) ----

def _in_range(low: float, high: float, integer: bool = False) -> Callable[[Any], Any]:
  def check(value):
    if not low <= value <= high:
      raise ValueError(f"must be {'an integer' if integer else 'a number'} in [{low}, "
                       f"{high}], got {value!r}")
    return value
  return AfterValidator(check)


def _one(value: int | None) -> int | None:
  if value is not None and value != 1:
    raise ValueError(f"must be 1 (one choice per request), got {value}")
  return value


def _unsupported(absent: str, why: str) -> Callable[[Any], Any]:
  def check(value):
    if value:
      raise ValueError(f"must be {absent} or absent: {why}")
    return value
  return AfterValidator(check)


def _non_empty(value: list) -> list:
  if not value:
    raise ValueError("must be a non-empty list")
  return value


def _as_list(value: Any) -> Any:
  """A lone string stands for a list of one (`stop`)."""
  return [value] if isinstance(value, str) else value


def _as_parts(value: Any) -> Any:
  """A message's content: a string is one text part."""
  if isinstance(value, str):
    return [{"type": "text", "text": value}]
  if not isinstance(value, list):
    raise ValueError(f"must be a string or a list of content parts, got {type(value).__name__}")
  return value


def _as_url(value: Any) -> Any:
  """`image_url` as an object `{"url": ...}`; a bare URL string is accepted too."""
  return {"url": value} if isinstance(value, str) else value


def _stops(value: list[str]) -> list[str]:
  if len(value) > MAX_STOPS or not all(value):
    raise ValueError(f"must be a non-empty string or a list of up to {MAX_STOPS}, got "
                     f"{value!r}")
  return value


class _Lenient(BaseModel):
  """Fields beyond those declared are accepted and ignored (`model`, `user`, penalties...)."""
  model_config = ConfigDict(extra="allow")


class ImageURL(_Lenient):
  url: StrictStr


PART_SHAPES = "{'type': 'text', 'text': str} or {'type': 'image_url', 'image_url': {'url': ...}}"


class ContentPart(_Lenient):
  """One part of a message's content: text, or an image as a base64 data URL."""
  type: StrictStr
  text: StrictStr | None = None
  image_url: Annotated[ImageURL | None, BeforeValidator(_as_url)] = None

  @model_validator(mode="after")
  def _of_its_kind(self) -> "ContentPart":
    field = {"text": "text", "image_url": "image_url"}.get(self.type)
    if field is None or getattr(self, field) is None:
      raise ValueError(f"must be {PART_SHAPES}, got type {self.type!r}"
                       + (f" without {field!r}" if field else ""))
    return self


class Message(_Lenient):
  role: Literal["system", "developer", "user", "assistant"]
  content: Annotated[list[ContentPart], BeforeValidator(_as_parts)]


class StreamOptions(_Lenient):
  include_usage: StrictBool | None = None


class ChatCompletionRequest(_Lenient):
  """The `POST /v1/chat/completions` body this server reads (see `infllava_jax.serve`)."""
  messages: Annotated[list[Message], AfterValidator(_non_empty)] = Field(
      default_factory=list, validate_default=True)
  max_completion_tokens: Annotated[StrictInt, _in_range(1, 1 << 20, True)] | None = None
  max_tokens: Annotated[StrictInt, _in_range(1, 1 << 20, True)] | None = None
  temperature: Annotated[StrictFloat, _in_range(0.0, 2.0)] | None = None
  top_p: Annotated[StrictFloat, _in_range(0.0, 1.0)] | None = None
  top_k: Annotated[StrictInt, _in_range(0, 1 << 20, True)] | None = None  # an extension
  seed: Annotated[StrictInt, _in_range(-(1 << 63), (1 << 64) - 1, True)] | None = None
  stop: Annotated[list[StrictStr], BeforeValidator(_as_list), AfterValidator(_stops)] | None = None
  stream: StrictBool | None = None
  stream_options: StreamOptions | None = None
  n: Annotated[StrictInt | None, AfterValidator(_one)] = None
  logprobs: Annotated[StrictBool | None,
                      _unsupported("false", "log probabilities are not returned")] = None
  tools: Annotated[list | None, _unsupported("empty", "tools are not supported")] = None
  functions: Annotated[list | None, _unsupported("empty", "functions are not supported")] = None


def param_name(loc: Sequence[str | int]) -> str | None:
  """A pydantic error location -> the request's spelling: ('body', 'messages', 0, 'role')
  -> 'messages[0].role'; None for the body itself."""
  name = ""
  for part in loc[1:] if loc[:1] == ("body",) else loc:
    name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
  return name or None


def validation_error(errors: Sequence[dict]) -> RequestError:
  """FastAPI's validation errors of a request body -> one RequestError: the first error,
  its field as `param`, and how many more there were."""
  error = errors[0]
  param = param_name(error["loc"])
  if error["type"] == "json_invalid":
    message = (f"the request body is not valid JSON: {error['ctx']['error']} at character "
               f"{error['loc'][-1]}")
    param = None
  elif isinstance(error.get("input"), bytes):  # a body that FastAPI did not parse as JSON
    message = "the request body must be a JSON object sent as Content-Type: application/json"
  elif error["type"] == "value_error":  # ours: the message continues the field's name
    message = f"{param or 'the request body'} {error['ctx']['error']}"
  elif error["type"] == "missing":
    message = f"{param or 'the request body'} is required"
  else:
    message = (f"{param or 'the request body'}: {error['msg']}, got "
               f"{_short(error.get('input'))}")
  if len(errors) > 1:
    message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
  return RequestError(message, param)


def _short(value: Any, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


# ---- what the model is asked (checks across messages; the image decoded) ----

@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """A validated chat request: what the model is asked and how to sample."""
  question: str
  history: tuple[tuple[str, str], ...]
  image: Any  # a PIL image, or None for a text-only question
  max_tokens: int | None  # None: the server's default
  temperature: float
  top_p: float
  top_k: int
  seed: int
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool


def decode_data_url(url: str, param: str):
  """A `data:<mime>;base64,<data>` URL -> RGB PIL image; RequestError naming `param`."""
  if url.startswith(("http://", "https://")):
    raise RequestError(f"{param}: remote images are not fetched; send the image inline as a "
                       "base64 data URL (data:image/png;base64,...)", param, "invalid_image_url")
  head, comma, data = url.partition(",")
  if not (url.startswith("data:") and comma and head.endswith(";base64")):
    raise RequestError(f"{param} must be a base64 data URL (data:image/png;base64,...), got "
                       f"{url[:40]!r}", param, "invalid_image_url")
  try:
    raw = base64.b64decode("".join(data.split()), validate=True)
  except (binascii.Error, ValueError) as e:
    raise RequestError(f"{param}: malformed base64 ({e})", param, "invalid_image") from e
  try:
    return images.decode(raw)
  except images.ImageError as e:
    raise RequestError(f"{param}: {e}", param, "invalid_image") from e


def parse_messages(messages: Sequence[Message]
                   ) -> tuple[str, tuple[tuple[str, str], ...], Any]:
  """Validated messages -> (question, history [(question, answer)], image or None).

  System (and developer) text goes before the first user question; consecutive messages
  of one role are joined with a newline; the one image belongs to the first question.
  """
  system, turns, urls = [], [], []
  for i, message in enumerate(messages):
    texts = []
    for j, part in enumerate(message.content):
      param = f"messages[{i}].content[{j}]"
      if part.type == "text":
        texts.append(part.text)
      elif message.role != "user":
        raise RequestError(f"{param}: images are only accepted in user messages", param)
      else:
        urls.append((f"{param}.image_url.url", part.image_url.url))
    text = "\n".join(texts)
    if message.role in ("system", "developer"):
      system.append(text)
    elif turns and turns[-1][0] == message.role:
      turns[-1] = (message.role, turns[-1][1] + "\n" + text)
    else:
      turns.append((message.role, text))
  if not turns or turns[0][0] != "user":
    raise RequestError("the first non-system message must be the user's", "messages")
  if turns[-1][0] != "user":
    raise RequestError("the last message must be the user's (the model answers it)",
                       "messages")
  if len(urls) > 1:
    raise RequestError(f"this model takes one image per conversation, got {len(urls)}",
                       urls[1][0])
  image = decode_data_url(urls[0][1], urls[0][0]) if urls else None
  texts = [text for _, text in turns]
  if system:
    texts[0] = "\n".join(system) + "\n\n" + texts[0]
  history = tuple(zip(texts[:-1:2], texts[1::2]))
  return texts[-1], history, image


def chat_request(body: ChatCompletionRequest) -> ChatRequest:
  """A validated body -> ChatRequest, OpenAI's defaults filled in (RequestError for what
  cannot be served)."""
  question, history, image = parse_messages(body.messages)
  top_p = 1.0 if body.top_p is None else body.top_p
  top_k = body.top_k or 0
  if top_p == 0.0:  # only the most likely token: top_k 1 (a 0 nucleus would keep nothing)
    top_p, top_k = 1.0, 1
  options = body.stream_options or StreamOptions()
  return ChatRequest(
      question=question, history=history, image=image,
      max_tokens=(body.max_completion_tokens if body.max_completion_tokens is not None
                  else body.max_tokens),
      temperature=1.0 if body.temperature is None else body.temperature,
      top_p=top_p, top_k=top_k,
      seed=secrets.randbits(31) if body.seed is None else body.seed % (1 << 31),
      stop=tuple(body.stop or ()), stream=bool(body.stream),
      include_usage=bool(options.include_usage))
