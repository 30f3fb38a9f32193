"""lmms-eval's `infllava` model: the field's evaluation harness asking an `Assistant`.

  lmms-eval eval --model infllava --model_args checkpoint=runs/synthetic,batch_size=16 \\
      --tasks pope,mmmu_val
  infllava evaluate --checkpoint runs/synthetic --lmms pope,mmmu_val   # the same run

lmms-eval (`pip install -e '.[lmms]'`, then `pip install --no-deps lmms-eval==0.7.3`; see
README) finds this model through the package's `lmms_eval.models` entry point (`manifest`).
It is a "simple" model: a task's `doc_to_text` (its options and post-prompt included) is the
question, asked in our llama3 template with the task's image, as `infllava evaluate` asks.

model_args: checkpoint (required), step, dtype, quantize (int8 / int4 / nf4), tokenizer,
batch_size (default 8; from lmms-eval's command line its --batch_size, whose default is 1,
unless model_args gives one), length_bucket (default 64),
max_new_tokens (used when a task sets none; default 128), multi_image ("error", the
default: refuse a question with several images; "first": ask about its first image), seed.

Generation kwargs a task passes: max_new_tokens; temperature, do_sample, top_p, top_k
(greedy unless do_sample, or a temperature above 0 with do_sample unset, asks to sample;
do_sample=False is greedy whatever the temperature, as in Hugging Face); until (a string or
a list: the answer is cut before the first one). num_beams above 1 is refused; other keys
(image_aspect_ratio...) are ignored: images are preprocessed as in training. max_new_tokens
is cut to the positions a prompt leaves (LLaVA-W asks for 4096). Requests
are grouped by their kwargs, sorted by prompt length and asked in batches of batch_size
(the last padded with copies), so the compiled generations are reused across batches.

lmms-eval's `loglikelihood` (multiple_choice tasks, e.g. seedbench_ppl) is not supported:
every task of the paper's table generates (README).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Mapping, Sequence

from tqdm import tqdm

from infllava_jax import generate
from infllava_jax.data import images
from infllava_jax.errors import ConfigError
from infllava_jax.inference import Assistant
from infllava_jax.serve import stop_cut

MODEL_ID = "infllava"
DEFAULT_MAX_NEW_TOKENS = 128
MULTI_IMAGE = ("error", "first")
_IMAGE_FILES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class Request:
  """One lmms-eval generation request: its text, its visuals (doc_to_visual's list, [] or
  None for text-only) and its generation kwargs; `where` names it in errors."""
  text: str
  visuals: Sequence[Any] | None
  gen_kwargs: Mapping[str, Any]
  where: str


def stops(gen_kwargs: Mapping[str, Any]) -> tuple[str, ...]:
  """A task's `until`: a string or a list of them -> a tuple (empty strings dropped)."""
  until = gen_kwargs.get("until") or ()
  return tuple(s for s in ([until] if isinstance(until, str) else until) if s)


def sampling_for(gen_kwargs: Mapping[str, Any], default_max_new_tokens: int,
                 where: str = "request") -> generate.Sampling:
  """The `Sampling` a task's generation kwargs ask for (rules in the module docstring)."""
  if int(gen_kwargs.get("num_beams") or 1) > 1:
    raise ConfigError(f"{where}: num_beams={gen_kwargs['num_beams']}: beam search is not "
                      "supported (greedy or sampled decoding only)")
  temperature = float(gen_kwargs.get("temperature") or 0.0)
  do_sample = gen_kwargs.get("do_sample")
  sampled = bool(do_sample) if do_sample is not None else temperature > 0
  if sampled and temperature == 0:
    temperature = 1.0  # do_sample with no temperature: Hugging Face's default
  try:
    return generate.Sampling(
        max_new_tokens=int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
        temperature=temperature if sampled else 0.0,
        top_p=float(gen_kwargs.get("top_p") or 1.0) if sampled else 1.0,
        top_k=int(gen_kwargs.get("top_k") or 0) if sampled else 0)
  except ValueError as e:
    raise ConfigError(f"{where}: generation kwargs {dict(gen_kwargs)}: {e}") from None


