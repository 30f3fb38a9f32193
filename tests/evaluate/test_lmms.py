"""lmms-eval with the `infllava` model (in-process) and with its `openai` model against
`infllava serve`, on a local task made from the synthetic held-out split: the same answers
and accuracy as `infllava evaluate --benchmark synthetic`. Offline: the task reads a parquet
file written here."""

import dataclasses
import importlib.metadata
import json
import os
import tomllib

import pytest

# Before datasets is imported (it reads them once): no hub, no telemetry.
for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
             "HF_HUB_DISABLE_TELEMETRY"):
  os.environ[name] = "1"
os.environ["WANDB_MODE"] = "disabled"

lmms_eval = pytest.importorskip("lmms_eval", reason="the [lmms] extra and lmms-eval (README)")
pytest.importorskip("filelock._api", reason="lmms-eval 0.7.3 needs filelock < 4 ([lmms] pins it)")

import datasets  # noqa: E402
import lmms_eval.evaluator  # noqa: E402
import lmms_eval.tasks  # noqa: E402
from PIL import Image  # noqa: E402

from infllava_jax import generate, serve  # noqa: E402
from infllava_jax.checkpoints import converted  # noqa: E402
from infllava_jax.errors import ConfigError  # noqa: E402
from infllava_jax.evaluate import cli, lmms, synthetic  # noqa: E402
from infllava_jax.inference import Assistant  # noqa: E402
from tests.random_params import random_params  # noqa: E402
from tests.test_serve import serving  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM = 6  # held-out records asked
MAX_NEW_TOKENS = 8  # the tiny config's eval.max_new_tokens, the synthetic benchmark's
BATCH = 8  # `infllava evaluate`'s default batch size: every route but the server's shares
# one compiled generation

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config):
  """A tiny random checkpoint whose answers differ from image to image."""
  path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
  converted.save_converted(path, tiny_config.model, random_params(tiny_config.model, std=0.05))
  return path


@pytest.fixture(scope="module")
def assistant(checkpoint):
  return Assistant.from_run(checkpoint)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory, assistant):
  """A task folder: synthetic_heldout, the first NUM held-out records as `infllava evaluate`
  asks them (images inside its parquet)."""
  folder = str(tmp_path_factory.mktemp("tasks"))
  lmms.write_task(folder, "synthetic_heldout", synthetic.questions(assistant.config, NUM),
                  MAX_NEW_TOKENS)
  return folder


def answers(results, task="synthetic_heldout"):
  """doc_id -> (output, exact_match) of an lmms-eval run."""
  return {s["doc_id"]: (s["filtered_resps"][0], float(s["exact_match"]))
          for s in results["samples"][task]}


