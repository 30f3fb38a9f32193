"""Conversation templates, tokenisation and label masks (docs/fidelity.md#llama3-template, #double-bos, #label-mask, #plain-template).

A LLaVA conversation becomes token ids with reference-style labels (-100 where not
supervised), then the single `<image>` placeholder becomes N_img image-slot ids (the model
writes the visual tokens into them; the reference splices instead (docs/fidelity.md#image-slots), our static-shape design does
not).

Labels (data.label_rule):
  "reference" (default): the released LLaVA `preprocess_llama3` / `preprocess_plain` rule,
    by counting tokens. The llama3 prompt is cut into rounds at `<|eot_id|>`; in each round
    the instruction's tokens (everything up to the assistant header and its "\\n\\n",
    tokenised on their own) are masked and the rest of the round is supervised: the answer
    and its `<|eot_id|>`. Where the header's "\\n\\n" and an answer's leading "\\n" merge into
    one token ("\\n\\n\\n" in LLaMA-3), that token counts as instruction and is masked. When
    the rounds' counts do not add up to the sample's length (a "tokenization mismatch",
    e.g. a message holding a literal `<|eot_id|>`) the whole sample is masked, as there.
  "spans": a token is supervised when its characters overlap an answer or its closing
    `<|eot_id|>`. The same labels wherever the tokens do not straddle the header/answer
    boundary; it supervises the merged "\\n\\n\\n" token and never masks a whole sample.

Templates:
  llama3 (stage 2, inference): system block, headers, `<|eot_id|>` after every message,
    the double BOS of the released pipeline (docs/fidelity.md#double-bos) unless `double_bos=False`.
  plain (stage 1): `<image>` + caption + "\\n"; the human text is dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

IMAGE = "<image>"
IGNORE_INDEX = -100
LABEL_RULES = ("reference", "spans")
LLAMA3_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")
_BOT, _SH, _EH, _EOT = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>")
ROLES = {"human": "user", "gpt": "assistant"}


class SampleError(ValueError):
  """A record that cannot become a training sample; the message says why."""


class OverlongError(SampleError):
  """A sample longer than `max_length` that the overlong policy does not keep."""


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """One sample before batching.

  ids: [L] int32, image slots = image_token_id (N_img of them per image).
  labels: [L] int32, the id at that position or -100 where not supervised (reference style).
  num_images: 0 or 1.
  truncated: True when the text was cut to `max_length`.
  """
  ids: np.ndarray
  labels: np.ndarray
  num_images: int
  truncated: bool = False


def check_conversation(conversations, has_image: bool) -> tuple[list[str], list[str]]:
  """Checks a LLaVA `conversations` list; returns its (roles, texts), human first.

  A leading "gpt" message is dropped (as the reference does); roles must then alternate
  human/gpt and end with gpt. `<image>` must appear exactly once when the record has an
  image, never otherwise. Cheap (a few C-level passes) for the metadata pass over every
  record of a dataset (`checks.py`); raises SampleError naming the first fault.
  """
  if not isinstance(conversations, list) or not conversations:
    raise SampleError("empty or missing 'conversations'")
  try:
    roles = [message["from"] for message in conversations]
    texts = [message["value"] for message in conversations]
    joined = "".join(texts)  # a TypeError unless every text is a str
    well_formed = set(roles) <= ROLES.keys()
  except (TypeError, KeyError):
    well_formed = False
  if not well_formed:
    for i, message in enumerate(conversations):
      if (not isinstance(message, dict) or message.get("from") not in ("human", "gpt")
          or not isinstance(message.get("value"), str)):
        raise SampleError(f"conversations[{i}] is not {{'from': 'human'|'gpt', 'value': str}}: "
                          f"{str(message)[:80]!r}")
  if roles[0] == "gpt":
    roles, texts = roles[1:], texts[1:]
    joined = "".join(texts)
  if not roles:
    raise SampleError("conversation has no human turn")
  questions, answers = roles[::2], roles[1::2]
  if questions.count("human") != len(questions) or answers.count("gpt") != len(answers):
    for i, role in enumerate(roles):
      expected = "human" if i % 2 == 0 else "gpt"
      if role != expected:
        raise SampleError(f"roles do not alternate: turn {i} is {role!r}, expected {expected!r}")
  if len(roles) % 2:
    raise SampleError("conversation ends with a human turn (no answer to supervise)")
  count = joined.count(IMAGE)
  if has_image and count != 1:
    raise SampleError(f"record has an image but its conversation holds {count} '{IMAGE}' "
                      "placeholders (expected 1)")
  if not has_image and count:
    raise SampleError(f"conversation holds '{IMAGE}' but the record has no image")
  return roles, texts


def normalize_conversation(conversations, has_image: bool) -> list[tuple[str, str]]:
  """Checks a LLaVA `conversations` list (`check_conversation`) and returns its
  [(role, text)] turns, human first, `<image>` moved to the front of its message as
  `preprocess_multimodal` does."""
  roles, texts = check_conversation(conversations, has_image)
  return [(role, (IMAGE + "\n" + text.replace(IMAGE, "").strip()).strip()
           if IMAGE in text else text) for role, text in zip(roles, texts)]


def render_llama3(turns: Sequence[tuple[str, str | None]]) -> tuple[str, list[tuple[int, int]]]:
  """The conv_llama3 prompt and the character spans of each answer + its `<|eot_id|>`.

  A final gpt turn of None gives the generation prompt (ends with the assistant header).
  """
  text = _BOT + _SH + "system" + _EH + "\n\n" + LLAMA3_SYSTEM + _EOT
  spans = []
  for role, message in turns:
    text += _SH + ROLES[role] + _EH + "\n\n"
    if message is None:
      break
    start = len(text)
    text += message + _EOT
    if role == "gpt":
      spans.append((start, len(text)))
  return text, spans


def render_plain(turns: Sequence[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
  """The plain (stage 1) text `<image>` + caption + "\\n" and the caption's span."""
  if IMAGE not in turns[0][1]:
    raise SampleError("the plain template needs an image sample")
  text = IMAGE + turns[1][1] + "\n"
  return text, [(len(IMAGE), len(text))]