def the_image(visuals: Sequence[Any] | None, multi_image: str, where: str):
  """The one image to ask about (None: text-only) from doc_to_visual's list: PIL images or
  image file paths; a video, an audio clip or (unless multi_image="first") several images
  are refused."""
  visuals = [v for v in (visuals or []) if v is not None]
  for visual in visuals:
    if isinstance(visual, str) and not visual.lower().endswith(_IMAGE_FILES):
      raise ConfigError(f"{where}: visual {visual!r} is not an image (video and audio are "
                        "not supported)")
  if len(visuals) > 1 and multi_image != "first":
    raise ConfigError(f"{where}: {len(visuals)} images, and the model takes one per "
                      "question; model_args multi_image=first asks about the first")
  return images.decode(visuals[0]) if visuals else None


class Harness:
  """Answers lmms-eval's generation requests with an `Assistant`, in padded batches."""

  def __init__(self, assistant: Assistant, batch_size: int = 8,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, multi_image: str = "error",
               seed: int = 0, progress: bool = True):
    if batch_size < 1 or max_new_tokens < 1:
      raise ConfigError(f"infllava model_args: batch_size and max_new_tokens must be >= 1, "
                        f"got {batch_size} and {max_new_tokens}")
    if multi_image not in MULTI_IMAGE:
      raise ConfigError(f"infllava model_args: multi_image must be one of {MULTI_IMAGE}, "
                        f"got {multi_image!r}")
    self.assistant, self.batch_size = assistant, batch_size
    self.max_new_tokens, self.multi_image = max_new_tokens, multi_image
    self.seed, self.progress = seed, progress
    self.batches = 0  # generate calls so far: the sampling seed of each is seed + this

  def fitted(self, sampling: generate.Sampling, request: Request) -> generate.Sampling:
    """`sampling` with max_new_tokens cut to the positions the prompt leaves (a task's
    generous limit, such as LLaVA-W's 4096, is a bound, not a length to reach)."""
    has_image = any(v is not None for v in (request.visuals or []))
    try:
      prompt = self.assistant.prompt(request.text, has_image=has_image)
    except ValueError as e:  # the image marker in the text
      raise ConfigError(f"{request.where}: {e}") from None
    room = self.assistant.context_length - len(prompt)
    if room < 1:
      raise ConfigError(f"{request.where}: the prompt fills the model's "
                        f"{self.assistant.context_length} positions")
    if sampling.max_new_tokens <= room:
      return sampling
    return dataclasses.replace(sampling, max_new_tokens=room)

  def answer(self, requests: Sequence[Request]) -> list[str]:
    """One answer per request, in their order (each cut at its first `until` string)."""
    groups: dict[tuple, list[int]] = {}
    plans = []
    for i, q in enumerate(requests):
      sampling = self.fitted(sampling_for(q.gen_kwargs, self.max_new_tokens, q.where), q)
      plans.append((sampling, stops(q.gen_kwargs)))
      groups.setdefault(dataclasses.astuple(sampling), []).append(i)
    answers: list[str | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="infllava", unit="q", file=sys.stderr,
               disable=not self.progress, dynamic_ncols=True)
    try:
      for rows in groups.values():
        rows.sort(key=lambda i: len(requests[i].text))  # nearby lengths share a bucket
        for lo in range(0, len(rows), self.batch_size):
          chunk = rows[lo:lo + self.batch_size]
          pictures = [the_image(requests[i].visuals, self.multi_image, requests[i].where)
                      for i in chunk]
          texts = [requests[i].text for i in chunk]
          pad = self.batch_size - len(chunk)
          outputs = self.assistant.ask_batch(pictures + pictures[-1:] * pad,
                                             texts + texts[-1:] * pad, plans[chunk[0]][0],
                                             seed=self.seed + self.batches)
          self.batches += 1
          for i, text in zip(chunk, outputs):
            cut = stop_cut(text, plans[i][1])
            answers[i] = text if cut is None else text[:cut]
          bar.update(len(chunk))
    finally:
      bar.close()
    return answers


def load(checkpoint: str, step: int | None = None, dtype: str | None = None,
         quantize: str | None = None, tokenizer: str | None = None,
         length_bucket: int = 64) -> Assistant:
  """The Assistant for model_args' checkpoint, step, dtype, quantize, tokenizer."""
  from infllava_jax.data.tokenizer import load_tokenizer
  try:
    return Assistant.from_run(str(checkpoint), None if step is None else int(step),
                              dtype=dtype, quantize=quantize, length_bucket=int(length_bucket),
                              tokenizer=load_tokenizer(tokenizer) if tokenizer else None)
  except (FileNotFoundError, ValueError) as e:  # no checkpoint; a dtype, quantize or
    # tokenizer that does not fit it
    raise ConfigError(f"infllava model_args checkpoint={checkpoint}: {e}") from None