def test_in_process_server_and_evaluate_give_the_same_answers(checkpoint, assistant, heldout,
                                                              tmp_path, capsys):
  # (a) `infllava evaluate --lmms`: the in-process model (one batch, padded).
  out = str(tmp_path / "lmms")
  assert cli.main(["--checkpoint", checkpoint, "--lmms", "synthetic_heldout", "--lmms-include",
                   heldout, "--batch-size", str(BATCH), "--out", out, "--no-progress"]) == 0
  with open(os.path.join(out, "lmms_results.json")) as f:
    written = json.load(f)
  in_process = written["results"]["synthetic_heldout"]
  assert (written["checkpoint"], written["dtype"], written["batch_size"]) == (
      os.path.abspath(checkpoint), "float32", BATCH)
  with open(os.path.join(out, "lmms_samples.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert "synthetic_heldout" in capsys.readouterr().out  # lmms-eval's table
  assert [line["doc_id"] for line in lines] == list(range(NUM))

  # (b) lmms-eval's `openai` model against `infllava serve` (images as base64 data URLs).
  with serving(serve.create_app(assistant, "tiny")) as port:
    served = lmms_eval.evaluator.simple_evaluate(
        model="openai", model_args=f"model=tiny,base_url=http://127.0.0.1:{port}/v1,"
                                   "api_key=none,num_concurrent=1,timeout=600,max_retries=1",
        tasks=["synthetic_heldout"], log_samples=True, verbosity="WARNING",
        task_manager=lmms_eval.tasks.TaskManager("WARNING", include_path=heldout,
                                                  include_defaults=False))

  # (c) `infllava evaluate --benchmark synthetic` on the same records.
  reference = str(tmp_path / "synthetic")
  assert cli.main(["--checkpoint", checkpoint, "--benchmark", "synthetic", "--limit", str(NUM),
                   "--max-new-tokens", str(MAX_NEW_TOKENS), "--out", reference,
                   "--no-progress"]) == 0
  with open(os.path.join(reference, "predictions.jsonl")) as f:
    predictions = [json.loads(line) for line in f]
  with open(os.path.join(reference, "summary.json")) as f:
    summary = json.load(f)

  expected = [(p["output"], float(p["correct"])) for p in predictions]
  assert len(set(expected)) > 1  # the answers depend on the image: a mix-up would show
  assert [(line["output"], line["metrics"]["exact_match"]) for line in lines] == expected
  assert [answers(served)[i] for i in range(NUM)] == expected
  assert [line["target"] for line in lines] == [p["answer"] for p in predictions]
  assert (in_process["exact_match,none"] == served["results"]["synthetic_heldout"][
      "exact_match,none"] == summary["accuracy"])


SQA_DOCS = [  # ScienceQA-IMG's columns
    {"question": "Which is the hottest?", "choices": ["50°C", "50°F", "5°C"], "answer": 0,
     "hint": "Select the best estimate.", "colour": (200, 30, 30)},
    {"question": "Which state is this?", "choices": ["Ohio", "Utah"], "answer": 1, "hint": "",
     "colour": (30, 30, 200)},
]


def scienceqa_task(folder) -> str:
  """lmms-eval's own scienceqa_img task (its YAML and prompt functions), reading a local
  parquet of SQA_DOCS in place of the hub's."""
  source = os.path.join(os.path.dirname(lmms_eval.tasks.__file__), "scienceqa",
                        "scienceqa_img.yaml")
  with open(source) as f:
    yaml_text = f.read()
  head = "dataset_path: lmms-lab-encoder/ScienceQA\ndataset_name: ScienceQA-IMG\n"
  assert yaml_text.startswith(head) and "dataset_kwargs:\n  token: True\n" in yaml_text
  data = os.path.join(folder, "sqa.parquet")
  yaml_text = ("dataset_path: parquet\n" + yaml_text[len(head):]).replace(
      'task: "scienceqa_img"', 'task: "local_scienceqa_img"').replace(
      "dataset_kwargs:\n  token: True\n",
      f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder}/cache\n")
  with open(os.path.join(folder, "local_scienceqa_img.yaml"), "w") as f:
    f.write(yaml_text)
  with open(os.path.join(folder, "utils.py"), "w") as f:
    f.write("from lmms_eval.tasks.scienceqa.utils import *  # noqa\n")
  table = datasets.Dataset.from_dict({
      **{k: [d[k] for d in SQA_DOCS] for k in ("question", "choices", "answer", "hint")},
      "image": [Image.new("RGB", (24, 16), d["colour"]) for d in SQA_DOCS]})
  table.cast_column("image", datasets.Image()).to_parquet(data)
  return str(folder)


class Recording:
  """An Assistant that records what each ask_batch call is given."""

  def __init__(self, inner):
    self.inner, self.calls = inner, []

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def ask_batch(self, image_list, questions, sampling=None, seed=0, **kwargs):
    self.calls.append((list(image_list), list(questions), sampling, seed))
    return self.inner.ask_batch(image_list, questions, sampling, seed, **kwargs)


def test_a_multiple_choice_prompt_reaches_the_model_as_lmms_eval_builds_it(assistant, tmp_path):
  recording = Recording(assistant)
  model = lmms.model_class()(checkpoint=None, assistant=recording, batch_size=2)
  folder = scienceqa_task(tmp_path)
  results = lmms_eval.evaluator.simple_evaluate(
      model=model, tasks=["local_scienceqa_img"], log_samples=True, verbosity="WARNING",
      task_manager=lmms_eval.tasks.TaskManager("WARNING", include_path=folder,
                                                include_defaults=False, model_name="infllava"))
  (pictures, questions, sampling, _), = recording.calls
  post = "\nAnswer with the option's letter from the given choices directly."
  expected = ["Which state is this?\nA. Ohio\nB. Utah" + post,  # shorter first
              "Context: Select the best estimate.\nWhich is the hottest?\nA. 50°C\nB. 50°F\n"
              "C. 5°C" + post]
  assert questions == expected
  assert [p.getpixel((0, 0)) for p in pictures] == [(30, 30, 200), (200, 30, 30)]
  assert sampling == generate.Sampling(max_new_tokens=16)  # the task's: greedy, 16 tokens
  by_doc = {s["doc_id"]: s["arguments"][0] for s in results["samples"]["local_scienceqa_img"]}
  assert by_doc == {0: expected[1], 1: expected[0]}  # lmms-eval's own record of the prompt


def request(gen_kwargs, question):
  return lmms.Request(question.prompt, [Image.fromarray(question.image)], gen_kwargs,
                      "test doc")


def test_generation_kwargs(assistant):
  recording = Recording(assistant)
  harness = lmms.Harness(recording, batch_size=BATCH, seed=5, progress=False)
  first, second = synthetic.questions(assistant.config, 2)
  greedy = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "do_sample": False}
  sampled = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.7, "top_p": 0.9,
             "top_k": 40, "do_sample": True}
  text_only = lmms.Request(first.prompt, [], greedy, "text-only doc")
  out = harness.answer([request(greedy, first), request(sampled, first), text_only,
                        request(greedy, second)])
  # One batch per distinct kwargs; the sampled one with its temperature, top_p and top_k.
  (greedy_images, _, greedy_sampling, seed_a), (_, _, sampled_sampling, seed_b) = (
      recording.calls)
  assert greedy_sampling == generate.Sampling(max_new_tokens=MAX_NEW_TOKENS)
  assert sampled_sampling == generate.Sampling(max_new_tokens=MAX_NEW_TOKENS, temperature=0.7,
                                               top_p=0.9, top_k=40)
  assert (seed_a, seed_b) == (5, 6)
  assert greedy_images[:3] != [None] * 3 and None in greedy_images[:3]  # text-only: no image
  assert [out[0], out[2], out[3]] == [
      assistant.ask(image, prompt, sampling=greedy_sampling)
      for image, prompt in ((first.image, first.prompt), (None, first.prompt),
                            (second.image, second.prompt))]
  assert out[1] == assistant.ask_batch([first.image] * BATCH, [first.prompt] * BATCH,
                                       sampled_sampling, seed=6)[0]

  # A temperature alone samples (lmms-eval's llava convention); do_sample=False wins.
  assert lmms.sampling_for({"temperature": 0.5}, 9).temperature == 0.5
  assert lmms.sampling_for({"temperature": 0.5, "do_sample": False}, 9) == (
      generate.Sampling(max_new_tokens=9))
  assert lmms.sampling_for({"do_sample": True}, 9).temperature == 1.0
  with pytest.raises(ConfigError, match="num_beams=3"):
    lmms.sampling_for({"num_beams": 3}, 9)
  with pytest.raises(ConfigError, match="test doc: generation kwargs .*top_p"):
    harness.answer([request({"do_sample": True, "top_p": 1.5}, first)])

  # A limit past the model's positions is cut to what the prompt leaves.
  room = assistant.context_length - len(assistant.prompt(first.prompt))
  assert harness.fitted(generate.Sampling(max_new_tokens=4096), request(greedy, first)) == (
      generate.Sampling(max_new_tokens=room))

  # `until` cuts the answer before its first stop string.
  full = out[0]
  stop = full[2:4]
  assert len(stop) == 2 and stop in full
  cut = harness.answer([request({**greedy, "until": [stop, "\u2603"]}, first),
                        request({**greedy, "until": stop}, first)])
  assert cut == [full[:full.index(stop)]] * 2


