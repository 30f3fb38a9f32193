"""`infllava web`: chat about an image in the browser, answers streamed (a Gradio page).

  pip install 'infllava-jax[web]'
  infllava web --checkpoint runs/synthetic       # then open http://127.0.0.1:7860

Upload or paste an image, ask, and the answer appears as it is generated. Later questions
continue the conversation (the image belongs to the first question, as in training and
`infllava chat`, whose turns and seeds these are); "New conversation" clears it, and so does
another image; without one, questions are text-only. Temperature (0: greedy), top-p and the
answer's length are set in the page, their defaults by the flags (--top-k and --seed hold for
every question). A status line under the chat gives each answer's tokens and time. Beside
the chat are the image's dual-perspective views as the model sees them (the Dual-perspective
Cropping Module, paper §4.2): the N x N local crops (contiguous blocks) and the N x N global
crops (stride-N phases) of the preprocessed image. Answers are shown as generated,
characters as they are, not rendered as Markdown.

The page is served on loopback unless --host says otherwise (anything else exposes the model,
unauthenticated, to the network). It fetches nothing from the internet: Gradio's analytics
and version check are off, its fonts and scripts are the ones installed with it, and no
share link is made. Questions are answered one at a time, in the order they come.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from typing import Iterator

import numpy as np
from ml_collections import ConfigDict

from infllava_jax import generate
from infllava_jax.chat import ChatSession
from infllava_jax.data import images
from infllava_jax.errors import ConfigError
from infllava_jax.generate_cli import (add_checkpoint_flags, add_sampling_flags,
                                       check_checkpoint_flags, load_assistant,
                                       sampling_from_flags)
from infllava_jax.inference import Answer, Assistant
from infllava_jax.model import dcm
from infllava_jax.serve import is_loopback, tcp_port

INSTALL_HINT = "the web demo needs Gradio: pip install 'infllava-jax[web]'"


# ---- the dual-perspective views ----

def displayable(pixels: np.ndarray) -> np.ndarray:
  """CLIP-normalised float [..., 3] (`images.preprocess`) -> uint8 [..., 3] to show."""
  scaled = pixels * np.asarray(images.CLIP_STD) + np.asarray(images.CLIP_MEAN)
  return np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)


def has_crops(model_cfg: ConfigDict) -> bool:
  """Whether the model cuts images into crops (not the LLaVA baseline, nor dcm.crops="none")."""
  return model_cfg.variant == "infllava" and dcm.plan(model_cfg).crops != "none"


def dual_views(pixels: np.ndarray, model_cfg: ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """The DCM's local and global crops of one preprocessed image, to show.

  pixels: float32 [S, S, 3], CLIP-normalised (`Assistant.pixels`). Returns (local, global),
  each uint8 [N*N, h, w, 3] in the paper's order k (`dcm.local_crops`, `dcm.global_crops`)
  of the image at `model.dcm.image_size`: all N*N global phases, also those the reduced path
  does not encode. Both are empty ([0, h, w, 3]) for a model without DCM crops (the LLaVA
  baseline, or `model.dcm.crops="none"`).
  """
  plan = dcm.plan(model_cfg)
  if not has_crops(model_cfg):
    return (np.zeros((0, *plan.view, 3), np.uint8),) * 2
  side = model_cfg.dcm.image_size
  if pixels.shape[0] != side:  # a processor size other than the DCM's, resized as the model does
    pixels = np.asarray(dcm.resize(pixels[None], (side, side), "bicubic"))[0]
  batch = displayable(pixels)[None]
  return dcm.local_crops(batch, plan.view)[0], dcm.global_crops(batch, plan.view)[0]


def mosaic(crops: np.ndarray, grid: tuple[int, int], gap: int = 4) -> np.ndarray:
  """[N_h*N_w, h, w, 3] crops in order k -> one uint8 image of them on their grid, k row by
  row, `gap` white pixels between them: [N_h*h + (N_h-1)*gap, N_w*w + (N_w-1)*gap, 3]."""
  (n_h, n_w), (_, h, w, c) = grid, crops.shape
  out = np.full((n_h * (h + gap) - gap, n_w * (w + gap) - gap, c), 255, np.uint8)
  for k, crop in enumerate(crops):
    row, col = divmod(k, n_w)
    out[row * (h + gap):row * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = crop
  return out


# ---- one turn, streamed ----

class _Pieces:
  """The `out` of `ChatSession.ask`: each written piece goes to a queue."""

  def __init__(self, pieces: queue.Queue):
    self.pieces = pieces

  def write(self, piece: str) -> None:
    self.pieces.put(piece)

  def flush(self) -> None:
    pass


def stream_turn(session: ChatSession, question: str) -> Iterator[tuple[str, Answer | None]]:
  """(the answer so far, None) after each piece generated, then (its text, the `Answer`);
  `ChatSession.ask` runs in a thread, and keeps the turn in `session.history`. Re-raises what
  `ask` raised (ValueError for a question that cannot be asked)."""
  pieces: queue.Queue = queue.Queue()

  def work():
    try:
      pieces.put(session.ask(question, _Pieces(pieces)))
    except Exception as e:  # handed to the caller's thread
      pieces.put(e)

  threading.Thread(target=work, name="web-answer", daemon=True).start()
  text = ""
  while isinstance(piece := pieces.get(), str):
    text += piece
    yield text, None
  if isinstance(piece, Exception):
    raise piece
  yield piece.text, piece


def summary(turn: int, answer: Answer, seconds: float) -> str:
  """The status line after an answer: `Turn 1: 12 tokens in 0.8 s, ended by the model.`"""
  end = "ended by the model" if answer.finish_reason == "stop" else "cut at max new tokens"
  return f"Turn {turn}: {len(answer.token_ids)} tokens in {seconds:.1f} s, {end}."


def messages(history: list[tuple[str, str]]) -> list[dict[str, str]]:
  """(question, answer) turns -> the chat's messages, [{"role", "content"}, ...]."""
  return [{"role": role, "content": text}
          for turn in history for role, text in zip(("user", "assistant"), turn)]


