"""`infllava serve`: the OpenAI client gets the answers `Assistant.ask` gives, streamed or not;
bad requests get OpenAI-style 4xx errors and the server keeps serving."""

import base64
import contextlib
import io
import json
import socket
import threading
import time

import numpy as np
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from infllava_jax import generate, serve
from infllava_jax.inference import Assistant
from tests.random_params import random_params

QUESTION = "What is in the picture?"
MAX_TOKENS = 8
GREEDY = generate.Sampling(max_new_tokens=MAX_TOKENS)  # what the server builds for temperature 0


@pytest.fixture(scope="module")
def assistant(tiny_config):
  return Assistant(tiny_config, random_params(tiny_config.model), length_bucket=256)  # one bucket for all test prompts


@pytest.fixture(scope="module")
def image():
  pixels = np.random.default_rng(3).integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return pixels, "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def client(assistant):
  return TestClient(serve.create_app(assistant, "tiny", default_max_tokens=MAX_TOKENS))


def user(text, url=None):
  parts = [{"type": "text", "text": text}]
  return {"role": "user",
          "content": parts + ([{"type": "image_url", "image_url": {"url": url}}] if url else [])}


def sse_deltas(response):
  """(content pieces, finish reasons, usage chunks, saw [DONE]) of an event-stream body."""
  pieces, finishes, usage, done = [], [], [], False
  for line in response.text.split("\n\n"):
    if not line:
      continue
    assert line.startswith("data: "), line
    data = line[len("data: "):]
    if data == "[DONE]":
      done = True
      continue
    chunk = json.loads(data)
    assert chunk["object"] == "chat.completion.chunk"
    if chunk.get("usage"):
      usage.append(chunk["usage"])
    for choice in chunk["choices"]:
      pieces.append(choice["delta"].get("content") or "")
      finishes.append(choice["finish_reason"])
  return pieces, finishes, usage, done


@contextlib.contextmanager
def serving(app):
  """`app` served by uvicorn on a free loopback port, in a thread; yields the port.

  log_config=None: uvicorn's own logging config would close the handlers already set up
  (absl's, writing to pytest's captured stderr), failing the test that served."""
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                         log_config=None))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.time() + 20
  while not server.started and thread.is_alive() and time.time() < deadline:
    time.sleep(0.05)
  assert server.started, "uvicorn did not start"
  try:
    yield server.servers[0].sockets[0].getsockname()[1]
  finally:
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def api(assistant):
  """The openai client of a real server on a free loopback port."""
  with serving(serve.create_app(assistant, "tiny", default_max_tokens=MAX_TOKENS)) as port:
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def expected(assistant, image):
  """The greedy answer to QUESTION about the image, from the Python API."""
  answer = assistant.generate_batch([image[0]], [QUESTION], sampling=GREEDY)[0]
  assert answer.text == assistant.ask(image[0], QUESTION, sampling=GREEDY)
  return answer


def test_openai_client_gets_assistant_answers(api, assistant, image, expected):
  _, url = image
  assert [m.id for m in api.models.list()] == ["tiny"]
  reply = api.chat.completions.create(model="anything", messages=[user(QUESTION, url)],
                                      max_tokens=MAX_TOKENS, temperature=0)
  assert reply.object == "chat.completion" and reply.model == "tiny"
  assert reply.id.startswith("chatcmpl-") and reply.created > 0
  assert reply.choices[0].message.role == "assistant"
  assert reply.choices[0].message.content == expected.text
  assert reply.choices[0].finish_reason == expected.finish_reason
  assert reply.usage.prompt_tokens == len(assistant.prompt(QUESTION)) == expected.prompt_tokens
  assert reply.usage.completion_tokens == len(expected.token_ids)
  assert reply.usage.total_tokens == expected.prompt_tokens + len(expected.token_ids)

  broken = url[:40] + "!!not base64!!" + url[40:]
  with pytest.raises(openai.BadRequestError) as error:
    api.chat.completions.create(model="tiny", messages=[user(QUESTION, broken)])
  assert error.value.status_code == 400
  assert "malformed base64" in error.value.message
  assert error.value.param == "messages[0].content[1].image_url.url"
  with pytest.raises(openai.BadRequestError) as error:
    api.chat.completions.create(model="tiny", messages=[])
  assert error.value.param == "messages"
  again = api.chat.completions.create(model="tiny", messages=[user(QUESTION, url)],
                                      max_tokens=MAX_TOKENS, temperature=0)
  assert again.choices[0].message.content == expected.text