def test_visuals():
  red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
  assert lmms.the_image(None, "error", "d") is None and lmms.the_image([], "error", "d") is None
  assert lmms.the_image([red], "error", "d").getpixel((0, 0)) == (255, 0, 0)
  assert lmms.the_image([blue, red], "first", "d").getpixel((0, 0)) == (0, 0, 255)
  with pytest.raises(ConfigError, match="task t doc 3: 2 images.*multi_image=first"):
    lmms.the_image([red, blue], "error", "task t doc 3")
  with pytest.raises(ConfigError, match="clip.mp4' is not an image"):
    lmms.the_image(["clip.mp4"], "first", "d")


def test_write_task_keeps_images_and_text_only_questions(tmp_path):
  import numpy as np
  from infllava_jax.evaluate.records import Question
  pixels = np.random.default_rng(0).integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
  questions = [Question("a", pixels, "Colour?", "red", "c", kind="exact"),
               Question("b", None, "Two plus two?", "4", "c", kind="exact")]
  path = lmms.write_task(str(tmp_path), "mine", questions, 4)
  assert path == str(tmp_path / "mine.yaml")
  manager = lmms.task_manager(["mine"], str(tmp_path))
  task = lmms_eval.tasks.get_task_dict(["mine"], manager)["mine"]
  docs = list(task.test_docs())
  assert [task.doc_to_text(d) for d in docs] == ["Colour?", "Two plus two?"]
  assert [task.doc_to_target(d) for d in docs] == ["red", "4"]
  visuals = [task.doc_to_visual(d) for d in docs]
  assert (np.asarray(visuals[0][0]) == pixels).all() and visuals[1] == []


