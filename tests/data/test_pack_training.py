"""Training from packed shards: the same steps as from the LLaVA JSON, and an exact resume."""

import jax
import pytest

from infllava_jax.config import load_config
from infllava_jax.data import pack
from infllava_jax.training import loop
from tests.data.test_pack import _llava_json
from tests.training.test_loop import TINY, assert_trees_equal, host


def _trainer(workdir, data):
  overrides = TINY + ["--config.train.steps=2", "--config.checkpoint.every_steps=1",
                      "--config.data.batch_size=2"]
  overrides += [f"--config.data.{k}={v}" for k, v in data.items()]
  config = load_config("configs/synthetic.py", overrides)
  return loop.Trainer(config, str(workdir), devices=jax.devices()[:1])


@pytest.mark.slow  # four tiny Trainers: ~105 s on 2 shared CPU cores
def test_two_steps_from_shards_equal_two_steps_from_the_json_and_resume_exactly(tmp_path):
  json_path, images = _llava_json(tmp_path)
  pack.pack(json_path, images, str(tmp_path / "packed"), num_shards=3,
            progress=lambda _: None)
  from_json = _trainer(tmp_path / "json", {"source": "llava_json", "json_path": json_path,
                                           "image_folder": images})
  from_json.run()
  packed = {"source": "array_record", "path": str(tmp_path / "packed")}
  from_shards = _trainer(tmp_path / "shards", packed)
  from_shards.run()
  assert int(from_shards.state.step) == 2
  assert_trees_equal(host(from_shards.state.params), host(from_json.state.params))
  assert from_shards.data.counts == from_json.data.counts

  first = _trainer(tmp_path / "resumed", packed)
  first.run(until_step=1)
  resumed = _trainer(tmp_path / "resumed", packed)
  assert resumed.start_step == 1
  resumed.run()
  assert_trees_equal(host(resumed.state.params), host(from_shards.state.params))