def _request(request, task_dict) -> Request:
  """A simple model's request, args (context, gen_kwargs, doc_to_visual, doc_id, task,
  split), as a Request."""
  context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
  return Request(context, doc_to_visual(task_dict[task][split][doc_id]), gen_kwargs,
                 f"task {task} doc {doc_id}")


@functools.cache
def model_class() -> type:
  """The lmms-eval model class (built on first use: lmms-eval is an optional extra)."""
  from lmms_eval.api.model import lmms

  class InfLLaVA(lmms):
    """lmms-eval's `infllava` model (the module docstring lists its model_args)."""
    is_simple = True

    def __init__(self, checkpoint: str | None = None, step: int | None = None,
                 dtype: str | None = None,
                 quantize: str | None = None, tokenizer: str | None = None,
                 batch_size: int | str | None = 8, length_bucket: int = 64,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, multi_image: str = "error",
                 seed: int = 0, assistant: Assistant | None = None, **ignored):
      """`assistant`: one already loaded (from Python), in place of checkpoint's. lmms-eval
      passes device and max_batch_size too: the model runs on JAX's devices."""
      super().__init__()
      unknown = set(ignored) - {"device", "max_batch_size"}
      if unknown:
        raise ConfigError(f"infllava model_args: unknown {sorted(unknown)}; known: "
                          "checkpoint, step, dtype, quantize, tokenizer, batch_size, "
                          "length_bucket, max_new_tokens, multi_image, seed")
      numbers = {"batch_size": batch_size or 8, "length_bucket": length_bucket,
                 "max_new_tokens": max_new_tokens, "seed": seed}
      bad = {k: v for k, v in numbers.items() if not str(v).isdigit()}
      if bad:
        raise ConfigError(f"infllava model_args: expected whole numbers, got {bad}")
      if assistant is None:
        if checkpoint is None:
          raise ConfigError("infllava model_args: checkpoint=DIR is required (a training "
                            "run or a converted checkpoint)")
        assistant = load(checkpoint, step, dtype, quantize, tokenizer, int(length_bucket))
      self.harness = Harness(assistant, int(numbers["batch_size"]), int(max_new_tokens),
                             multi_image, int(seed))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
      """model_args win over lmms-eval's own --batch_size (whose default, 1, is always
      passed), which lmms' version would reject as a duplicate."""
      from lmms_eval import utils
      given = {k: v for k, v in (additional_config or {}).items() if v is not None}
      return cls(**{**given, **utils.simple_parse_args_string(arg_string)})

    def generate_until(self, requests) -> list[str]:
      return self.harness.answer([_request(r, self.task_dict) for r in requests])

    def loglikelihood(self, requests):
      raise NotImplementedError(
          "infllava: loglikelihood (multiple_choice tasks such as seedbench_ppl) is not "
          "supported; use the generating task (seedbench)")

    def generate_until_multi_round(self, requests):
      raise NotImplementedError("infllava: multi-round generation is not supported")

  InfLLaVA.__module__ = __name__
  InfLLaVA.__qualname__ = "InfLLaVA"
  return InfLLaVA


def task_manager(tasks: Sequence[str], include_path: str | None = None):
  """lmms-eval's TaskManager that knows `tasks`, or a ConfigError naming those it lacks.

  include_path: a folder of task YAMLs beside lmms-eval's own (its --include_path); when
  it holds every task asked for, lmms-eval's ~2,000 are not indexed (about 9 s).
  """
  from lmms_eval.tasks import TaskManager

  manager = None
  if include_path:
    manager = TaskManager("WARNING", include_path, include_defaults=False, model_name=MODEL_ID)
  if manager is None or not set(tasks) <= set(manager.all_tasks):
    manager = TaskManager("WARNING", include_path=include_path, model_name=MODEL_ID)
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise ConfigError(f"--lmms: no lmms-eval task named {', '.join(unknown)} (`lmms-eval "
                      "tasks` lists them)")
  return manager