def test_lmms_flag_errors(checkpoint, heldout, tmp_path, capsys):
  from infllava_jax import cli as infllava
  evaluate = ["evaluate", "--checkpoint", checkpoint, "--out", str(tmp_path)]
  for flags, words in ((["--lmms", " ,"], "--lmms ' ,': expected task names"),
                       (["--lmms", "pope", "--data", heldout], "--data does not go with --lmms"),
                       (["--benchmark", "synthetic", "--lmms-include", heldout],
                        "--lmms-include and --multi-image go with --lmms")):
    with pytest.raises(SystemExit) as refused:
      infllava.main(evaluate + flags)
    assert refused.value.code == 2 and words in capsys.readouterr().err
  # An unknown task: one line, before the model loads.
  assert infllava.main(evaluate + ["--lmms", "synthetic_heldout,no_such_task",
                                   "--lmms-include", heldout]) == 2
  err = capsys.readouterr().err
  assert err.strip().splitlines()[-1] == (
      "infllava evaluate: error: --lmms: no lmms-eval task named no_such_task (`lmms-eval "
      "tasks` lists them)")
  assert "loaded" not in err and "Traceback" not in err


def test_registered_through_the_entry_point():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    points = tomllib.load(f)["project"]["entry-points"]["lmms_eval.models"]
  assert points == {"infllava": "infllava_jax.evaluate.lmms:manifest"}
  from lmms_eval.api.model import lmms as lmms_base
  from lmms_eval.models.registry_v2 import ModelRegistryV2
  registry = ModelRegistryV2()
  entry = importlib.metadata.EntryPoint("infllava", points["infllava"], "lmms_eval.models")
  registry.register_manifest(entry.load()())
  cls = registry.get_model_class("infllava")
  assert cls is lmms.model_class() and issubclass(cls, lmms_base) and cls.is_simple
  with pytest.raises(ConfigError, match=r"unknown \['colour'\]"):
    cls.create_from_arg_string("checkpoint=x,colour=red", {"batch_size": 1})
  with pytest.raises(ConfigError, match="checkpoint=DIR is required"):
    cls.create_from_arg_string("batch_size=4", {"batch_size": 1, "device": None})
  with pytest.raises(ConfigError, match="whole numbers, got {'batch_size': 'auto'}"):
    cls.create_from_arg_string("checkpoint=x", {"batch_size": "auto"})
  with pytest.raises(ConfigError, match="checkpoint=/nonexistent"):
    cls.create_from_arg_string("checkpoint=/nonexistent,batch_size=16", {"batch_size": 1})
