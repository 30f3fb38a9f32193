"""`infllava chat`: streamed answers as printed equal the decoded answers, turns carry the
history into the prompt, /reset and /image start over, the end of input ends the chat."""

import io
import re
import sys

import numpy as np
import pytest
from PIL import Image

from infllava_jax import chat
from infllava_jax.checkpoints import converted
from infllava_jax.inference import Assistant
from tests.random_params import random_params


def test_two_turns_reset_image_and_eof(tiny_config, tmp_path, monkeypatch, capsys):
  checkpoint = tmp_path / "tiny"
  converted.save_converted(str(checkpoint), tiny_config.model,
                               random_params(tiny_config.model, seed=1))
  rng = np.random.default_rng(0)
  first, second = tmp_path / "first.png", tmp_path / "second.png"
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), np.uint8)).save(first)
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(second)

  calls = []  # what each answered question was asked with, and its Answer
  stream = Assistant.stream

  def spy(self, image, question, on_text, history=(), **kwargs):
    answer = stream(self, image, question, on_text, history=history, **kwargs)
    calls.append(dict(assistant=self, image=np.asarray(image), question=question,
                      history=list(history), seed=kwargs["seed"], answer=answer))
    return answer

  monkeypatch.setattr(Assistant, "stream", spy)
  q1, q2 = "What is in the picture?", "And its colour?"
  too_long = "zebra " * 2100  # over the tiny model's 2048 positions with the history
  script = [q1, q2, too_long, "/reset", q1, "/bogus", f"/image {tmp_path / 'missing.png'}",
            "what is <image>?", f"/image {second}", q1]
  monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
  assert chat.main(["--checkpoint", str(checkpoint), "--image", str(first),
                    "--max-new-tokens", "8", "--temperature", "0",
                    "--length-bucket", "256"]) == 0
  out = capsys.readouterr().out

  answers = [c["answer"].text for c in calls]
  assert [(c["question"], c["history"], c["seed"]) for c in calls] == [
      (q1, [], 0), (q2, [(q1, answers[0])], 1), (q1, [], 0), (q1, [], 0)]
  assert answers[2] == answers[0]  # after /reset: the first turn again
  np.testing.assert_array_equal(calls[0]["image"], np.asarray(Image.open(first)))
  np.testing.assert_array_equal(calls[3]["image"], np.asarray(Image.open(second)))

  # What was streamed to the terminal is the answer decoded from the generated ids.
  printed = [part[:part.index("\nyou> ")] for part in out.split("assistant> ")[1:]]
  refused = [p for p in printed if p.startswith("(cannot answer")]
  assert [p for p in printed if p not in refused] == answers, out
  assert len(refused) == 2
  assert re.fullmatch(r"\(cannot answer: the prompt has \d+ tokens and max_new_tokens is 8: "
                      r"together over the model's 2048 positions; /reset starts a new "
                      r"conversation\)", refused[0]), refused
  assert refused[1] == ("(cannot answer: the question holds '<image>', the image marker; the "
                        "image is passed on its own and its slots are added to the prompt)")
  assert all(c["answer"].token_ids for c in calls)
  assert "(new conversation)" in out and "unknown command /bogus" in out
  assert "cannot use that image" in out and "not found" in out
  assert out.endswith("you> \n")  # the end of input ends the chat

  # The second turn's prompt: the first turn's prompt, its answer, then the new question.
  assistant = calls[0]["assistant"]
  p1, p2 = assistant.prompt(q1), assistant.prompt(q2, [(q1, answers[0])])
  assert calls[1]["answer"].prompt_tokens == len(p2)
  assert p2[:len(p1)] == p1
  tail = assistant.tokenizer.decode(p2[len(p1):])
  assert tail.startswith(answers[0]) and tail.index(q2) > len(answers[0])


def test_text_stream_pieces_are_whole_characters():
  from infllava_jax.data.tokenizer import load_tokenizer
  from infllava_jax.inference import TextStream
  tokenizer = load_tokenizer()
  text = "  Grüße aus 東京 🙂, naïve café!  "
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  pieces_per_id = [tokenizer.decode([i]) for i in ids]
  assert any("\ufffd" in p for p in pieces_per_id)  # some ids are parts of a character
  eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
  pieces = []
  stream = TextStream(tokenizer, [eot], pieces.append)
  for i in [*ids, eot, ids[0]]:  # ids after the stop id are ignored
    stream.push(i)
  answer = tokenizer.decode(ids + [eot], skip_special_tokens=True).strip()
  assert "".join(pieces) == answer  # whitespace at the ends held back...
  stream.finish(answer)
  assert "".join(pieces) == answer == text.strip()
  assert len(pieces) > 5 and not any("\ufffd" in p for p in pieces)


def test_a_bad_image_is_refused_before_the_model_loads(tmp_path, capsys):
  (tmp_path / "bad.png").write_bytes(b"not an image")
  with pytest.raises(SystemExit) as done:  # tmp_path is no checkpoint: it is never read
    chat.main(["--checkpoint", str(tmp_path), "--image", str(tmp_path / "bad.png")])
  assert done.value.code == 2
  assert capsys.readouterr().err.splitlines()[-1].startswith(
      f"infllava chat: error: --image: cannot decode image '{tmp_path / 'bad.png'}'")