def turn_updates(session: ChatSession, question: str) -> Iterator[tuple]:
  """What the page shows while `session` answers `question`: (chat messages, history, the
  question box, the status line), first with the question, then after each piece of the
  answer, last with the turn kept and its `summary`. A question that cannot be asked goes
  back to its box, the conversation as it was, and the status line says why."""
  history = list(session.history)
  if not question:
    yield messages(history), history, "", "Type a question first."
    return
  shown = messages(history) + [{"role": "user", "content": question}]
  start = time.perf_counter()
  yield shown, history, "", "Answering..."
  try:
    for text, done in stream_turn(session, question):
      yield shown + [{"role": "assistant", "content": text}], history, "", "Answering..."
  except ValueError as e:  # too long for the model's positions, or the image marker in it
    hint = "; start a new conversation" if history else ""
    yield messages(history), history, question, f"Cannot answer: {e}{hint}."
    return
  status = summary(len(session.history), done, time.perf_counter() - start)
  yield messages(session.history), session.history, "", status


# ---- the page ----

def build_page(assistant: Assistant, defaults: generate.Sampling, seed: int = 0):
  """The demo's Gradio Blocks for `assistant` (queued: one answer at a time); `defaults`: the
  sampling controls' initial values (its top_k is used as given: the page has no control)."""
  import gradio as gr

  model_cfg = assistant.config.model
  plan = dcm.plan(model_cfg)
  cleared = ([], [], "", "")  # chat, history, question, status

  def new_image(image):
    """The image's views, and a new conversation."""
    if image is None or not has_crops(model_cfg):
      return None, None, *cleared
    local, global_ = dual_views(assistant.pixels(image), model_cfg)
    return mosaic(local, plan.grid), mosaic(global_, plan.grid), *cleared

  def answer(image, question, history, temperature, top_p, max_tokens):
    """Streams the answer to `question` into the chat (`turn_updates`)."""
    try:
      sampling = generate.Sampling(max_new_tokens=int(max_tokens),
                                   temperature=float(temperature), top_p=float(top_p),
                                   top_k=defaults.top_k)
    except ValueError as e:  # values the sliders do not offer, sent by hand
      yield messages(history), history, question, f"Cannot answer: {e}."
      return
    session = ChatSession(assistant, image, sampling, seed)
    session.history = list(history)
    yield from turn_updates(session, (question or "").strip())

  with gr.Blocks(title="INF-LLaVA", analytics_enabled=False) as page:
    gr.Markdown(f"### INF-LLaVA ({model_cfg.variant}, {model_cfg.dtype})")
    history = gr.State([])
    with gr.Row():
      with gr.Column(scale=2):
        image = gr.Image(type="pil", sources=["upload", "clipboard"], label="Image",
                         elem_id="image", height=320)
        with gr.Accordion(f"Dual-perspective views: {plan.grid[0]}x{plan.grid[1]} local and "
                          "global crops, as the model sees them", open=True,
                          visible=has_crops(model_cfg)):
          with gr.Row():
            # PNG: the crops' pixels as they are (Gradio's default WebP is lossy).
            local = gr.Image(label="Local crops (blocks)", elem_id="local-views",
                             interactive=False, format="png", buttons=["fullscreen"])
            global_ = gr.Image(label="Global crops (stride phases)", elem_id="global-views",
                               interactive=False, format="png", buttons=["fullscreen"])
      with gr.Column(scale=3):
        chat = gr.Chatbot(label="Conversation", elem_id="chat", height=480,
                          render_markdown=False, feedback_options=None,
                          buttons=["copy", "copy_all"])
        question = gr.Textbox(label="Question", placeholder="Ask about the image",
                              elem_id="question", lines=2)
        with gr.Row():
          send = gr.Button("Send", variant="primary", elem_id="send")
          reset = gr.Button("New conversation", elem_id="reset")
        status = gr.Markdown(elem_id="status")
        with gr.Accordion("Sampling", open=False):
          temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                  label="Temperature (0: greedy)", elem_id="temperature")
          top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p",
                            elem_id="top-p")
          max_tokens = gr.Slider(1, assistant.context_length,
                                 value=min(defaults.max_new_tokens, assistant.context_length),
                                 step=1, label="Max new tokens", elem_id="max-tokens")

    conversation = [chat, history, question, status]
    image.change(new_image, image, [local, global_, *conversation])
    ask = dict(fn=answer, inputs=[image, question, history, temperature, top_p, max_tokens],
               outputs=conversation)
    send.click(**ask)
    question.submit(**ask)
    reset.click(lambda: cleared, None, conversation)
    chat.clear(lambda: cleared, None, conversation)  # the chat's own bin button
  return page.queue(default_concurrency_limit=1)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="infllava web", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_checkpoint_flags(parser)
  parser.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default loopback only; anything else exposes the "
                           "model, unauthenticated, to the network)")
  parser.add_argument("--port", type=tcp_port, default=7860,
                      help="TCP port, 1-65535 (default: %(default)s)")
  add_sampling_flags(parser, max_new_tokens=512, temperature=0.2)
  parser.add_argument("--length-bucket", type=int, default=64,
                      help="pad prompts to a multiple of this many tokens, fewer compiles "
                           "(default: %(default)s)")
  args = parser.parse_args(argv)
  check_checkpoint_flags(parser, args)
  if args.length_bucket < 1:
    parser.error("--length-bucket must be >= 1")
  sampling = sampling_from_flags(parser, args)
  # Before gradio is imported: some of its modules read this when they load.
  os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
  try:
    import gradio  # noqa: F401  (the optional extra: checked before the model loads)
  except ImportError:
    raise ConfigError(INSTALL_HINT) from None
  if not is_loopback(args.host):
    print(f"warning: binding {args.host}: anyone who can reach this address can use the model "
          "(no authentication); use 127.0.0.1 unless you mean it", file=sys.stderr)

  assistant = load_assistant("infllava web", args,
                             f"; serving http://{args.host}:{args.port}",
                             length_bucket=args.length_bucket)
  if assistant is None:
    return 2
  page = build_page(assistant, sampling, args.seed)
  page.launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False,
              mcp_server=False, inbrowser=False, quiet=True, show_error=True)
  return 0
