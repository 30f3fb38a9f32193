"""LoRA / QLoRA fine-tuning (`infllava_jax.lora.provider`) as users run it: from a main-job
checkpoint onto a changed synthetic task, against full fine-tuning."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import PartitionSpec as P

from infllava_jax import generate, inference, sharding
from infllava_jax.checkpoints import converted
from infllava_jax.checkpoints.init_sources import InitSource
from infllava_jax.checkpoints.params import ParamMismatchError
from infllava_jax.config import load_config
from infllava_jax.data import synthetic as synthetic_data
from infllava_jax.errors import ConfigError
from infllava_jax.evaluate import synthetic
from infllava_jax.inference import Assistant
from infllava_jax.lora import params as lora_params, provider as lora
from infllava_jax.model import infllava
from infllava_jax.training import loop, optim
from infllava_jax.training import state as state_lib

# The changed task: the same images and questions, the answer words swapped in pairs.
SWAPPED = {"horizontal": "vertical", "vertical": "horizontal", "checkered": "plain",
           "plain": "checkered"}
MAIN_STEPS, TUNE_STEPS, HELDOUT = 200, 60, 64
TRAINS_UNDER_LORA = r"(^dem/|^projector/|_lora_[ab]$)"


def _config(steps: int, **train):
  config = load_config("configs/synthetic.py", [
      f"--config.train.steps={steps}", f"--config.train.log_every={steps}",
      "--config.eval.heldout_examples=0", "--config.checkpoint.async_save=false",
      "--config.data.read_threads=1"])
  config.train.update(train)
  return config


def _lora_config(steps: int, **lora_fields):
  config = _config(steps, trainable=(r"^dem/", r"^projector/"))
  config.train.lora.update(dict(dict(enabled=True, rank=8), **lora_fields))
  return config


def _write_swapped_task(folder, num: int) -> tuple[str, str]:
  """The train split's first `num` pattern records with swapped answers, as a LLaVA JSON
  and an image folder."""
  images = folder / "images"
  images.mkdir(parents=True)
  records = []
  for r in synthetic_data.synthetic_examples("train", num, image_size=252, kinds=("pattern",)):
    name = f"{len(records)}.png"
    PIL.Image.fromarray(r["image"]).save(images / name)
    question, answer = r["conversations"]
    records.append({"id": r["id"], "image": name,
                    "conversations": [question, {**answer, "value": SWAPPED[answer["value"]]}]})
  json_path = folder / "swapped.json"
  json_path.write_text(json.dumps(records))
  return str(json_path), str(images)


def _on_swapped_task(config, json_path, images):
  config.data.update(dict(source="llava_json", json_path=json_path, image_folder=images))
  return config


def _train(config, workdir, init, until_step=None):
  trainer = loop.Trainer(config, str(workdir), init=[InitSource(str(init))],
                         devices=jax.devices()[:1])
  trainer.run(until_step)
  return trainer


def _merged(params, config):
  """The adapters folded into their kernels (`lora.params.merge`) and dropped."""
  return lora_params.merge(params, rank=config.train.lora.rank, alpha=config.train.lora.alpha)


def _accuracy(config, params) -> float:
  questions = synthetic.questions(config, HELDOUT)
  answers = Assistant(config, params).generate_batch(
      [q.image for q in questions], [q.prompt for q in questions],
      sampling=generate.Sampling(max_new_tokens=synthetic.max_new_tokens(config)))
  return float(np.mean([a.text.strip().lower() == SWAPPED[q.answer]
                        for a, q in zip(answers, questions)]))


def _changed(before, after) -> set[str]:
  a, b = flatten_dict(before, sep="/"), flatten_dict(after, sep="/")
  return {p for p in b if p not in a or not np.array_equal(np.asarray(a[p]), np.asarray(b[p]))}


def test_lora_fine_tuning_learns_a_changed_task_as_full_fine_tuning_does(tmp_path, capsys):
  """From a main job that answers the pattern questions, 60 steps onto the swapped answer
  words: LoRA (rank 8 on every LLM linear layer, the DEM and projector in full, the rest
  frozen, AdamW state for those only) reaches the held-out accuracy of fine-tuning the DEM,
  projector and LLM in full, within 0.02; only the adapters, DEM and projector change; the
  adapters merged into their kernels give the unmerged forward at 1e-5. An int8-base QLoRA
  run changes the same params only (its base is the main job's, quantised) and resumes."""
  main = tmp_path / "main"
  main_config = _config(MAIN_STEPS)
  trainer = loop.Trainer(main_config, str(main), devices=jax.devices()[:1])
  trainer.run()
  base = jax.device_get(trainer.state.params)
  task = _write_swapped_task(tmp_path / "task", 256)

  full_config = _on_swapped_task(_config(TUNE_STEPS), *task)
  full_config.train.trainable = (r"^dem/", r"^projector/", r"^llm/")
  full = jax.device_get(_train(full_config, tmp_path / "full", main).state.params)

  lora_config = _on_swapped_task(_lora_config(TUNE_STEPS), *task)
  tuned = _train(lora_config, tmp_path / "lora", main)
  # AdamW moments for the trainable leaves only: the frozen LLM and CLIP hold none.
  moments = {x.shape for x in jax.tree.leaves(tuned.state.opt_state) if x.ndim}
  trainable = [x.shape for x, m in zip(jax.tree.leaves(tuned.state.params),
                                       jax.tree.leaves(tuned.mask)) if m]
  assert sorted(moments) == sorted(set(trainable))
  assert len(jax.tree.leaves(tuned.state.opt_state)) < 3 * len(trainable) + 8
  tuned = jax.device_get(tuned.state.params)
  changed = _changed(base, tuned)
  assert changed and all(re.search(TRAINS_UNDER_LORA, p) for p in changed), sorted(changed)
  assert any("kernel_lora_b" in p for p in changed)

  # Merged equals unmerged, float32.
  model = infllava.build_model(lora_config.model)
  unmerged = lora.lora_model(model, lora_config.train.lora, training=False)
  tokens, pixels = infllava.dummy_inputs(lora_config.model, batch=2, length=48)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 500, tokens.shape), jnp.int32)
  pixels = jnp.asarray(np.random.default_rng(1).normal(size=pixels.shape), jnp.float32)
  want, _ = jax.jit(unmerged.apply)({"params": tuned}, tokens, pixels)
  got, _ = jax.jit(model.apply)({"params": _merged(tuned, lora_config)}, tokens, pixels)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  plain, _ = jax.jit(model.apply)({"params": _merged(base, lora_config)}, tokens, pixels)
  assert np.max(np.abs(np.asarray(plain) - np.asarray(want))) > 1e-3  # the adapters act

  full_accuracy = _accuracy(full_config, full)
  lora_accuracy = _accuracy(lora_config, _merged(tuned, lora_config))
  unmerged_accuracy = _accuracy(lora_config, tuned)  # the Assistant runs the adapters
  with capsys.disabled():
    print(f"\nheld-out accuracy on the swapped task after {TUNE_STEPS} steps: full "
          f"{full_accuracy:.3f}, LoRA {lora_accuracy:.3f} (unmerged {unmerged_accuracy:.3f})")
  assert full_accuracy >= 0.9
  assert abs(lora_accuracy - full_accuracy) <= 0.02
  assert unmerged_accuracy == lora_accuracy
  # What generate / chat / serve load from the run: the saved adapters merged in.
  loaded = inference.load_checkpoint(str(tmp_path / "lora"))
  assert not any(map(lora_params.is_lora, flatten_dict(loaded.params, sep="/")))
  assert _accuracy(loaded.config, loaded.params) == lora_accuracy

  # QLoRA, int8 base: the frozen kernels are the main job's quantised, the rest as LoRA's.
  qlora_config = _on_swapped_task(_lora_config(3, base_bits=8), *task)
  workdir = tmp_path / "qlora"
  stopped = jax.device_get(_train(qlora_config, workdir, main, until_step=2).state.params)
  expected = lora.quantize_base(jax.tree.map(jnp.asarray, base), qlora_config.train.lora)
  kernel = stopped["llm"]["layers"]["mlp"]["down"]["kernel"]
  assert kernel.array.qvalue.dtype == jnp.int8
  frozen = {p: x for p, x in flatten_dict(stopped, sep="/").items()
            if not lora_params.is_lora(p)}
  for path, want in flatten_dict(expected, sep="/").items():
    if path in frozen and not re.search(TRAINS_UNDER_LORA, path):
      for a, b in zip(jax.tree.leaves(frozen[path]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
  resumed = loop.Trainer(qlora_config, str(workdir), devices=jax.devices()[:1])
  assert resumed.start_step == 2
  for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(stopped)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  resumed.run()
  with pytest.raises(ConfigError, match="a QLoRA run"):
    inference.load_checkpoint(str(workdir))


def test_config_errors_name_the_field(tiny_config):
  config = _lora_config(1)
  config.model.mlp_chunks = 2
  with pytest.raises(ConfigError, match=r"model.mlp_chunks=2 with train.lora"):
    lora.check(config.train.lora, config.model)
  config.model.mlp_chunks = 1
  config.train.lora.base_bits = 3
  with pytest.raises(ConfigError, match=r"train.lora.base_bits=3: expected None"):
    lora.check(config.train.lora, config.model)


def test_projector_lr_and_the_lora_mask():
  """`train.projector_lr` puts the DEM and the projector in a group of their own lr; under
  LoRA the adapters train and the kernels they sit on are frozen whatever `trainable` says."""
  config = _lora_config(10)
  config.train.projector_lr = 1e-4
  config.train.trainable = (r"^dem/", r"^projector/", r"^llm/")
  mesh = sharding.make_mesh("fsdp", jax.devices()[:1])
  setup = state_lib.train_setup(config, mesh, 10)
  paths = jax.tree.leaves(optim.param_paths(setup.abstract.params))
  labels = dict(zip(paths, jax.tree.leaves(optim.param_labels(setup.abstract.params,
                                                              config.train))))
  assert labels["projector/fc1/kernel"] == labels["dem/attention/k/kernel"] == "group_0"
  assert labels["llm/layers/attn/q/kernel_lora_a"] == "group_default"
  assert labels["llm/layers/attn/q/kernel"] == labels["vision/layers/attn/q/kernel"] == "frozen"
  assert labels["llm/final_norm/scale"] == "group_default"  # `trainable` still says ^llm/
  assert optim.param_group_rules(config.train)[0] == (optim.PROJECTOR_PARAMS,
                                                      pytest.approx(0.1))


def test_compile_sizes_a_qlora_step_on_a_sharded_mesh():
  """`infllava compile` builds the trainer's LoRA state: on fsdp=4 x tensor=2 an int4-base
  QLoRA step compiles with its quantised kernels placed like the float ones, gradients and
  AdamW state for the adapters, DEM and projector only, and 4-bit values counted at half a
  byte in the bound."""
  from infllava_jax.training import compile as compile_cli
  config = _lora_config(1, base_bits=4)
  config.mesh = "fsdp=4,tensor=2"
  figures = compile_cli.compile_train_step(config, jax.devices(), 1, config.data.max_length,
                                           log=lambda _: None)
  setup = state_lib.train_setup(config, sharding.make_mesh(config.mesh, jax.devices()), 1)
  qvalue = setup.abstract.params["llm"]["layers"]["mlp"]["up"]["kernel"].array.qvalue
  float_kernel = setup.init_target["llm"]["layers"]["mlp"]["up"]["kernel"]
  assert qvalue.dtype == jnp.dtype(jnp.int4)
  assert qvalue.sharding.spec == float_kernel.sharding.spec == P(None, "fsdp", "tensor")
  trainable = [x for x, m in zip(jax.tree.leaves(setup.abstract.params),
                                 jax.tree.leaves(setup.mask)) if m]
  bound = dict(figures["bound"])
  assert bound["gradients (trainable params only)"] == compile_cli.tree_shard_bytes(trainable)
  moments = 2 * bound["gradients (trainable params only)"]
  assert moments <= bound["AdamW state"] <= moments + 64  # + the step counts
  assert compile_cli.shard_bytes(qvalue) == qvalue.size // 8 // 2  # 8 devices, 4 bits
  assert figures["memory"]["total"] >= figures["bound_total"]


def test_training_starts_from_a_kept_adapter(tmp_path):
  """`--init_from` a checkpoint holding LoRA params (a `convert from-pytorch --keep-lora`
  folder) gives a LoRA run those adapters, not fresh ones; another rank is refused by name."""
  config = _lora_config(1)
  fresh = jax.device_get(loop.Trainer(config, str(tmp_path / "fresh"),
                                      devices=jax.devices()[:1]).state.params)
  rng = np.random.default_rng(0)
  kept = jax.tree_util.tree_map_with_path(
      lambda path, x: rng.normal(size=x.shape).astype(x.dtype)
      if lora_params.is_lora(jax.tree_util.keystr(path, simple=True, separator="/")) else x,
      fresh)
  converted.save_converted(str(tmp_path / "kept"), config.model, kept)
  converted.save_lora(str(tmp_path / "kept"), rank=8, alpha=16)
  started = loop.Trainer(config, str(tmp_path / "run"), init=[InitSource(str(tmp_path / "kept"))],
                         devices=jax.devices()[:1])
  got = flatten_dict(jax.device_get(started.state.params), sep="/")
  adapters = {p: x for p, x in flatten_dict(kept, sep="/").items() if lora_params.is_lora(p)}
  assert adapters
  for path, want in adapters.items():
    np.testing.assert_array_equal(got[path], want, err_msg=path)
  other_rank = _lora_config(1, rank=4)
  with pytest.raises(ParamMismatchError, match=r"kernel_lora_a is saved with shape"):
    loop.Trainer(other_rank, str(tmp_path / "run4"), init=[InitSource(str(tmp_path / "kept"))],
                 devices=jax.devices()[:1])