def test_openai_client_streams(api, image, expected):
  _, url = image
  chunks = list(api.chat.completions.create(
      model="tiny", messages=[user(QUESTION, url)], max_completion_tokens=MAX_TOKENS,
      temperature=0, stream=True, stream_options={"include_usage": True}))
  assert all(c.object == "chat.completion.chunk" for c in chunks)
  assert chunks[0].choices[0].delta.role == "assistant"
  pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
  assert len([p for p in pieces if p]) > 1  # really streamed, not one block
  assert "".join(pieces) == expected.text
  finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
  assert finishes[-1] == expected.finish_reason and not any(finishes[:-1])
  assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


@pytest.mark.parametrize("body, param, words", [
    ({}, "messages", "non-empty list"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "got 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", "n must be 1"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "messages[0].content[0].image_url.url", "remote images are not fetched"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]},
     "messages[0].content[0].image_url.url", "cannot decode image"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "messages", "last message"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature",
     "temperature must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "max_tokens",
     "positions"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]},
     "messages[0].content[0]", "must be"),
    ({"messages": [{"role": "user", "content": "what is <image>?"}]}, "messages",
     "the question holds '<image>', the image marker"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature",
     "temperature: Input should be a valid number, got 'hot'"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream",
     "stream: Input should be a valid boolean, got 'yes'"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "messages[0].content is required"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, "stop",
     "stop must be a non-empty string or a list of up to 4"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]},
                   {"role": "user", "content": "b"}]},
     "messages[1].content[0]", "images are only accepted in user messages"),
])
def test_bad_requests_get_openai_errors(client, body, param, words):
  response = client.post("/v1/chat/completions", json=body)
  assert response.status_code == 400, response.text
  error = response.json()["error"]
  assert set(error) == {"message", "type", "param", "code"}
  assert error["type"] == "invalid_request_error" and error["param"] == param
  assert words in error["message"]


def test_protocol_errors_and_two_images(client, image):
  _, url = image
  response = client.post("/v1/chat/completions", content=b"{not json",
                         headers={"Content-Type": "application/json"})
  assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
  response = client.post("/v1/chat/completions", content=b"[" * 100_000,  # too deep to parse
                         headers={"Content-Type": "application/json"})
  assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
  two = {"messages": [user("a", url), {"role": "assistant", "content": "b"}, user("c", url)]}
  response = client.post("/v1/chat/completions", json=two)
  assert response.status_code == 400
  assert response.json()["error"]["param"] == "messages[2].content[1].image_url.url"
  response = client.post("/v1/chat/completions", content=json.dumps(two).encode())
  assert response.status_code == 400  # no Content-Type: not parsed (FastAPI's CSRF guard)
  assert "Content-Type: application/json" in response.json()["error"]["message"]
  response = client.get("/v1/nothing")
  assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_bodies_over_the_limit_get_413_and_the_server_stays_up(assistant):
  client = TestClient(serve.create_app(assistant, max_body_bytes=1000))
  body = {"messages": [{"role": "user", "content": "x" * 2000}]}
  response = client.post("/v1/chat/completions", json=body)
  assert response.status_code == 413
  error = response.json()["error"]
  assert error["code"] == "request_too_large" and "over this server's limit of 1000" in error[
      "message"]
  chunked = client.post("/v1/chat/completions", content=iter([b"{", b" " * 2000, b"}"]),
                        headers={"Content-Type": "application/json"})
  assert chunked.status_code == 413  # no Content-Length: measured once read
  assert client.get("/v1/models").status_code == 200


def test_a_chunked_body_gets_413_once_past_the_limit_not_once_complete(assistant):
  with serving(serve.create_app(assistant, max_body_bytes=1000)) as port, \
      socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"[" + b" " * 599
    for _ in range(2):  # 1,200 bytes, and no last chunk: the body never ends
      sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    response = b""
    while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
      data = sock.recv(65536)  # a server that waited for the whole body would time out here
      assert data, response
      response += data
  head, _, body = response.partition(b"\r\n\r\n")
  assert head.startswith(b"HTTP/1.1 413 "), head
  error = json.loads(body)["error"]
  assert error["code"] == "request_too_large"
  assert error["message"].startswith("the request body passed 1200 bytes, over this server's "
                                     "limit of 1000")


class GatedAssistant:
  """`assistant`, except that a generation waits for `gate` (after setting `entered`)."""

  def __init__(self, inner):
    self._inner = inner
    self.entered, self.gate = threading.Event(), threading.Event()

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def generate_batch(self, *args, **kwargs):
    self.entered.set()
    assert self.gate.wait(60)
    return self._inner.generate_batch(*args, **kwargs)

  def stream(self, *args, **kwargs):
    self.entered.set()
    assert self.gate.wait(60)
    return self._inner.stream(*args, **kwargs)


