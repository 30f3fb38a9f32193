"""`infllava web`: the dual-perspective views it shows, its streaming, its refused flags, and
the page itself in headless Chromium: an uploaded image, the answers of `infllava generate` and
`infllava chat` for the same questions, a reset, nothing fetched from outside the server."""

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from infllava_jax import cli, generate, web
from infllava_jax.chat import ChatSession
from infllava_jax.data import images
from infllava_jax.inference import Answer, ContextLengthError
from infllava_jax.model import dcm
from tests.run_cli import REPO


# ---- the views ----

def test_dual_views_are_the_crops_the_model_encodes(tiny_config):
  cfg = tiny_config.model  # 252 px: a 3x3 grid of 84 px views, the reduced path
  pixels = images.preprocess(
      np.random.default_rng(0).integers(0, 256, (70, 100, 3), np.uint8), 252)
  local, global_ = web.dual_views(pixels, cfg)
  assert local.shape == global_.shape == (9, 84, 84, 3) and local.dtype == np.uint8
  encoded = np.asarray(dcm.views(pixels[None], cfg))[0]  # 9 local crops, then global crop 4
  np.testing.assert_array_equal(local, web.displayable(encoded[:9]))
  np.testing.assert_array_equal(global_[4], web.displayable(encoded[9]))
  shown = web.displayable(pixels)
  np.testing.assert_array_equal(local[5], shown[84:168, 168:252])  # block row 1, column 2
  np.testing.assert_array_equal(global_[5], shown[1::3, 2::3])  # phase (1, 2)
  baseline = cfg.copy_and_resolve_references()
  baseline.dcm.crops, baseline.dem.enhance = "none", "none"
  assert [v.shape[0] for v in web.dual_views(pixels, baseline)] == [0, 0]


def test_mosaic_lays_the_crops_on_their_grid_in_order():
  crops = np.arange(6, dtype=np.uint8)[:, None, None, None] * np.ones((6, 2, 3, 3), np.uint8)
  out = web.mosaic(crops, (2, 3), gap=1)
  assert out.shape == (5, 11, 3)
  assert out[:, :, 0].tolist() == [[0, 0, 0, 255, 1, 1, 1, 255, 2, 2, 2],
                                   [0, 0, 0, 255, 1, 1, 1, 255, 2, 2, 2],
                                   [255] * 11,
                                   [3, 3, 3, 255, 4, 4, 4, 255, 5, 5, 5],
                                   [3, 3, 3, 255, 4, 4, 4, 255, 5, 5, 5]]


def test_displayable_inverts_the_clip_normalisation():
  pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)
  np.testing.assert_array_equal(web.displayable(images.normalize(pixels)), pixels)


# ---- one turn, streamed ----

class PieceAssistant:
  """An Assistant's `stream`, as ChatSession calls it: fixed pieces, then their Answer."""

  def __init__(self, pieces, error=None):
    self.pieces, self.error, self.calls = pieces, error, []

  def stream(self, image, question, on_text, history=(), sampling=None, seed=0):
    self.calls.append((question, list(history), seed))
    if self.error:
      raise self.error
    for piece in self.pieces:
      on_text(piece)
    return Answer("".join(self.pieces), (5, 6, 7), 40, "stop")


def test_stream_turn_yields_the_answer_as_it_grows_and_keeps_the_turn():
  session = ChatSession(PieceAssistant(["A ", "red", " square."]), None,
                        generate.Sampling(), seed=3)
  session.history = [("Q0", "A0")]
  turns = list(web.stream_turn(session, "Q1"))
  assert [text for text, _ in turns] == ["A ", "A red", "A red square.", "A red square."]
  assert [done for _, done in turns[:-1]] == [None] * 3 and turns[-1][1].token_ids == (5, 6, 7)
  assert session.history == [("Q0", "A0"), ("Q1", "A red square.")]
  assert session.assistant.calls == [("Q1", [("Q0", "A0")], 4)]  # chat's seed + turn
  assert web.summary(2, turns[-1][1], 0.42) == "Turn 2: 3 tokens in 0.4 s, ended by the model."
  assert web.messages(session.history)[2:] == [{"role": "user", "content": "Q1"},
                                               {"role": "assistant", "content": "A red square."}]


def test_stream_turn_raises_what_the_question_raised():
  refused = ContextLengthError("the prompt has 2040 tokens and max_new_tokens is 16")
  session = ChatSession(PieceAssistant([], refused), None, generate.Sampling())
  with pytest.raises(ContextLengthError, match="2040 tokens"):
    list(web.stream_turn(session, "Q"))
  assert session.history == []


