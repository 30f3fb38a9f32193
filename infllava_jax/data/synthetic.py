"""A synthetic fine-detail VQA set: answers need detail that one low-res view loses.

Each image is a 3x3 grid of cells; each cell a question asks about holds a small mark: a
5x7 bitmap letter or a group of 1-4 tiny dots, drawn at `image_size // 126` px per bitmap
pixel at a random place in its cell. At 252 px a letter is 10x14 px with 2 px strokes; the
LLaVA-1.5 baseline sees the image resized by 3 (84 px), where strokes fall below one pixel
and the letters and dot counts blur into blobs. The question names the cell ("top-left",
...); with several questions per image the model must also localise. Answers come from a
small closed set (one letter or one digit): accuracy is an exact match.

Records are in LLaVA conversation form and depend only on (split, seed, index), so a
held-out split is the same generator under another split name, and any prefix of a split
is the same whatever `num` is.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

GRID = 3
LATTICE = 18
CELL_NAMES = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left",
              "bottom", "bottom-right")
# 5x7 bitmaps, rows top to bottom. Letters of similar ink mass, so a blurred blob does not
# give the answer away.
FONT = {
    "A": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "C": ("01111", "10000", "10000", "10000", "10000", "10000", "01111"),
    "E": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "H": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "P": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
    "T": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "X": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
}
LETTERS = tuple(FONT)
COUNTS = ("1", "2", "3", "4")
KINDS = ("letter", "count")
SPLITS = {"train": 0, "heldout": 1}
QUESTIONS = {
    "letter": "What letter is in the {cell} cell? Answer with one letter.",
    "count": "How many dots are in the {cell} cell? Answer with one digit.",
}


def answer_set(kind: str) -> tuple[str, ...]:
  """The closed set of answers of a question kind."""
  return LETTERS if kind == "letter" else COUNTS


def _rng(split: str, seed: int, index: int) -> np.random.Generator:
  if split not in SPLITS:
    raise ValueError(f"synthetic data: unknown split {split!r}; expected one of {list(SPLITS)}")
  return np.random.default_rng([seed, SPLITS[split], index])


def _stamp(image: np.ndarray, mask: np.ndarray, top: int, left: int, colour: np.ndarray):
  h, w = mask.shape
  region = image[top:top + h, left:left + w]
  region[mask] = colour


def _letter_mask(letter: str, scale: int) -> np.ndarray:
  bits = np.array([[c == "1" for c in row] for row in FONT[letter]])
  return np.kron(bits, np.ones((scale, scale), bool)).astype(bool)


def _dots_mask(count: int, scale: int) -> np.ndarray:
  """`count` dots of `scale` px in a row, one dot apart: [scale, (2*count-1)*scale]."""
  bits = np.zeros((1, 2 * count - 1), bool)
  bits[0, ::2] = True
  return np.kron(bits, np.ones((scale, scale), bool)).astype(bool)


def render(rng: np.random.Generator, kind: str, image_size: int,
           cells: Sequence[int] | None = None) -> tuple[np.ndarray, list[str | None]]:
  """Draws one image: uint8 [S, S, 3] and the answer of each of the 9 cells (row-major).

  Only `cells` (default: all 9) get a mark; the others stay empty (answer None).
  """
  scale = max(1, image_size // 126)
  cell = image_size // GRID
  background = rng.integers(170, 256, size=3)
  image = background + rng.integers(-12, 13, size=(image_size, image_size, 3))
  image = np.clip(image, 0, 255).astype(np.uint8)
  answers: list[str | None] = [None] * (GRID * GRID)
  for k in range(GRID * GRID) if cells is None else cells:
    if kind == "letter":
      answer = LETTERS[rng.integers(len(LETTERS))]
      mask = _letter_mask(answer, scale)
    else:
      answer = COUNTS[rng.integers(len(COUNTS))]
      mask = _dots_mask(int(answer), scale)
    h, w = mask.shape
    # Marks sit in the boxes of a LATTICE x LATTICE grid (at 252 px: 14 px, the patch grid
    # of the tiny model's high-res views), plus a small jitter: one patch then holds one
    # whole mark, which a small model learns in minutes; a 3x smaller view cannot resolve it.
    box = image_size // LATTICE
    slots = max(1, (cell - w) // box + 1), max(1, (cell - h) // box + 1)
    top = (k // GRID) * cell + box * int(rng.integers(0, slots[1]))
    left = (k % GRID) * cell + box * int(rng.integers(0, slots[0]))
    top += int(rng.integers(0, max(1, min(box - h, cell - h) + 1)))
    left += int(rng.integers(0, max(1, min(box - w, cell - w) + 1)))
    _stamp(image, mask, top, left, rng.integers(0, 90, size=3).astype(np.uint8))
    answers[k] = answer
  return image, answers


def synthetic_example(split: str, seed: int, index: int, image_size: int,
                      max_turns: int = 1) -> dict:
  """Record `index` of a split: {"id", "image": uint8 [S, S, 3], "conversations"}.

  The first human turn carries `<image>`; later turns (up to `max_turns`) ask about other
  cells of the same image. Only the cells asked about hold a mark: with one question the
  image has one small mark, and finding it is part of the task.
  """
  rng = _rng(split, seed, index)
  kind = KINDS[rng.integers(len(KINDS))]
  turns = int(rng.integers(1, max_turns + 1))
  cells = rng.permutation(GRID * GRID)[:turns]
  image, answers = render(rng, kind, image_size, cells)
  conversations = []
  for t, k in enumerate(cells):
    question = QUESTIONS[kind].format(cell=CELL_NAMES[k])
    conversations.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + question})
    conversations.append({"from": "gpt", "value": answers[k]})
  return {"id": f"synth-{split}-{seed}-{index:07d}", "image": image,
          "conversations": conversations, "kind": kind}


def synthetic_examples(split: str, num: int, seed: int = 0, image_size: int = 252,
                       max_turns: int = 1) -> Iterator[dict]:
  """The first `num` records of a split (see `synthetic_example`)."""
  for index in range(num):
    yield synthetic_example(split, seed, index, image_size, max_turns)


def corpus_lines() -> list[str]:
  """Every text the generator can emit, for training the shipped tokenizer."""
  lines = []
  for kind, question in QUESTIONS.items():
    for cell in CELL_NAMES:
      lines.append(question.format(cell=cell))
    lines.extend(answer_set(kind))
  return lines

