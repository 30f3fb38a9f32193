"""Templates, tokenisation and label masks: docs/fidelity.md#llama3-template to #plain-template, and the token-layout vector (#test-vectors)."""

import numpy as np
import pytest

from infllava_jax.data import templates as T
from infllava_jax.data.tokenizer import load_tokenizer

IMG = -200


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


def ids(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


def special(tok, name):
  return tok.convert_tokens_to_ids(name)


def llama3(tok, conv, n_img=1, has_image=True, **kw):
  kw.setdefault("max_length", 2048)
  return T.tokenize_conversation(conv, has_image=has_image, template="llama3", tokenizer=tok,
                                 image_token_id=IMG, num_image_tokens=n_img, **kw)


def test_one_turn_layout_and_labels(tok):
  bos, sh, eh, eot = (special(tok, s) for s in ("<|begin_of_text|>", "<|start_header_id|>",
                                                 "<|end_header_id|>", "<|eot_id|>"))
  nn, n = ids(tok, "\n\n"), ids(tok, "\n")
  assert len(nn) == 1 and len(n) == 1  # like LLaMA-3's 271 and 198
  conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
  out = llama3(tok, conv)
  expected = ([bos, bos, sh] + ids(tok, "system") + [eh] + ids(tok, "\n\n" + T.LLAMA3_SYSTEM)
              + [eot, sh] + ids(tok, "user") + [eh] + nn + [IMG] + n + ids(tok, "What is it?")
              + [eot, sh] + ids(tok, "assistant") + [eh] + nn + ids(tok, "A cat.") + [eot])
  assert out.ids.tolist() == expected
  answer = ids(tok, "A cat.") + [eot]
  k = len(answer)
  assert out.labels[-k:].tolist() == answer
  assert (out.labels[:-k] == T.IGNORE_INDEX).all()
  # N_img slots: the length grows by N_img - 1, slots unsupervised, "\n" right after them.
  big = llama3(tok, conv, n_img=36)
  assert len(big.ids) == len(out.ids) + 35
  slots = np.flatnonzero(big.ids == IMG)
  assert slots.tolist() == list(range(slots[0], slots[0] + 36))
  assert (big.labels[slots] == T.IGNORE_INDEX).all()
  assert big.ids[slots[-1] + 1] == n[0]
  assert big.num_images == 1


def test_double_bos_switch(tok):
  conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
  kept, single = llama3(tok, conv), llama3(tok, conv, double_bos=False)
  assert single.ids.tolist() == kept.ids.tolist()[1:]
  assert single.labels.tolist() == kept.labels.tolist()[1:]
  assert single.ids[1] != tok.bos_token_id


def test_multi_turn_supervises_each_answer_and_its_eot(tok):
  eot = special(tok, "<|eot_id|>")
  conv = [{"from": "human", "value": "What is it? <image>"}, {"from": "gpt", "value": "A cat."},
          {"from": "human", "value": "Where is the dog?"}, {"from": "gpt", "value": "No."},
          {"from": "human", "value": "How many objects are there?"},
          {"from": "gpt", "value": "Two people"}]
  out = llama3(tok, conv)
  supervised = out.labels[out.labels != T.IGNORE_INDEX].tolist()
  assert supervised == (ids(tok, "A cat.") + [eot] + ids(tok, "No.") + [eot]
                        + ids(tok, "Two people") + [eot])
  # Supervised labels equal the ids at their positions.
  mask = out.labels != T.IGNORE_INDEX
  assert (out.labels[mask] == out.ids[mask]).all()
  # <image> moved to the front of its message: the slot follows the user header's "\n\n".
  slot = int(np.flatnonzero(out.ids == IMG)[0])
  assert out.ids[slot - 1] == ids(tok, "\n\n")[0]
  assert out.ids[slot + 1:slot + 1 + len(ids(tok, "\nWhat is it?"))].tolist() == ids(
      tok, "\nWhat is it?")


def test_leading_gpt_message_is_dropped(tok):
  conv = [{"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Is there a person?"},
          {"from": "gpt", "value": "Yes."}]
  out = llama3(tok, conv, has_image=False)
  assert out.ids.tolist() == llama3(tok, conv[1:], has_image=False).ids.tolist()


def test_text_only_sample(tok):
  eot = special(tok, "<|eot_id|>")
  conv = [{"from": "human", "value": "Is there a person?"}, {"from": "gpt", "value": "Yes."}]
  out = llama3(tok, conv, has_image=False)
  assert IMG not in out.ids and out.num_images == 0
  assert out.ids[:2].tolist() == [tok.bos_token_id] * 2
  assert out.labels[out.labels != T.IGNORE_INDEX].tolist() == ids(tok, "Yes.") + [eot]


def test_plain_template(tok):
  conv = [{"from": "human", "value": "Describe the picture.\n<image>"},
          {"from": "gpt", "value": "A small red car."}]
  out = T.tokenize_conversation(conv, has_image=True, template="plain", tokenizer=tok,
                                image_token_id=IMG, num_image_tokens=1, max_length=2048)
  caption = ids(tok, "A small red car.\n")
  assert out.ids.tolist() == [tok.bos_token_id, IMG] + caption
  assert out.labels.tolist() == [T.IGNORE_INDEX] * 2 + caption
  with pytest.raises(T.SampleError, match="plain template needs an image"):
    T.render_plain([("human", "Describe the picture."), ("gpt", "A small red car.")])


def test_generation_prompt_ends_with_assistant_header():
  text, spans = T.render_llama3([("human", "<image>\nWhat is it?"), ("gpt", None)])
  assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
  assert spans == []


def test_truncation_keeps_image_slots_and_counts(tok):
  conv = [{"from": "human", "value": "<image>\nWhat is it?"},
          {"from": "gpt", "value": "The quick brown fox jumps over the lazy dog. " * 4}]
  full = llama3(tok, conv, n_img=8)
  cut = llama3(tok, conv, n_img=8, max_length=len(full.ids) - 5)
  assert cut.truncated and not full.truncated
  assert cut.ids.tolist() == full.ids.tolist()[:-5]
  with pytest.raises(T.OverlongError, match="drop"):
    llama3(tok, conv, n_img=8, max_length=len(full.ids) - 5, overlong="drop")
  slot_end = int(np.flatnonzero(full.ids == IMG)[-1]) + 1
  with pytest.raises(T.OverlongError, match="cut into"):
    llama3(tok, conv, n_img=8, max_length=slot_end - 1)
  assert llama3(tok, conv, n_img=8, max_length=slot_end).truncated


def test_shift_targets_supervise_next_token(tok):
  conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
  out = llama3(tok, conv, n_img=4)
  arrays = T.shift_targets(out)
  mask = arrays["loss_mask"].astype(bool)
  assert arrays["loss_mask"].dtype == np.float32 and arrays["tokens"].dtype == np.int32
  assert mask.tolist() == (np.append(out.labels[1:], T.IGNORE_INDEX) != T.IGNORE_INDEX).tolist()
  assert arrays["targets"][mask].tolist() == out.labels[1:][mask[:-1]].tolist()
  assert not mask[-1] and (arrays["targets"][~mask] == 0).all()
  # The last prompt token (the assistant header's "\n\n") predicts the first answer token.
  first = int(np.flatnonzero(mask)[0])
  assert arrays["tokens"][first] == ids(tok, "\n\n")[0]


@pytest.mark.parametrize("conv, has_image, reason", [
    ([], True, "empty"),
    ([{"from": "human", "value": "hi"}, {"from": "human", "value": "again"}], False,
     "roles do not alternate"),
    ([{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A cat."}], True,
     "has an image but its conversation holds 0"),
    ([{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}], False,
     "holds '<image>' but the record has no image"),
    ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], True,
     "holds 2"),
    ([{"from": "human", "value": "What?"}], False, "ends with a human turn"),
    ([{"from": "robot", "value": "x"}], False, "is not"),
])
def test_bad_conversations(tok, conv, has_image, reason):
  with pytest.raises(T.SampleError, match=reason):
    llama3(tok, conv, has_image=has_image)


# The reference's label rule, written out from its published description (LLaVA's
# conv_llama3 prompt, `tokenizer_image_token` and `preprocess_llama3`), as an oracle.

def oracle_prompt(conversation):
  """conv_llama3.get_prompt() after preprocess_multimodal (LLaVA's conversation.py, train.py)."""
  messages = [dict(m) for m in conversation]
  if messages[0]["from"] == "gpt":
    messages = messages[1:]
  prompt = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            + T.LLAMA3_SYSTEM + "<|eot_id|>")
  for m in messages:
    value = m["value"]
    if "<image>" in value:
      value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
    role = {"human": "user", "gpt": "assistant"}[m["from"]]
    prompt += f"<|start_header_id|>{role}<|end_header_id|>\n\n{value}<|eot_id|>"
  return prompt