def evaluate(assistant: Assistant, tasks: Sequence[str], batch_size: int = 8,
             limit: int | None = None, include_path: str | None = None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, multi_image: str = "error",
             progress: bool = True, manager=None) -> dict:
  """lmms-eval's `simple_evaluate` of `tasks` with this model on `assistant`: its results
  dict ("results" per task and metric, "samples" per task with each doc's answers).
  `manager`: `task_manager(tasks, include_path)`'s, if already made."""
  from lmms_eval.evaluator import simple_evaluate

  manager = manager or task_manager(tasks, include_path)
  model = model_class()(checkpoint=None, assistant=assistant, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, multi_image=multi_image)
  model.harness.progress = progress
  return simple_evaluate(model=model, tasks=list(tasks), limit=limit, log_samples=True,
                         task_manager=manager, verbosity="WARNING")


_TASK_YAML = """\
task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_visual: !function {name}_visual.doc_to_visual
doc_to_text: "{{{{prompt}}}}"
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
"""

_TASK_VISUAL = """\
def doc_to_visual(doc):
  return [doc["image"].convert("RGB")] if doc["image"] is not None else []
"""


def write_task(folder: str, name: str, questions: Sequence[Any],
               max_new_tokens: int) -> str:
  """An lmms-eval task of `questions` (`records.Question`s of kind "exact", such as
  `evaluate.synthetic.questions`) in `folder` (for --lmms-include): NAME.yaml, NAME.parquet
  (columns id, prompt, answer, image: the images inside) and NAME_visual.py; greedy, scored
  by exact match ignoring case, as `infllava evaluate` scores them. Returns the YAML's path."""
  import datasets
  os.makedirs(folder, exist_ok=True)
  data = os.path.join(folder, f"{name}.parquet")
  table = datasets.Dataset.from_dict({
      "id": [q.id for q in questions], "prompt": [q.prompt for q in questions],
      "answer": [q.answer for q in questions],
      "image": [None if q.image is None else images.decode(q.image) for q in questions]})
  table.cast_column("image", datasets.Image()).to_parquet(data)
  with open(os.path.join(folder, f"{name}_visual.py"), "w", encoding="utf-8") as f:
    f.write(_TASK_VISUAL)
  path = os.path.join(folder, f"{name}.yaml")
  with open(path, "w", encoding="utf-8") as f:
    f.write(_TASK_YAML.format(name=name, data=data, cache=os.path.join(folder, "cache"),
                              max_new_tokens=max_new_tokens))
  return path


def sample_lines(results: dict) -> list[dict]:
  """One line per question asked: task, doc_id, target, output, and its metrics."""
  lines = []
  for task, samples in results.get("samples", {}).items():
    metrics = results["higher_is_better"].get(task, {})
    for sample in samples:
      output = sample["filtered_resps"][0]
      lines.append({"task": task, "doc_id": sample["doc_id"], "target": sample["target"],
                    "output": output if isinstance(output, str) else str(output),
                    "metrics": {m: sample[m] for m in metrics if m in sample}})
  return lines


def write(results: dict, results_path: str, samples_path: str, run: dict | None = None
          ) -> None:
  """lmms-eval's results ("results", "n-samples", "higher_is_better", "versions",
  "lmms_eval_version"), and `run` (what was evaluated, how) as JSON; `sample_lines` as
  JSON Lines."""
  from lmms_eval.utils import handle_non_serializable
  kept = {k: results[k] for k in ("results", "n-samples", "higher_is_better", "versions",
                                  "lmms_eval_version") if k in results}
  kept.update(run or {})
  with open(results_path, "w", encoding="utf-8") as f:
    json.dump(kept, f, indent=2, ensure_ascii=False, default=handle_non_serializable)
  with open(samples_path, "w", encoding="utf-8") as f:
    for line in sample_lines(results):
      f.write(json.dumps(line, ensure_ascii=False, default=handle_non_serializable) + "\n")


def table(results: dict) -> str:
  """lmms-eval's markdown table of the results."""
  from lmms_eval.utils import make_table
  return make_table(results)


def manifest():
  """The `lmms_eval.models` entry point: this model's registration."""
  from lmms_eval.models.registry_v2 import ModelManifest
  return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.InfLLaVA")


def __getattr__(name: str):
  if name == "InfLLaVA":  # the class path `manifest` names, built on first access
    return model_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