def test_turn_updates_show_the_question_the_growing_answer_then_the_kept_turn():
  session = ChatSession(PieceAssistant(["Two ", "cats."]), None, generate.Sampling())
  session.history = [("Q0", "A0")]
  updates = list(web.turn_updates(session, "Q1"))
  before = web.messages([("Q0", "A0")])
  asked = before + [{"role": "user", "content": "Q1"}]
  assert updates[:-1] == [
      (asked, [("Q0", "A0")], "", "Answering..."),
      (asked + [{"role": "assistant", "content": "Two "}], [("Q0", "A0")], "", "Answering..."),
      (asked + [{"role": "assistant", "content": "Two cats."}], [("Q0", "A0")], "",
       "Answering..."),
      (asked + [{"role": "assistant", "content": "Two cats."}], [("Q0", "A0")], "",
       "Answering...")]
  chat, history, box, status = updates[-1]
  assert history == [("Q0", "A0"), ("Q1", "Two cats.")] and chat == web.messages(history)
  assert box == "" and re.fullmatch(r"Turn 2: 3 tokens in \d+\.\d s, ended by the model\.", status)


def test_a_question_that_cannot_be_asked_goes_back_to_its_box_with_the_reason():
  refused = ContextLengthError("the prompt has 2040 tokens and max_new_tokens is 16")
  session = ChatSession(PieceAssistant([], refused), None, generate.Sampling())
  session.history = [("Q0", "A0")]
  *_, last = web.turn_updates(session, "Q1")
  assert last == (web.messages([("Q0", "A0")]), [("Q0", "A0")], "Q1",
                  "Cannot answer: the prompt has 2040 tokens and max_new_tokens is 16; "
                  "start a new conversation.")
  assert list(web.turn_updates(session, "")) == [
      (web.messages([("Q0", "A0")]), [("Q0", "A0")], "", "Type a question first.")]


# ---- refused flags: one line, exit 2, before a model loads ----

