"""INF-LLaVA release layout -> converted (CLI) -> parity with HF, and the bit-exact round trip."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from ml_collections import ConfigDict
from flax.traverse_util import flatten_dict
from safetensors import safe_open

from infllava_jax.presets import _sections
from infllava_jax.config import load_config
from infllava_jax.checkpoints import converted as converted_format
from infllava_jax.checkpoints import locate, params as checkpoint_params, run
from infllava_jax.convert import cli, export, plan, readers, sources
from infllava_jax.convert import inspect as inspect_cli
from infllava_jax.model import clip, llama
from tests.convert import tiny_checkpoints as tc

LOGITS_TOL = 1e-4
CLIP_TOL = 1e-5


def convert(args):
  assert cli.main(["from-pytorch", "--quiet", "--config", "configs/tiny.py", *args]) == 0


@pytest.fixture(scope="module")
def release_f32(tiny_config, tmp_path_factory):
  """(HF llama, HF clip, tensors written, model_cfg, params, folder) of a float32 release,
  converted: the release is in folder/release, the conversion in folder/converted."""
  root = tmp_path_factory.mktemp("release_f32")
  llama_hf, clip_hf, tensors = tc.write_release(str(root / "release"), tiny_config.model)
  convert(["--model", str(root / "release"), "--out", str(root / "converted")])
  model_cfg, params = converted_format.load_converted(str(root / "converted"))
  return llama_hf, clip_hf, tensors, model_cfg, params, root


def test_config_comes_from_the_checkpoint(release_f32, tiny_config):
  *_, model_cfg, _, _ = release_f32
  for section in ("llm", "vision"):
    for key, want in tiny_config.model[section].items():
      assert model_cfg[section][key] == want, (section, key)
  assert model_cfg.variant == "infllava"
  assert model_cfg.dcm.image_size == tiny_config.model.dcm.image_size


def test_llm_logits_match_hf(release_f32):
  llama_hf, _, _, model_cfg, params, _ = release_f32
  tokens = np.random.default_rng(0).integers(0, model_cfg.llm.vocab_size, (2, 11))
  with torch.no_grad():
    want = llama_hf(torch.from_numpy(tokens)).logits.numpy()
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  got, _ = llama.Llama(model_cfg.llm).apply({"params": params["llm"]}, jnp.asarray(tokens),
                                            positions, method="tokens_to_logits")
  np.testing.assert_allclose(np.asarray(got), want, atol=LOGITS_TOL, rtol=0)


def test_clip_features_match_hf(release_f32):
  _, clip_hf, _, model_cfg, params, _ = release_f32
  side = model_cfg.vision.image_size
  images = np.random.default_rng(1).standard_normal((3, side, side, 3)).astype(np.float32)
  with torch.no_grad():
    out = clip_hf(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                  output_hidden_states=True)
  want = out.hidden_states[-2][:, 1:].numpy()
  got = clip.VisionTransformer(model_cfg.vision).apply({"params": params["vision"]}, images)
  np.testing.assert_allclose(np.asarray(got), want, atol=CLIP_TOL, rtol=0)


def test_dem_and_projector_are_the_release_tensors(release_f32):
  _, _, tensors, model_cfg, params, _ = release_f32
  flat = flatten_dict(params, sep="/")
  rules = [r for r in sources.release_table(model_cfg)
           if r.path.split("/")[0] in ("dem", "projector")]
  assert len(rules) == 24
  for rule in rules:
    np.testing.assert_array_equal(flat[rule.path],
                                  rule.transform.to_flax(tensors[rule.torch].numpy()))


def test_converted_tree_is_the_models(release_f32):
  """Exactly the tree `build_model(model_cfg).init` makes: what train/generate load."""
  *_, model_cfg, params, _ = release_f32
  want = jax.tree.map(lambda a: a.shape, plan.expected_params(model_cfg))
  assert jax.tree.map(lambda a: a.shape, params) == want


def test_load_converted_places_params_on_a_mesh(release_f32, tmp_path):
  *_, model_cfg, params, _ = release_f32
  mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  converted_format.save_converted(str(tmp_path / "copy"), model_cfg, params)
  _, placed = converted_format.load_converted(str(tmp_path / "copy"), replicated)
  for path, array in flatten_dict(placed, sep="/").items():
    assert isinstance(array, jax.Array) and array.sharding == replicated, path
    np.testing.assert_array_equal(np.asarray(array), flatten_dict(params, sep="/")[path])


def test_round_trip_is_bit_exact_in_bfloat16(tiny_config, tmp_path, capsys):
  _, _, tensors = tc.write_release(str(tmp_path / "release"), tiny_config.model, torch.bfloat16)
  convert(["--model", str(tmp_path / "release"), "--out", str(tmp_path / "first")])
  assert "holds no tokenizer" in capsys.readouterr().err  # and says what to do about it
  assert converted_format.tokenizer_dir(str(tmp_path / "first")) is None
  assert cli.main(["to-pytorch", "--quiet", "--checkpoint", str(tmp_path / "first"),
                   "--out", str(tmp_path / "exported"), "--max-shard-size", "0.0001"]) == 0
  convert(["--model", str(tmp_path / "exported"), "--out", str(tmp_path / "second")])
  first_cfg, first = converted_format.load_converted(str(tmp_path / "first"))
  second_cfg, second = converted_format.load_converted(str(tmp_path / "second"))
  assert second_cfg.to_dict() == first_cfg.to_dict()
  first, second = flatten_dict(first, sep="/"), flatten_dict(second, sep="/")
  assert sorted(first) == sorted(second)
  for path in first:
    assert first[path].dtype == second[path].dtype == np.dtype("bfloat16"), path
    np.testing.assert_array_equal(first[path].view(np.uint16), second[path].view(np.uint16))
  # The exported shards hold the release tensors themselves, bit for bit, under their names.
  exported = {}
  for name, ref in readers.folder_refs(str(tmp_path / "exported")).items():
    with safe_open(ref.file, "numpy") as f:
      exported[name] = f.get_tensor(name)
  unused = sources.release_ignore(first_cfg)
  assert set(exported) == {n for n in tensors if not any(re.match(p, n) for p in unused)}
  for name, array in exported.items():
    np.testing.assert_array_equal(array.view(np.uint16), tc.to_numpy(tensors[name]).view(np.uint16))
  assert len([f for f in os.listdir(tmp_path / "exported") if f.endswith(".safetensors")]) > 1
  # The reference's input settings; no generation_config.json for a vocabulary whose stop
  # ids the checkpoint does not record.
  with open(tmp_path / "exported" / "config.json") as f:
    config = json.load(f)
  assert (config["image_aspect_ratio"], config["tokenizer_model_max_length"],
          config["tokenizer_padding_side"]) == ("pad", 2048, "right")
  assert "eos_token_id" not in config
  assert not (tmp_path / "exported" / "generation_config.json").exists()


def test_a_training_run_exports_like_the_converted_checkpoint_it_holds(release_f32, tmp_path):
  *_, model_cfg, params, root = release_f32
  converted = root / "converted"
  with run.Checkpointer(tmp_path / "run" / locate.RUN_CHECKPOINTS,  # as Trainer's
                       _sections.checkpoint_config(),
                       config=ConfigDict({"model": model_cfg})) as steps:
    steps.save(7, params, {"count": np.zeros((), np.int32)}, force=True)
  for source, out in ((converted, "from_converted"), (tmp_path / "run", "from_run")):
    assert cli.main(["to-pytorch", "--quiet", "--checkpoint", str(source),
                     "--out", str(tmp_path / out)]) == 0
  tensors = {}
  for out in ("from_converted", "from_run"):
    for name, ref in readers.folder_refs(str(tmp_path / out)).items():
      with safe_open(ref.file, "numpy") as f:
        tensors.setdefault(name, []).append(f.get_tensor(name))
  assert all(len(pair) == 2 for pair in tensors.values())
  for name, (want, got) in tensors.items():
    np.testing.assert_array_equal(got, want, err_msg=name)
  assert ((tmp_path / "from_run" / "config.json").read_text()
          == (tmp_path / "from_converted" / "config.json").read_text())


def test_export_reads_one_param_at_a_time(release_f32, tmp_path, monkeypatch):
  *_, root = release_f32
  reads = []
  read = checkpoint_params.read

  def spy(directory, wanted):
    reads.append(sorted(wanted))
    return read(directory, wanted)

  monkeypatch.setattr(checkpoint_params, "read", spy)
  assert cli.main(["to-pytorch", "--quiet", "--checkpoint", str(root / "converted"),
                   "--out", str(tmp_path / "out")]) == 0
  saved = checkpoint_params.lazy_params(root / "converted")
  assert all(len(paths) == 1 for paths in reads), reads[:3]
  # Each param the release holds is read once (CLIP's unused layers are not kept).
  assert sorted(p for (p,) in reads) == sorted(saved)


def test_llama3_exports_carry_its_stop_and_pad_ids(tiny_config):
  model_cfg = tiny_config.model.copy_and_resolve_references()
  model_cfg.llm.vocab_size = export.LLAMA3_VOCAB_WITH_PAD
  config = export.release_config(model_cfg, "bfloat16")
  assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (
      128256, 128000, [128001, 128009])
  assert export.generation_config(model_cfg) == dict(
      bos_token_id=128000, eos_token_id=[128001, 128009], pad_token_id=128256)


def test_inspect_lists_both_sides(release_f32, capsys):
  *_, params, root = release_f32
  assert inspect_cli.main([str(root / "release")]) == 0
  out = capsys.readouterr().out
  assert re.search(r"^model\.layers\.1\.mlp\.gate_proj\.weight +\[128, 64\] +float32$", out,
                   re.M)
  assert re.search(r"^model\.spatial_embed +17,736$", out, re.M)
  assert inspect_cli.main([str(root / "converted"), "--summary"]) == 0
  out = capsys.readouterr().out
  counts = dict(re.findall(r"^(\S+) +([\d,]+)$", out, re.M))
  for module in ("llm", "vision", "dem", "projector"):
    want = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params[module]))
    got = sum(int(n.replace(",", "")) for m, n in counts.items() if m.split("/")[0] == module)
    assert got == want, module


def test_plan_places_each_param_into_its_sharding_and_casts(release_f32):
  *_, params, root = release_f32
  source = sources.release_source(str(root / "release"), load_config("configs/tiny.py").model)
  model_cfg, planned = plan.plan(source, readers.Reader(), dtype="bfloat16")
  assert model_cfg.llm.param_dtype == model_cfg.vision.param_dtype == "bfloat16"
  mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  placed = plan.materialize(planned, jax.tree.map(lambda _: replicated, params))
  for path, array in flatten_dict(placed, sep="/").items():
    assert isinstance(array, jax.Array) and array.sharding == replicated, path
    assert array.dtype == jnp.bfloat16, path
    np.testing.assert_array_equal(np.asarray(array),
                                  flatten_dict(params, sep="/")[path].astype(jnp.bfloat16))