def oracle_tokenizer_image_token(prompt, tok):
  chunks = [tok(chunk).input_ids for chunk in prompt.split("<image>")]
  input_ids, offset = [], 0
  if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
    offset = 1
    input_ids.append(chunks[0][0])
  separated = [x for pair in zip(chunks, [[IMG] * (offset + 1)] * len(chunks)) for x in pair]
  for x in separated[:-1]:
    input_ids.extend(x[offset:])
  return input_ids


def oracle_preprocess_llama3(conversation, tok, has_image, model_max_length=2048):
  conversation_text = oracle_prompt(conversation)
  if has_image:
    input_ids = oracle_tokenizer_image_token(conversation_text, tok)
  else:
    input_ids = tok(conversation_text, max_length=model_max_length, truncation=True).input_ids
  target = list(input_ids)
  sep = "<|eot_id|>"
  sep2 = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
  total_len = len(target)
  rounds = conversation_text.split(sep)
  re_rounds = [sep.join(rounds[:3])]
  for conv_idx in range(3, len(rounds), 2):
    re_rounds.append(sep.join(rounds[conv_idx:conv_idx + 2]))
  cur_len = 0
  for i, rou in enumerate(re_rounds):
    if rou == "":
      break
    parts = rou.split(sep2)
    if len(parts) != 2:
      break
    parts[0] += sep2
    if has_image:
      round_len = len(oracle_tokenizer_image_token(rou, tok)) + 1
      instruction_len = len(oracle_tokenizer_image_token(parts[0], tok))
    else:
      round_len = len(tok(rou).input_ids) + 1
      instruction_len = len(tok(parts[0]).input_ids)
    if i > 0:
      round_len -= 1
      instruction_len -= 1
    target[cur_len:cur_len + instruction_len] = [T.IGNORE_INDEX] * len(
        target[cur_len:cur_len + instruction_len])
    cur_len += round_len
  target[cur_len:] = [T.IGNORE_INDEX] * len(target[cur_len:])
  if cur_len < model_max_length and cur_len != total_len:  # "tokenization mismatch"
    target = [T.IGNORE_INDEX] * len(target)
  return input_ids, target


