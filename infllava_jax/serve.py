"""`infllava serve`: an OpenAI-compatible chat-completions endpoint for one checkpoint.

  infllava serve --checkpoint runs/synthetic                  # http://127.0.0.1:8000/v1
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{
    "messages": [{"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}},
      {"type": "text", "text": "What is in the picture?"}]}], "temperature": 0}'

Routes: `POST /v1/chat/completions` (plain or `"stream": true` server-sent events in the
OpenAI chunk format, ending with `data: [DONE]`) and `GET /v1/models`. The plain `openai`
client and lmms-eval's `openai` model work against it (give lmms-eval `num_concurrent=1`
and a generous `timeout`: requests queue here, see below).

How requests map onto the model:
  - Images come as base64 data URLs (`data:image/png;base64,...`, any format Pillow
    reads); http(s) URLs are refused (400): the server fetches nothing remote. One image
    per conversation, as in training; it belongs to the first user question, whichever
    user message carried it. Requests without an image ask a text-only question.
  - System (and developer) messages are folded in: their text goes before the first user
    question, after the image. The prompt keeps the model's own llama3 system prompt,
    which it was trained with.
  - Earlier user/assistant messages are the conversation history; consecutive messages of
    one role are joined with a newline; the last message must be the user's.
  - `max_completion_tokens` (or `max_tokens`; default `--max-tokens`), `temperature`
    (default 1.0, as OpenAI; 0 is greedy), `top_p`, `top_k` (an extension, 0 = off) and
    `seed` (default: a fresh one per request) set the sampling. `stop` (a string or up to
    4) cuts the answer before the first stop string to complete; the model still
    generates to its stop token or the token limit, so `usage.completion_tokens` counts
    every generated token. `n` must be 1; `logprobs` and tools are not supported;
    other fields (`model`, penalties, `user`...) are accepted and ignored.
  - Prompt + `max_tokens` must fit the model's positions (`llm.max_positions`).
Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`, with 4xx for
bad requests; the server keeps serving. A body must come with `Content-Type:
application/json` (FastAPI parses no other: a guard against cross-site requests to a
server on localhost).

Generation runs one request at a time: the model sits on one device, and the
`Assistant`'s lock serialises requests (the others wait their turn, so clients should
allow for queueing). At most `--max-pending` requests (default 16) generate or wait at a
time; one more gets a 503 with a `Retry-After` header, which the OpenAI client retries
after a pause. A streamed request whose client goes away still finishes its
generation before the next starts. Prompts are padded to a multiple of `--length-bucket`
tokens so that most requests reuse one compiled generation; each new (bucket,
max_tokens) pair compiles once, and once more per sampling mode (greedy, or sampled with
or without a top-p cut, and a top-k cut per power of two k rounds up to): the temperature,
top_p and top_k values themselves are arguments of the compiled program
(`generate.compiled_generate`). A request body over 64 MiB (`MAX_BODY_BYTES`) gets a 413:
its bytes are counted as they arrive (`BodyLimit`), so one is never held whole, chunked or
not. The request body's fields are the Pydantic models of `infllava_jax.serve_requests`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import queue
import sys
import threading
import time
import uuid
from typing import Callable, Iterator, Sequence

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from infllava_jax import generate
from infllava_jax.generate_cli import add_checkpoint_flags, check_checkpoint_flags, load_assistant
from infllava_jax.inference import Answer, Assistant
from infllava_jax.serve_requests import (ChatCompletionRequest, ChatRequest, RequestError,
                                         chat_request, error_body, validation_error)


# Requests generating or waiting their turn; more get a 503. Each waits on a thread.
MAX_PENDING = 16

# Request bodies above this get a 413: a few base64 images of tens of MB fit, a runaway
# upload does not reach memory whole.
MAX_BODY_BYTES = 64 << 20


# ---- stop strings ----

def stop_cut(text: str, stops: Sequence[str]) -> int | None:
  """Where to cut `text`: the start of the stop string that completes first, or None."""
  best = None
  for stop in stops:
    at = text.find(stop)
    if at >= 0 and (best is None or at + len(stop) < best[0]):
      best = (at + len(stop), at)
  return None if best is None else best[1]


class StopFilter:
  """Streams text pieces, holding back what may begin a stop string, cutting at one."""

  def __init__(self, stops: Sequence[str]):
    self.stops, self.text, self.sent, self.cut = tuple(stops), "", 0, None

  def push(self, piece: str) -> str:
    """The next piece in; the text now safe to send out."""
    if self.cut is not None:
      return ""
    self.text += piece
    self.cut = stop_cut(self.text, self.stops)
    end = self.cut
    if end is None:  # keep the longest tail that a stop string starts with
      tail = max((n for s in self.stops for n in range(1, len(s))
                  if self.text.endswith(s[:n])), default=0)
      end = len(self.text) - tail
    end = max(end, self.sent)
    out, self.sent = self.text[self.sent:end], end
    return out

  def finish(self) -> str:
    """What was held back, once the answer is complete."""
    if self.cut is not None:
      return ""
    out, self.sent = self.text[self.sent:], len(self.text)
    return out


# ---- responses ----

def _usage(answer: Answer) -> dict:
  completion = len(answer.token_ids)
  return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": completion,
          "total_tokens": answer.prompt_tokens + completion}


def completion_body(answer: Answer, request: ChatRequest, model: str, ident: str,
                    created: int) -> dict:
  """The `chat.completion` object for a finished answer (stop strings applied)."""
  cut = stop_cut(answer.text, request.stop)
  text = answer.text if cut is None else answer.text[:cut]
  return {"id": ident, "object": "chat.completion", "created": created, "model": model,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": "stop" if cut is not None else answer.finish_reason,
                       "logprobs": None}],
          "usage": _usage(answer)}


def _event(payload: dict | str) -> str:
  return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def stream_events(assistant: Assistant, request: ChatRequest, sampling: generate.Sampling,
                  model: str, ident: str, created: int,
                  on_done: Callable[[], None]) -> Iterator[str]:
  """Starts generating `request` and returns the server-sent events of its answer: role
  chunk, content chunks, final chunk with the finish reason, usage chunk if asked, then
  `data: [DONE]`.

  The generation runs in its own thread, started now: it holds the Assistant's lock until
  done, even if the client leaves or never reads the events, and then calls `on_done`.
  The returned iterator relays its text pieces as they come.
  """
  pieces: queue.Queue = queue.Queue()

  def work():
    try:
      answer = assistant.stream(request.image, request.question,
                                on_text=lambda text: pieces.put(("text", text)),
                                history=request.history, sampling=sampling, seed=request.seed)
      pieces.put(("done", answer))
    except Exception as e:  # reported to the client in the stream
      pieces.put(("error", e))
    finally:
      on_done()

  threading.Thread(target=work, name=f"generate-{ident}", daemon=True).start()
  return _relay_events(pieces, request, model, ident, created)


def _relay_events(pieces: queue.Queue, request: ChatRequest, model: str, ident: str,
                  created: int) -> Iterator[str]:
  """The events of `stream_events`, from the ("text" | "error" | "done", value) pieces."""

  def chunk(delta: dict, finish: str | None = None) -> str:
    return _event({"id": ident, "object": "chat.completion.chunk", "created": created,
                   "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                "finish_reason": finish}]})

  yield chunk({"role": "assistant", "content": ""})
  stops = StopFilter(request.stop)
  while True:
    kind, value = pieces.get()
    if kind == "text":
      text = stops.push(value)
      if text:
        yield chunk({"content": text})
    elif kind == "error":
      yield _event(error_body(f"generation failed: {type(value).__name__}: {value}",
                              "server_error"))
      break
    else:
      text = stops.finish()
      if text:
        yield chunk({"content": text})
      yield chunk({}, "stop" if stops.cut is not None else value.finish_reason)
      if request.include_usage:
        yield _event({"id": ident, "object": "chat.completion.chunk", "created": created,
                      "model": model, "choices": [], "usage": _usage(value)})
      break
  yield _event("[DONE]")


def sampling_for(assistant: Assistant, request: ChatRequest,
                 default_max_tokens: int) -> generate.Sampling:
  """The request's Sampling, after checking that prompt + answer fit the model's positions."""
  try:
    prompt = len(assistant.prompt(request.question, request.history, request.image is not None,
                                  request.image))
  except ValueError as e:  # the image marker in a message's text
    raise RequestError(str(e), "messages") from None
  room = assistant.context_length - prompt
  max_tokens = request.max_tokens or min(default_max_tokens, room)
  if room < 1 or max_tokens > room:
    param = "max_tokens" if request.max_tokens and room >= 1 else "messages"
    raise RequestError(f"the prompt has {prompt} tokens and max_tokens is {max_tokens}: "
                       f"together over the model's {assistant.context_length} positions",
                       param, "context_length_exceeded")
  return generate.Sampling(max_new_tokens=max_tokens, temperature=request.temperature,
                           top_p=request.top_p, top_k=request.top_k)


# ---- the app ----

class BodyTooLarge(HTTPException):
  """A request body past the server's limit: a 413 raised while the body is read."""
  code = "request_too_large"

  def __init__(self, size: int, limit: int, declared: bool):
    super().__init__(413, f"the request body {'is' if declared else 'passed'} {size} bytes, "
                          f"over this server's limit of {limit} (an image travels "
                          "base64-encoded in its data URL)")


