"""A synthetic fine-detail VQA set: answers need detail that one low-res view loses.

Three question kinds, each with a small closed answer set (accuracy is an exact match):
- "pattern": a 1-px pattern over the whole image (horizontal or vertical lines, a
  checkerboard, or none), drawn as +-AMPLITUDE around a flat colour. At 252 px each INF-LLaVA
  view sees it; the LLaVA-1.5 baseline's 84 px resize averages it away, so the four images
  differ only in the noise (tests/data/test_sources.py checks that the resized interiors are
  equal). The tiny model learns it within a few hundred steps: the default (DEFAULT_KINDS).
- "letter" / "count": a 3x3 grid of cells; a question names a cell ("top-left", ...) that
  holds a 5x7 bitmap letter or 1-4 tiny dots, drawn at `image_size // 126` px per bitmap
  pixel at a random place in its cell (at 252 px a letter is 10x14 px with 2 px strokes).
  Finding one small mark among 36 visual tokens is much harder for a randomly initialised
  tiny model: it stays at the answer prior for a 10-minute CPU run. With several questions
  per image (`max_turns`) the model must also localise.

Records are in LLaVA conversation form and depend only on (split, seed, index, kinds), so a
held-out split is the same generator under another split name, and any prefix of a split
is the same whatever `num` is. Their ids name all four (`synthetic_id`), so sets written with
other kinds never share an id.
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
# Lines along rows, lines along columns, a checkerboard, none: sign patterns of pixel (r, c).
PATTERNS = ("horizontal", "vertical", "checkered", "plain")
AMPLITUDE = 40   # grey levels the pattern adds and subtracts
NOISE = 12       # per-pixel uniform noise on every image
KINDS = ("letter", "count", "pattern")
DEFAULT_KINDS = ("pattern",)
SPLITS = {"train": 0, "heldout": 1}
QUESTIONS = {
    "letter": "What letter is in the {cell} cell? Answer with one letter.",
    "count": "How many dots are in the {cell} cell? Answer with one digit.",
    "pattern": "What fine pattern covers the image? Answer with one word.",
}


def answer_set(kind: str) -> tuple[str, ...]:
  """The closed set of answers of a question kind."""
  return {"letter": LETTERS, "count": COUNTS, "pattern": PATTERNS}[kind]


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
  kinds = tuple(kinds)
  unknown = [k for k in kinds if k not in KINDS]
  if not kinds or unknown:
    raise ValueError(f"synthetic data: kinds {list(kinds)} must be a non-empty subset of "
                     f"{list(KINDS)}")
  return kinds


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
  image = background + rng.integers(-NOISE, NOISE + 1, size=(image_size, image_size, 3))
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
    # Inside its own cell: where `box` does not divide `cell` (sizes other than 252 = 18 x
    # 14), the last slot plus the jitter can reach past it (a no-op at 252).
    top = min(top, (k // GRID) * cell + cell - h)
    left = min(left, (k % GRID) * cell + cell - w)
    _stamp(image, mask, top, left, rng.integers(0, 90, size=3).astype(np.uint8))
    answers[k] = answer
  return image, answers


def pattern_image(answer: str, colour: np.ndarray, noise: np.ndarray,
                  phase: tuple[int, int] = (0, 0)) -> np.ndarray:
  """uint8 [S, S, 3]: `colour` [3] + `noise` [S, S, 3] + the +-AMPLITUDE pattern `answer`,
  shifted by `phase` (rows, columns)."""
  size = noise.shape[0]
  r, c = np.mgrid[:size, :size] + np.asarray(phase)[:, None, None]
  sign = {"horizontal": r % 2, "vertical": c % 2, "checkered": (r + c) % 2,
          "plain": np.full(r.shape, 0.5)}[answer] * 2 - 1
  image = colour + noise + np.rint(AMPLITUDE * sign).astype(int)[..., None]
  if image.min() < 0 or image.max() > 255:
    raise ValueError("pattern_image: colour +- (AMPLITUDE + noise) must stay within 0..255")
  return image.astype(np.uint8)


def render_pattern(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, str]:
  """Draws one "pattern" image: uint8 [S, S, 3] and its answer (one of PATTERNS).

  The flat colour keeps colour +- (AMPLITUDE + NOISE) inside 0..255: clipping would change
  the mean, which the low-res view could then see. The pattern's phase is random.
  """
  answer = PATTERNS[rng.integers(len(PATTERNS))]
  margin = AMPLITUDE + NOISE
  colour = rng.integers(margin, 256 - margin, size=3)
  phase = tuple(int(p) for p in rng.integers(0, 2, size=2))
  noise = rng.integers(-NOISE, NOISE + 1, size=(image_size, image_size, 3))
  return pattern_image(answer, colour, noise, phase), answer


def synthetic_id(split: str, seed: int, index: int, kinds: Sequence[str]) -> str:
  """The id of record `index`: 'synth-<kinds joined by +>-<split>-<seed>-<index, 7 digits>',
  e.g. 'synth-pattern-heldout-0-0000000'. The kinds are part of it because the same
  (split, seed, index) draws a different record under other kinds."""
  return f"synth-{'+'.join(kinds)}-{split}-{seed}-{index:07d}"


def synthetic_example(split: str, seed: int, index: int, image_size: int,
                      max_turns: int = 1, kinds: Sequence[str] = DEFAULT_KINDS) -> dict:
  """Record `index` of a split: {"id", "image": uint8 [S, S, 3], "conversations", "kind"}.

  The kind is drawn from `kinds`. A "pattern" record asks one question about the whole
  image. A letter or count record's first human turn carries `<image>`; later turns (up to
  `max_turns`) ask about other cells of the same image. Only the cells asked about hold a
  mark: with one question the image has one small mark, and finding it is part of the task.
  """
  kinds = check_kinds(kinds)
  rng = _rng(split, seed, index)
  kind = kinds[rng.integers(len(kinds))]
  record_id = synthetic_id(split, seed, index, kinds)
  if kind == "pattern":
    image, answer = render_pattern(rng, image_size)
    conversations = [{"from": "human", "value": "<image>\n" + QUESTIONS[kind]},
                     {"from": "gpt", "value": answer}]
    return {"id": record_id, "image": image, "conversations": conversations, "kind": kind}
  turns = int(rng.integers(1, max_turns + 1))
  cells = rng.permutation(GRID * GRID)[:turns]
  image, answers = render(rng, kind, image_size, cells)
  conversations = []
  for t, k in enumerate(cells):
    question = QUESTIONS[kind].format(cell=CELL_NAMES[k])
    conversations.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + question})
    conversations.append({"from": "gpt", "value": answers[k]})
  return {"id": record_id, "image": image, "conversations": conversations, "kind": kind}


def synthetic_examples(split: str, num: int, seed: int = 0, image_size: int = 252,
                       max_turns: int = 1, kinds: Sequence[str] = DEFAULT_KINDS
                       ) -> Iterator[dict]:
  """The first `num` records of a split (see `synthetic_example`)."""
  for index in range(num):
    yield synthetic_example(split, seed, index, image_size, max_turns, kinds)


def corpus_lines() -> list[str]:
  """Every text the generator can emit, for training the shipped tokenizer."""
  lines = []
  for kind, question in QUESTIONS.items():
    for cell in CELL_NAMES:  # a question without {cell} repeats: its words weigh more
      lines.append(question.format(cell=cell))
    lines.extend(answer_set(kind))
  return lines