@pytest.fixture(scope="module")
def newline_tok(tmp_path_factory):
  """A tiny BPE that, like LLaMA-3, has one token for "\\n\\n\\n"."""
  from infllava_jax.data import build_tokenizer
  folder = str(tmp_path_factory.mktemp("newline_tokenizer"))
  texts = build_tokenizer.corpus() + ["Why?\n\n\nBecause.\n\n\n"] * 30
  build_tokenizer.save(build_tokenizer.build(texts), folder)
  tok = load_tokenizer(folder)
  assert len(ids(tok, "\n\n\n")) == 1 and len(ids(tok, "\n\n")) == 1
  return tok


def _qa(*messages):
  return [{"from": "human" if i % 2 == 0 else "gpt", "value": m} for i, m in enumerate(messages)]


ORACLE_CASES = {
    "one turn": (_qa("<image>\nWhat is it?", "A cat."), True),
    "multi-turn, image last in its message": (
        _qa("What is it? <image>", "A cat.", "Where is the dog?", "No.", "And?", "Two"), True),
    "text only": (_qa("Is there a person?", "Yes."), False),
    "leading gpt message": ([{"from": "gpt", "value": "Hi"}] + _qa("Is it?", "Yes."), False),
    "answer starting with a newline": (_qa("<image>\nWhat?", "\nA cat.\n"), True),
    "newline answers in later rounds": (
        _qa("Why?", "\nBecause.", "Sure?", "\n\nYes.", "Why?\n", "\n\n\nNo."), False),
    "tokenization mismatch (a literal <|eot_id|> in a message)": (
        _qa("<image>\nSay <|eot_id|> please.", "<|eot_id|>"), True),
    "an answer holding the assistant header": (
        _qa("Hi", "a<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nb"), False),
}