@pytest.mark.parametrize("argv, words", [
    ([], "the following arguments are required: --checkpoint"),
    (["--checkpoint", "{missing}"], "--checkpoint '{missing}' does not exist"),
    (["--checkpoint", "{empty}", "--port", "0"],
     "argument --port: expected a TCP port 1-65535, got '0'"),
    (["--checkpoint", "{empty}", "--port", "http"],
     "argument --port: expected a TCP port 1-65535, got 'http'"),
    (["--checkpoint", "{empty}", "--top-p", "0"], "top_p must be in (0, 1]"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, words, tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  where = {"missing": tmp_path / "missing", "empty": tmp_path / "empty"}
  with pytest.raises(SystemExit) as done:
    cli.main(["web", *(a.format(**where) for a in argv)])
  assert done.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("infllava web: error: ") and words.format(**where) in err, err


def test_without_gradio_the_user_is_told_what_to_install(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
  monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # restored after the command sets it
  assert cli.main(["web", "--checkpoint", str(tmp_path)]) == 2
  assert capsys.readouterr().err.splitlines() == [
      "infllava web: error: the web demo needs Gradio: pip install 'infllava-jax[web]'"]


# ---- the page in a real browser ----

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MISSING = [name for name, found in [
    ("chromium", CHROMIUM), ("chromedriver (Debian's chromium-driver)", CHROMEDRIVER),
    ("selenium", importlib.util.find_spec("selenium")),
    ("gradio (the [web] extra)", importlib.util.find_spec("gradio"))] if not found]
QUESTIONS = ("What is in the picture?", "And what colour is it?")
MAX_NEW_TOKENS = 12


def start(*argv, with_stdin: bool = False, log=None) -> subprocess.Popen:
  """`python -m infllava_jax.cli ARGV` with this checkout's package, started; its output to
  `log` (a file) or to pipes."""
  path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
  return subprocess.Popen(
      [sys.executable, "-m", "infllava_jax.cli", *map(str, argv)], text=True,
      stdin=subprocess.PIPE if with_stdin else None, stdout=log or subprocess.PIPE,
      stderr=log or subprocess.PIPE, env={**os.environ, "PYTHONPATH": path})


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, direct


def wait_until_served(url: str, server: subprocess.Popen, log_path, seconds: float = 120):
  deadline = time.time() + seconds
  while time.time() < deadline:
    assert server.poll() is None, f"infllava web exited: {log_path.read_text()}"
    try:
      with NO_PROXY.open(url, timeout=2):
        return
    except OSError:
      time.sleep(0.5)
  pytest.fail(f"infllava web did not serve {url} in {seconds} s: {log_path.read_text()}")


def cli_answers(generating: subprocess.Popen, chatting: subprocess.Popen, chat_input: str):
  """`infllava generate`'s answer, and `infllava chat`'s two answers."""
  out, err = generating.communicate(timeout=300)
  assert generating.returncode == 0, err
  expected = re.fullmatch(r"Q: .*?\nA: (.*)\n", out, re.S).group(1)
  out, err = chatting.communicate(chat_input, timeout=300)
  assert chatting.returncode == 0, err
  turns = re.fullmatch(r"you> assistant> (.*)\nyou> assistant> (.*)\nyou> \n", out, re.S)
  assert turns, out
  return expected, turns.groups()


@pytest.mark.slow  # three commands start, compile and answer on two cores: ~45 s of CPU
@pytest.mark.skipif(bool(MISSING) and not os.environ.get("CI"),
                    reason=f"the browser test needs {', '.join(MISSING)} (CI installs them: "
                           "apt-get install chromium chromium-driver; pip install -e "
                           "'.[test,web]')")
def test_the_page_in_a_browser_answers_as_the_commands_do(tiny_checkpoint, tmp_path):
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  image = tmp_path / "image.png"
  Image.fromarray(np.random.default_rng(5).integers(0, 256, (120, 90, 3), np.uint8)).save(image)
  port, log_path = free_port(), tmp_path / "web.log"
  url = f"http://127.0.0.1:{port}/"
  sampling = ["--temperature", 0, "--max-new-tokens", MAX_NEW_TOKENS]
  with open(log_path, "w") as log:
    server = start("web", "--checkpoint", tiny_checkpoint, "--port", port, *sampling, log=log)
  # The commands' answers are computed while the server starts (greedy, the same flags).
  generating = start("generate", "--checkpoint", tiny_checkpoint, "--image", image,
                     "--prompt", QUESTIONS[0], *sampling)
  chatting = start("chat", "--checkpoint", tiny_checkpoint, "--image", image, *sampling,
                   with_stdin=True)
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
               "--window-size=1400,1100"):
    options.add_argument(flag)
  driver = None
  try:
    expected, chat_turns = cli_answers(generating, chatting, "\n".join(QUESTIONS) + "\n")
    assert chat_turns[0] == expected  # the chat's first turn is generate's answer
    wait_until_served(url, server, log_path)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    wait = WebDriverWait(driver, 90)

    def found(selector):
      return driver.find_elements(By.CSS_SELECTOR, selector)

    def answers():
      return [e.get_attribute("textContent") for e in
              found("#chat [data-testid=bot] .message-content")]

    def status():
      return "".join(e.get_attribute("textContent") for e in found("#status")).strip()

    def ask(question: str, turn: int):
      box = found("#question textarea")[0]
      box.clear()
      box.send_keys(question)
      found("button#send")[0].click()
      wait.until(lambda _: status().startswith(f"Turn {turn}:"))

    driver.get(url)
    wait.until(lambda _: found("#image input[type=file]"))
    found("#image input[type=file]")[0].send_keys(str(image))
    mosaic_side = 3 * 84 + 2 * 4  # the tiny model's 3x3 crops of 84 px, 4 px apart
    wait.until(lambda _: [driver.execute_script("return arguments[0].naturalWidth", e)
                          for e in found("#local-views img, #global-views img")]
               == [mosaic_side] * 2)

    ask(QUESTIONS[0], 1)
    assert answers() == [expected]
    ask(QUESTIONS[1], 2)
    assert answers() == list(chat_turns)
    screenshot = os.path.join(os.environ.get("INFLLAVA_TEST_ARTIFACTS") or tmp_path, "web.png")
    os.makedirs(os.path.dirname(screenshot), exist_ok=True)
    assert driver.save_screenshot(screenshot)
    print(f"screenshot of the web demo: {screenshot}")

    found("button#reset")[0].click()
    wait.until(lambda _: not found("#chat [data-testid=bot]") and not status())
    ask(QUESTIONS[0], 1)  # a new conversation: the first turn's answer again
    assert answers() == [expected]

    loaded = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and [u for u in loaded if not u.startswith(url)] == []
  finally:
    if driver is not None:
      driver.quit()
    for process in (server, generating, chatting):
      process.kill()
      process.wait()