def tokenize(text: str, spans: Sequence[tuple[int, int]], tokenizer, image_token_id: int,
             double_bos: bool = True) -> tuple[list[int], list[int]]:
  """`tokenizer_image_token` of the reference, with labels from the supervised spans.

  Each `<image>`-separated chunk is tokenised on its own (the tokenizer adds its BOS); when
  the first chunk starts with BOS, one BOS is kept and every chunk loses its first token,
  and one `image_token_id` goes between chunks. Returns (ids, labels), labels -100 outside
  the spans (the "spans" label rule).
  """
  bos = tokenizer.bos_token_id
  ids, labels, chunk_start = [], [], 0
  offset = None
  for c, chunk in enumerate(text.split(IMAGE)):
    if c:
      ids.append(image_token_id)
      labels.append(IGNORE_INDEX)
      chunk_start += len(IMAGE)
    enc = tokenizer(chunk, return_offsets_mapping=True)
    chunk_ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if offset is None:
      offset = 1 if chunk_ids and chunk_ids[0] == bos else 0
      if offset:
        ids.append(bos)
        labels.append(IGNORE_INDEX)
    for tok, (lo, hi) in zip(chunk_ids[offset:], offsets[offset:]):
      lo, hi = lo + chunk_start, hi + chunk_start
      supervised = any(lo < end and hi > start for start, end in spans)
      ids.append(tok)
      labels.append(tok if supervised else IGNORE_INDEX)
    chunk_start += len(chunk)
  return (ids, labels) if double_bos else _single_bos(ids, labels, bos)


def _single_bos(ids: list[int], labels: list[int], bos: int) -> tuple[list[int], list[int]]:
  """Without the first of a double BOS (data.double_bos=False)."""
  if len(ids) > 1 and ids[0] == ids[1] == bos:
    return ids[1:], labels[1:]
  return ids, labels


def _length(text: str, tokenizer, image_token_id: int) -> int:
  """len(tokenizer_image_token(text)): what the reference's label rule counts."""
  return len(tokenize(text, (), tokenizer, image_token_id)[0])


def reference_labels_llama3(text: str, ids: Sequence[int], tokenizer, image_token_id: int,
                            max_length: int) -> list[int]:
  """`preprocess_llama3`'s labels for the llama3 prompt `text` tokenised as `ids`.

  Rounds: system + first question + first answer, then each (question, answer) pair; an
  empty round (the tail after the last `<|eot_id|>`) ends the loop. Per round, the
  instruction (up to the assistant header's "\\n\\n") is masked and the round's length + 1
  (its `<|eot_id|>`, cut by the split) is counted, both less 1 after the first round (the
  BOS each round's own tokenisation adds). Everything after the counted rounds is masked;
  so is the whole sample when the count, below `max_length`, differs from len(ids).
  """
  answer_header = _EOT + _SH + ROLES["gpt"] + _EH + "\n\n"
  rounds = text.split(_EOT)
  grouped = [_EOT.join(rounds[:3])] + [_EOT.join(rounds[i:i + 2])
                                       for i in range(3, len(rounds), 2)]
  labels = np.array(ids)
  count = 0
  for i, round_text in enumerate(grouped):
    if not round_text:
      break
    parts = round_text.split(answer_header)
    if len(parts) != 2:
      break
    round_len = _length(round_text, tokenizer, image_token_id) + 1
    instruction_len = _length(parts[0] + answer_header, tokenizer, image_token_id)
    if i:
      round_len, instruction_len = round_len - 1, instruction_len - 1
    labels[count:count + instruction_len] = IGNORE_INDEX
    count += round_len
  labels[count:] = IGNORE_INDEX
  if count < max_length and count != len(ids):  # the reference's "tokenization mismatch"
    labels[:] = IGNORE_INDEX
  return labels.tolist()