@pytest.mark.parametrize("stream", [False, True])
def test_requests_beyond_max_pending_get_503_until_a_slot_frees(assistant, stream):
  gated = GatedAssistant(assistant)
  client = TestClient(serve.create_app(gated, default_max_tokens=MAX_TOKENS, max_pending=1))
  body = {"messages": [user("Hi")], "temperature": 0, "stream": stream}
  first = {}
  thread = threading.Thread(
      target=lambda: first.update(response=client.post("/v1/chat/completions", json=body)))
  thread.start()
  assert gated.entered.wait(60)  # the first request holds the only slot
  busy = client.post("/v1/chat/completions", json=body)
  assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
  assert busy.json()["error"]["code"] == "server_busy"
  gated.gate.set()
  thread.join(60)
  assert first["response"].status_code == 200
  assert client.post("/v1/chat/completions", json=body).status_code == 200  # slot freed


def test_history_system_stop_and_text_only(client, assistant, image, expected):
  pixels, url = image
  first = expected.text
  follow = "And what colour is it?"
  messages = [user(QUESTION, url), {"role": "assistant", "content": first}, user(follow)]
  body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
  reply = client.post("/v1/chat/completions", json=body).json()
  assert reply["choices"][0]["message"]["content"] == assistant.ask(
      pixels, follow, history=[(QUESTION, first)], sampling=GREEDY)
  assert reply["usage"]["prompt_tokens"] == len(assistant.prompt(follow, [(QUESTION, first)]))

  system = [{"role": "system", "content": "Answer briefly."}, user(QUESTION, url)]
  reply = client.post("/v1/chat/completions", json={**body, "messages": system}).json()
  assert reply["choices"][0]["message"]["content"] == assistant.ask(
      pixels, "Answer briefly.\n\n" + QUESTION, sampling=GREEDY)

  assert len(first) >= 4
  stop = first[2:4]
  cut = first[:first.find(stop)]
  body = {**body, "messages": [user(QUESTION, url)], "stop": [stop, "never-there"]}
  reply = client.post("/v1/chat/completions", json=body).json()
  assert reply["choices"][0]["message"]["content"] == cut
  assert reply["choices"][0]["finish_reason"] == "stop"
  pieces, finishes, _, done = sse_deltas(client.post("/v1/chat/completions",
                                                     json={**body, "stream": True}))
  assert "".join(pieces) == cut and finishes[-1] == "stop" and done

  text_only = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": MAX_TOKENS,
               "temperature": 0}
  reply = client.post("/v1/chat/completions", json=text_only).json()
  assert reply["choices"][0]["message"]["content"] == assistant.ask(None, QUESTION,
                                                                    sampling=GREEDY)
  assert reply["usage"]["prompt_tokens"] == len(assistant.prompt(QUESTION, has_image=False))


def test_sampling_is_seeded(client, assistant, image):
  pixels, url = image
  body = {"messages": [user(QUESTION, url)], "max_tokens": MAX_TOKENS, "temperature": 1.0,
          "top_k": 5, "seed": 7}
  replies = [client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
             ["content"] for _ in range(2)]
  sampling = generate.Sampling(max_new_tokens=MAX_TOKENS, temperature=1.0, top_k=5)
  assert replies[0] == replies[1] == assistant.ask(pixels, QUESTION, sampling=sampling, seed=7)
  other = client.post("/v1/chat/completions", json={**body, "seed": 8}).json()
  assert other["choices"][0]["message"]["content"] != replies[0]


@pytest.mark.parametrize("stops, pieces", [
    (["END"], ["ab", "cE", "N", "Dxy"]),
    (["END"], ["abEN", "x", "END"]),
    (["abcd", "c"], ["ab", "cd"]),
    ([], ["a", "b"]),
    (["zz"], ["z", "z", "z"]),
])
def test_stop_filter_matches_stop_cut(stops, pieces):
  text = "".join(pieces)
  cut = serve.stop_cut(text, stops)
  stream = serve.StopFilter(stops)
  sent = "".join(stream.push(p) for p in pieces) + stream.finish()
  assert sent == (text if cut is None else text[:cut])
  assert (stream.cut is not None) == (cut is not None)


def test_loopback_hosts():
  assert all(serve.is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
  assert not any(serve.is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.4", "example.org"))