@pytest.mark.parametrize("name", sorted(ORACLE_CASES))
@pytest.mark.parametrize("which", ["shipped", "newline"])
def test_labels_equal_the_reference_rule(tok, newline_tok, name, which):
  conv, has_image = ORACLE_CASES[name]
  tokenizer = tok if which == "shipped" else newline_tok
  out = llama3(tokenizer, conv, has_image=has_image)
  expected_ids, expected_labels = oracle_preprocess_llama3(conv, tokenizer, has_image)
  assert out.ids.tolist() == expected_ids
  assert out.labels.tolist() == expected_labels


def test_merged_newline_token_is_masked_by_the_reference_rule_only(newline_tok):
  conv = _qa("<image>\nWhat?", "\nA cat.")
  merged = ids(newline_tok, "\n\n\n")[0]
  reference, spans = llama3(newline_tok, conv), llama3(newline_tok, conv, label_rule="spans")
  assert reference.ids.tolist() == spans.ids.tolist()
  at = int(np.flatnonzero(reference.ids == merged)[0])
  assert reference.labels[at] == T.IGNORE_INDEX and spans.labels[at] == merged
  differ = np.flatnonzero(reference.labels != spans.labels)
  assert differ.tolist() == [at]


def test_mismatch_masks_the_whole_sample_below_max_length(tok):
  out = llama3(tok, ORACLE_CASES["tokenization mismatch (a literal <|eot_id|> in a message)"][0])
  assert (out.labels == T.IGNORE_INDEX).all()
  # The rounds' count stops short of the end (the answer's literal <|eot_id|> starts a
  # round without a header): the whole sample is masked...
  conv = _qa("Say it.", "Fine " * 10 + "<|eot_id|>b")
  full = llama3(tok, conv, has_image=False)
  assert (full.labels == T.IGNORE_INDEX).all()
  # ...unless the count reaches max_length: the reference checks it below its
  # model_max_length only (text-only samples are cut there), and keeps the answer's labels.
  max_length = len(full.ids) - 3
  expected_ids, expected_labels = oracle_preprocess_llama3(conv, tok, False, max_length)
  cut = llama3(tok, conv, has_image=False, max_length=max_length)
  assert cut.truncated and cut.ids.tolist() == expected_ids
  assert cut.labels.tolist() == expected_labels
  assert (cut.labels != T.IGNORE_INDEX).sum() > 10


def test_plain_labels_mask_bos_and_image_only(tok):
  conv = _qa("<image>\nDescribe.", "A small red car.")
  for rule in ("reference", "spans"):
    out = T.tokenize_conversation(conv, has_image=True, template="plain", tokenizer=tok,
                                  image_token_id=IMG, num_image_tokens=1, max_length=2048,
                                  label_rule=rule)
    assert out.labels[:2].tolist() == [T.IGNORE_INDEX] * 2
    assert out.labels[2:].tolist() == out.ids[2:].tolist()