def reference_labels_plain(ids: Sequence[int], tokenizer, image_token_id: int) -> list[int]:
  """`preprocess_plain`'s labels: the tokens of the bare `<image>` (BOS, image) masked."""
  labels = np.array(ids)
  labels[:_length(IMAGE, tokenizer, image_token_id)] = IGNORE_INDEX
  return labels.tolist()


def expand_image_slots(ids: Sequence[int], labels: Sequence[int], image_token_id: int,
                       num_image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """Replaces each image_token_id by N_img of them (labels -100). Returns int32 [L]."""
  out_ids, out_labels = [], []
  for tok, lab in zip(ids, labels):
    if tok == image_token_id:
      out_ids.extend([image_token_id] * num_image_tokens)
      out_labels.extend([IGNORE_INDEX] * num_image_tokens)
    else:
      out_ids.append(tok)
      out_labels.append(lab)
  return np.asarray(out_ids, np.int32), np.asarray(out_labels, np.int32)


def fit_length(ids: np.ndarray, labels: np.ndarray, image_token_id: int, max_length: int,
               overlong: str) -> tuple[np.ndarray, np.ndarray, bool]:
  """Applies the overlong policy: "truncate" cuts text at `max_length`, "drop" refuses.

  Truncation never cuts into image slots: a sample whose image block ends past
  `max_length` raises OverlongError under either policy.
  """
  if len(ids) <= max_length:
    return ids, labels, False
  if overlong not in ("truncate", "drop"):
    raise ValueError(f"data.overlong must be 'truncate' or 'drop', got {overlong!r}")
  slots = np.flatnonzero(ids == image_token_id)
  if overlong == "drop":
    raise OverlongError(f"{len(ids)} tokens > max_length {max_length} (data.overlong='drop')")
  if slots.size and slots[-1] >= max_length:
    raise OverlongError(f"image slots end at token {slots[-1] + 1} > max_length {max_length}; "
                        "truncating would cut into them")
  return ids[:max_length], labels[:max_length], True


def tokenize_conversation(conversations, *, has_image: bool, template: str, tokenizer,
                          image_token_id: int, num_image_tokens: int, max_length: int,
                          overlong: str = "truncate", double_bos: bool = True,
                          label_rule: str = "reference") -> Tokenized:
  """A LLaVA `conversations` list → Tokenized (ids with N_img slots, labels).

  label_rule: "reference" (the released pipeline's token counting) or "spans" (character
  overlap with the answers); see the module docstring.
  """
  turns = normalize_conversation(conversations, has_image)
  if template == "llama3":
    text, spans = render_llama3(turns)
  elif template == "plain":
    text, spans = render_plain(turns)
  else:
    raise ValueError(f"data.template must be 'llama3' or 'plain', got {template!r}")
  ids, labels = tokenize(text, spans, tokenizer, image_token_id)
  if label_rule == "reference" and template == "llama3":
    labels = reference_labels_llama3(text, ids, tokenizer, image_token_id, max_length)
  elif label_rule == "reference":
    labels = reference_labels_plain(ids, tokenizer, image_token_id)
  elif label_rule not in LABEL_RULES:
    raise ValueError(f"data.label_rule must be one of {LABEL_RULES}, got {label_rule!r}")
  if not double_bos:
    ids, labels = _single_bos(ids, labels, tokenizer.bos_token_id)
  ids, labels = expand_image_slots(ids, labels, image_token_id, num_image_tokens)
  ids, labels, truncated = fit_length(ids, labels, image_token_id, max_length, overlong)
  return Tokenized(ids, labels, int(has_image), truncated)


def shift_targets(tokenized: Tokenized) -> dict[str, np.ndarray]:
  """Model-side arrays of one sample, [L] each: tokens, targets (next id), loss_mask.

  targets[t] is the token at t+1 of the same sample and loss_mask[t] = 1 when the reference
  label at t+1 is supervised, so packed samples never predict across their boundary.
  """
  ids, labels = tokenized.ids, tokenized.labels
  supervised = np.append(labels[1:] != IGNORE_INDEX, False)
  nxt = np.append(ids[1:], 0)
  return {
      "tokens": ids.astype(np.int32),
      "targets": np.where(supervised, nxt, 0).astype(np.int32),
      "loss_mask": supervised.astype(np.float32),
  }