class BodyLimit:
  """ASGI middleware: reading a request body raises `BodyTooLarge` as soon as its declared
  length, or the bytes that have arrived (a chunked body declares none), pass `max_bytes`,
  so no body over the limit is ever held whole."""

  def __init__(self, app, max_bytes: int):
    self.app, self.max_bytes = app, max_bytes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    declared = dict(scope["headers"]).get(b"content-length", b"")
    received = 0

    async def limited_receive():
      nonlocal received
      if declared.isdigit() and int(declared) > self.max_bytes:
        raise BodyTooLarge(int(declared), self.max_bytes, declared=True)
      message = await receive()
      if message["type"] == "http.request":
        received += len(message.get("body", b""))
        if received > self.max_bytes:
          raise BodyTooLarge(received, self.max_bytes, declared=False)
      return message

    await self.app(scope, limited_receive, send)


def create_app(assistant: Assistant, model_name: str = "infllava",
               default_max_tokens: int = 512, max_body_bytes: int = MAX_BODY_BYTES,
               max_pending: int = MAX_PENDING) -> FastAPI:
  """The FastAPI app serving `assistant` under /v1 (see the module docstring); request
  bodies over `max_body_bytes` get a 413, requests beyond `max_pending` a 503."""
  app = FastAPI(title="infllava-jax", docs_url=None, redoc_url=None)
  app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
  started = int(time.time())
  pending = threading.BoundedSemaphore(max_pending)

  @app.exception_handler(RequestError)
  async def request_error(_, e: RequestError):
    return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status,
                        headers={"Retry-After": "1"} if e.status == 503 else None)

  @app.exception_handler(RequestValidationError)
  async def invalid_request(http, e: RequestValidationError):
    return await request_error(http, validation_error(e.errors()))

  @app.exception_handler(HTTPException)
  async def http_error(_, e: HTTPException):  # 404, 405, 413... in the OpenAI shape
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    message = str(e.detail)
    if e.status_code == 400 and e.__cause__ is not None:  # FastAPI could not parse the body
      message = f"the request body is not valid JSON: {e.__cause__}"  # e.g. nested too deep
    return JSONResponse(error_body(message, kind, code=getattr(e, "code", None)),
                        status_code=e.status_code)

  @app.exception_handler(Exception)
  async def server_error(_, e: Exception):
    return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"),
                        status_code=500)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model",
                                        "created": started, "owned_by": "infllava-jax"}]}

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatCompletionRequest):
    # Decoding the image and tokenising are host work: off the event loop.
    request = await run_in_threadpool(chat_request, body)
    sampling = await run_in_threadpool(sampling_for, assistant, request, default_max_tokens)
    if not pending.acquire(blocking=False):
      raise RequestError(
          f"the server is busy: {max_pending} requests are generating or waiting their "
          "turn (--max-pending); retry later", status=503, code="server_busy",
          kind="server_error")
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if request.stream:
      return StreamingResponse(
          stream_events(assistant, request, sampling, model_name, ident, created,
                        on_done=pending.release),
          media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def answer() -> Answer:
      try:
        with assistant.lock:
          return assistant.generate_batch([request.image], [request.question],
                                          [request.history], sampling, request.seed)[0]
      finally:
        pending.release()

    return completion_body(await run_in_threadpool(answer), request, model_name, ident, created)

  return app


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def tcp_port(text: str) -> int:
  """--port's value: a port number 1-65535 (0, any free port, would make the announced
  address wrong)."""
  if not (text.isdigit() and 1 <= int(text) <= 65535):
    raise argparse.ArgumentTypeError(f"expected a TCP port 1-65535, got {text!r}")
  return int(text)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="infllava serve", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_checkpoint_flags(parser)
  parser.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default loopback only; anything else exposes the "
                           "model, unauthenticated, to the network)")
  parser.add_argument("--port", type=tcp_port, default=8000,
                      help="TCP port, 1-65535 (default: %(default)s)")
  parser.add_argument("--model-name", default=None,
                      help="the id /v1/models lists and responses carry (default: the "
                           "checkpoint folder's name); requests may name any model")
  parser.add_argument("--max-tokens", type=int, default=512,
                      help="answer length when a request gives no max_tokens "
                           "(default: %(default)s)")
  parser.add_argument("--length-bucket", type=int, default=64,
                      help="pad prompts to a multiple of this many tokens, fewer compiles "
                           "(default: %(default)s)")
  parser.add_argument("--max-pending", type=int, default=MAX_PENDING,
                      help="requests that may generate or wait their turn at once; more get "
                           "a 503 with Retry-After (default: %(default)s)")
  args = parser.parse_args(argv)
  check_checkpoint_flags(parser, args)
  if min(args.max_tokens, args.length_bucket, args.max_pending) < 1:
    parser.error("--max-tokens, --length-bucket and --max-pending must be >= 1")
  if not is_loopback(args.host):
    print(f"warning: binding {args.host}: anyone who can reach this address can use the model "
          "(no authentication); use 127.0.0.1 unless you mean it", file=sys.stderr)

  import uvicorn

  name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
  assistant = load_assistant("infllava serve", args,
                             f"; serving {name!r} at http://{args.host}:{args.port}/v1",
                             length_bucket=args.length_bucket)
  if assistant is None:
    return 2
  uvicorn.run(create_app(assistant, name, args.max_tokens, max_pending=args.max_pending),
              host=args.host, port=args.port)
  return 0
