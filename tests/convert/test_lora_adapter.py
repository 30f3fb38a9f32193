"""LoRA folders (PEFT layout) in and out of the converter, against `peft` itself (1e-4 f32).

A rank-4 adapter is made with `peft` on the tiny HF LLaMA of a release folder, with random
nonzero factors on every linear layer and a non_lora_trainables.bin holding other DEM and
projector tensors, as the reference's LoRA runs save them.
"""

import copy
import json

import numpy as np
import peft
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import safe_open

from infllava_jax.checkpoints import converted as converted_format
from infllava_jax.convert import adapter, cli, readers, sources
from infllava_jax.convert.mapping import match
from infllava_jax.lora import params as lora_params
from infllava_jax.lora import peft as peft_layout
from infllava_jax.model import llama
from tests.convert import tiny_checkpoints as tc

LOGITS_TOL = 1e-4
RANK, ALPHA = 4, 8.0
TARGETS = list(adapter.TARGET_MODULES)


def convert(*args):
  assert cli.main(["from-pytorch", "--quiet", "--config", "configs/tiny.py", *map(str, args)]) == 0


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens)).logits.numpy()


def our_logits(model_cfg, params, tokens: np.ndarray) -> np.ndarray:
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  logits, _ = llama.Llama(model_cfg.llm).apply({"params": params["llm"]}, tokens, positions,
                                               method="tokens_to_logits")
  return np.asarray(logits)


def exported_tensors(directory) -> dict[str, np.ndarray]:
  """{name: array} of a safetensors file or a folder of them."""
  tensors = {}
  for name, ref in readers.folder_refs(str(directory)).items():
    with safe_open(ref.file, "numpy") as f:
      tensors[name] = f.get_tensor(name)
  return tensors


def write_lora_folder(directory, model_cfg, llama_hf):
  """A PEFT adapter over a copy of `llama_hf` (random factors, B nonzero) plus
  non_lora_trainables.bin and config.json, as the reference's trainer saves a LoRA run.
  Returns (the PeftModel, the non-LoRA tensors by release name)."""
  model = peft.get_peft_model(copy.deepcopy(llama_hf), peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
      init_lora_weights=False))
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if "lora_" in name:
        tensor.copy_(0.3 * torch.randn_like(tensor))
  model.save_pretrained(str(directory))
  non_lora = tc.dem_projector_tensors(model_cfg, seed=1)
  torch.save({peft_layout.PREFIX + n: t for n, t in non_lora.items()},
             directory / peft_layout.NON_LORA_FILE)
  (directory / "config.json").write_text(json.dumps(tc.release_config_json(model_cfg)))
  return model.eval(), non_lora


@pytest.fixture(scope="module")
def lora_run(tiny_config, tmp_path_factory):
  """The release, the adapter, PEFT's merged logits, and both conversions (merged, kept)."""
  root = tmp_path_factory.mktemp("lora")
  model_cfg = tiny_config.model
  llama_hf, clip_hf, _ = tc.write_release(str(root / "release"), model_cfg)
  peft_model, non_lora = write_lora_folder(root / "lora", model_cfg, llama_hf)
  tokens = np.random.default_rng(0).integers(0, model_cfg.llm.vocab_size, (2, 11))
  want = hf_logits(peft_model.merge_and_unload(), tokens)
  assert np.abs(want - hf_logits(llama_hf, tokens)).max() > 100 * LOGITS_TOL  # LoRA counts
  for out, flags in (("merged", ()), ("kept", ("--keep-lora",))):
    convert("--model", root / "lora", "--model-base", root / "release", "--out", root / out,
            *flags)
  return dict(root=root, tokens=tokens, want=want, non_lora=non_lora, llama_hf=llama_hf,
              clip_hf=clip_hf)


def test_merged_conversion_equals_peft_merge_and_unload(lora_run):
  model_cfg, params = converted_format.load_converted(str(lora_run["root"] / "merged"))
  assert not any(map(lora_params.is_lora, flatten_dict(params, sep="/")))
  assert converted_format.read_lora(str(lora_run["root"] / "merged")) is None
  got = our_logits(model_cfg, params, lora_run["tokens"])
  np.testing.assert_allclose(got, lora_run["want"], atol=LOGITS_TOL, rtol=0)
  # The DEM and projector are non_lora_trainables.bin's, not the base's.
  flat = flatten_dict(params, sep="/")
  full = [r for r in sources.release_table(model_cfg) if r.torch in lora_run["non_lora"]]
  assert len(full) == 24
  for rule in full:
    np.testing.assert_array_equal(flat[rule.path],
                                  rule.transform.to_flax(lora_run["non_lora"][rule.torch].numpy()))


def test_kept_lora_merged_by_lora_params_merge_equals_peft(lora_run):
  root = lora_run["root"]
  model_cfg, params = converted_format.load_converted(str(root / "kept"))
  settings = converted_format.read_lora(str(root / "kept"))
  assert settings == {"rank": RANK, "alpha": ALPHA}
  flat = flatten_dict(params, sep="/")
  pairs = lora_params.pairs(flat)
  assert sorted(pairs) == sorted(f"llm/layers/{m}/kernel" for m in
                                 ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up",
                                  "mlp/down"))
  depth, width = model_cfg.llm.depth, model_cfg.llm.width
  assert flat["llm/layers/attn/q/kernel_lora_a"].shape == (depth, width, RANK)
  assert flat["llm/layers/mlp/down/kernel_lora_b"].shape == (depth, RANK, width)
  merged = lora_params.merge(params, **settings)
  got = our_logits(model_cfg, merged, lora_run["tokens"])
  np.testing.assert_allclose(got, lora_run["want"], atol=LOGITS_TOL, rtol=0)
  _, by_converter = converted_format.load_converted(str(root / "merged"))
  for path, value in flatten_dict(by_converter, sep="/").items():
    np.testing.assert_allclose(np.asarray(flatten_dict(merged, sep="/")[path]), value,
                               atol=1e-6, rtol=0, err_msg=path)


def test_a_llama_and_clip_base_gives_the_release_bases_conversion(lora_run):
  """The reference's own case: --model-base is the LLaMA the run started from (+ CLIP);
  the DEM and projector come from non_lora_trainables.bin alone."""
  root = lora_run["root"]
  lora_run["llama_hf"].save_pretrained(str(root / "llama"))
  lora_run["clip_hf"].save_pretrained(str(root / "clip"))
  convert("--model", root / "lora", "--model-base", root / "llama", "--clip", root / "clip",
          "--no-pad-row", "--out", root / "from_llama")
  _, want = converted_format.load_converted(str(root / "merged"))
  _, got = converted_format.load_converted(str(root / "from_llama"))
  want, got = flatten_dict(want, sep="/"), flatten_dict(got, sep="/")
  assert sorted(got) == sorted(want)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)


def test_older_peft_bin_factors_and_a_base_lacking_the_dem(lora_run, tmp_path, capsys):
  """adapter_model.bin (PEFT before safetensors) reads as the .safetensors does; a LLaMA
  base whose adapter folder has no non_lora_trainables.bin names what is missing."""
  root = lora_run["root"]
  old = tmp_path / "old"
  old.mkdir()
  (old / peft_layout.CONFIG_FILE).symlink_to(root / "lora" / peft_layout.CONFIG_FILE)
  torch.save({n: torch.from_numpy(a) for n, a in
              exported_tensors(root / "lora" / peft_layout.WEIGHT_FILES[0]).items()},
             old / peft_layout.WEIGHT_FILES[1])
  (old / peft_layout.NON_LORA_FILE).symlink_to(root / "lora" / peft_layout.NON_LORA_FILE)
  convert("--model", old, "--model-base", root / "release", "--out", tmp_path / "converted")
  _, want = converted_format.load_converted(str(root / "merged"))
  _, got = converted_format.load_converted(str(tmp_path / "converted"))
  for path, value in flatten_dict(want, sep="/").items():
    np.testing.assert_array_equal(flatten_dict(got, sep="/")[path], value, err_msg=path)
  (old / peft_layout.NON_LORA_FILE).unlink()
  lora_run["llama_hf"].save_pretrained(str(tmp_path / "llama"))
  lora_run["clip_hf"].save_pretrained(str(tmp_path / "clip"))
  assert cli.main(["from-pytorch", "--quiet", "--config", "configs/tiny.py", "--model",
                   str(old), "--model-base", str(tmp_path / "llama"), "--clip",
                   str(tmp_path / "clip"), "--out", str(tmp_path / "no_dem")]) == 1
  err = capsys.readouterr().err
  for module, example in (("dem", "model.spatial_embed."), ("projector", "model.mm_projector.")):
    assert (f"the base {tmp_path / 'llama'} + {tmp_path / 'clip'} has no {module} and "
            f"{old / peft_layout.NON_LORA_FILE} does not hold it (e.g. '{example}") in err


def test_an_adapter_on_a_llava_hf_model_converts_over_it(tmp_path):
  """PEFT on the language model of a llava-hf model (its module tree's names, a regex
  target_modules), its projector in non_lora_trainables.bin: image + text logits equal
  PEFT's merged model."""
  from infllava_jax.config import load_config
  from infllava_jax.model import infllava
  image_token = 500
  model_cfg = load_config("configs/tiny.py:llava").model
  hf_model = tc.write_llava_hf(str(tmp_path / "hf"), model_cfg, image_token)
  projector = tc.dem_projector_tensors(model_cfg, seed=3)
  with torch.no_grad():
    for i, layer in ((0, "linear_1"), (2, "linear_2")):
      for kind in ("weight", "bias"):
        getattr(hf_model.model.multi_modal_projector, layer).get_parameter(kind).copy_(
            projector[f"{sources.RELEASE_PROJECTOR}{i}.{kind}"])
  lora = peft.get_peft_model(hf_model, peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, init_lora_weights=False,
      target_modules=r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"))
  with torch.no_grad():
    for name, tensor in lora.named_parameters():
      if "lora_" in name:
        tensor.copy_(0.3 * torch.randn_like(tensor))
  lora.save_pretrained(str(tmp_path / "lora"))
  saved = readers.file_refs(str(tmp_path / "lora" / peft_layout.WEIGHT_FILES[0]))
  assert len(saved) == 2 * len(TARGETS) * model_cfg.llm.depth
  assert all(n.startswith(peft_layout.PREFIX + "model.language_model.layers.") for n in saved)
  torch.save({peft_layout.PREFIX + n: t for n, t in projector.items()},
             tmp_path / "lora" / peft_layout.NON_LORA_FILE)
  rng = np.random.default_rng(0)
  n_img = infllava.num_image_tokens(model_cfg)
  tokens = rng.integers(0, image_token, (2, n_img + 9))
  tokens[:, 3:3 + n_img] = image_token
  side = model_cfg.dcm.image_size
  pixels = rng.standard_normal((2, side, side, 3)).astype(np.float32)
  with torch.no_grad():
    want = lora.eval().merge_and_unload()(
        input_ids=torch.from_numpy(tokens),
        pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).logits.numpy()
  # Only an override: the default config is the llava-hf base's, infllava_8b:llava.
  assert cli.main(["from-pytorch", "--quiet", "--config.model.dtype=float32", "--model",
                   str(tmp_path / "lora"), "--model-base", str(tmp_path / "hf"),
                   "--out", str(tmp_path / "converted")]) == 0
  model_cfg, params = converted_format.load_converted(str(tmp_path / "converted"))
  got, _ = infllava.build_model(model_cfg).apply({"params": params}, tokens.astype(np.int32),
                                                 pixels[:, None])
  np.testing.assert_allclose(np.asarray(got), want, atol=LOGITS_TOL, rtol=0)


def test_a_lora_run_exports_its_adapter_and_its_merged_weights(lora_run, tmp_path):
  """A training run's LoRA settings come from its config (train.lora); the kept PEFT
  factors go round trip bit for bit."""
  from ml_collections import ConfigDict
  from infllava_jax.checkpoints import locate, run
  from infllava_jax.presets import _sections
  root = lora_run["root"]
  model_cfg, params = converted_format.load_converted(str(root / "kept"))
  config = ConfigDict({"model": model_cfg,
                       "train": {"lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.05}}})
  with run.Checkpointer(tmp_path / "run" / locate.RUN_CHECKPOINTS,
                        _sections.checkpoint_config(), config=config) as steps:
    steps.save(3, params, {"count": np.zeros((), np.int32)}, force=True)
  for source, out, flags in ((tmp_path / "run", "adapter", ["--lora-adapter"]),
                             (tmp_path / "run", "merged", []),
                             (root / "merged", "want", [])):
    assert cli.main(["to-pytorch", "--quiet", "--checkpoint", str(source),
                     "--out", str(tmp_path / out), *flags]) == 0
  written = json.loads((tmp_path / "adapter" / peft_layout.CONFIG_FILE).read_text())
  assert (written["r"], written["lora_alpha"], written["lora_dropout"]) == (RANK, ALPHA, 0.05)
  original = exported_tensors(root / "lora" / peft_layout.WEIGHT_FILES[0])
  exported = exported_tensors(tmp_path / "adapter" / peft_layout.WEIGHT_FILES[0])
  assert sorted(exported) == sorted(original)
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  want, got = exported_tensors(tmp_path / "want"), exported_tensors(tmp_path / "merged")
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0, err_msg=name)


def random_factors(params, seed: int) -> dict:
  """`params` with new random nonzero LoRA factors (nothing left of the PEFT adapter)."""
  rng = np.random.default_rng(seed)
  flat = flatten_dict(params, sep="/")
  for path, value in flat.items():
    if lora_params.is_lora(path):
      flat[path] = (0.3 * rng.standard_normal(value.shape)).astype(np.float32)
  return unflatten_dict(flat, sep="/")


def test_lora_adapter_export_loads_in_peft_over_the_exported_base(lora_run, tmp_path):
  root, tokens = lora_run["root"], lora_run["tokens"]
  model_cfg, params = converted_format.load_converted(str(root / "kept"))
  params = random_factors(params, seed=2)
  alpha = 12.0
  converted_format.save_converted(str(tmp_path / "ours"), model_cfg, params)
  converted_format.save_lora(str(tmp_path / "ours"), RANK, alpha)
  base, _ = lora_params.split(params)
  converted_format.save_converted(str(tmp_path / "base"), model_cfg, base)
  for source, out, flags in (("ours", "adapter", ["--lora-adapter", "--base-model", "tiny"]),
                             ("ours", "merged", []), ("base", "base_release", [])):
    assert cli.main(["to-pytorch", "--quiet", "--checkpoint", str(tmp_path / source),
                     "--out", str(tmp_path / out), *flags]) == 0
  adapter_dir = tmp_path / "adapter"
  config = json.loads((adapter_dir / peft_layout.CONFIG_FILE).read_text())
  assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (
      RANK, alpha, "tiny")
  assert sorted(config["target_modules"]) == sorted(TARGETS)
  assert json.loads((adapter_dir / "config.json").read_text())["model_type"] == "llava_llama"
  # PEFT over the exported base (the LLM tensors of the release export of the params
  # without LoRA) computes what our merged params compute.
  base_tensors = exported_tensors(tmp_path / "base_release")
  llm_names = [n for n in base_tensors
               if match(sources.release_table(model_cfg), n)[0].path.startswith("llm/")]
  hf = transformers.LlamaForCausalLM(tc.llama_config(model_cfg.llm)).eval()
  hf.load_state_dict({n: torch.from_numpy(base_tensors[n]) for n in llm_names}, strict=True)
  without_lora = hf_logits(hf, tokens)
  peft_model = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
  want = hf_logits(peft_model, tokens)
  assert np.abs(want - without_lora).max() > 100 * LOGITS_TOL  # PEFT found the factors
  merged = lora_params.merge(params, rank=RANK, alpha=alpha)
  np.testing.assert_allclose(our_logits(model_cfg, merged, tokens), want, atol=LOGITS_TOL,
                             rtol=0)
  # non_lora_trainables.bin: the DEM and projector under the reference's names.
  non_lora = torch.load(adapter_dir / peft_layout.NON_LORA_FILE, weights_only=True)
  flat = flatten_dict(params, sep="/")
  full = [r for r in sources.release_table(model_cfg)
          if r.path.split("/")[0] in ("dem", "projector")]
  assert sorted(non_lora) == sorted(peft_layout.PREFIX + r.torch for r in full)
  for rule in full:
    np.testing.assert_array_equal(
        rule.transform.to_flax(non_lora[peft_layout.PREFIX + rule.torch].numpy()),
        flat[rule.path])
  # Without --lora-adapter: the release layout of the merged params.
  merged_flat = flatten_dict(merged, sep="/")
  release = exported_tensors(tmp_path / "merged")
  assert sorted(release) == sorted(base_tensors)
  for name, array in release.items():
    rule, layer = match(sources.release_table(model_cfg), name)
    value = np.asarray(merged_flat[rule.path])
    np.testing.assert_allclose(array, rule.transform.to_torch(
        value if layer is None else value[layer]), atol=1e-6, rtol=0, err_msg=name)



def test_mistakes_are_one_line(lora_run, tmp_path, capsys):
  """Through the `infllava` entry point (in process): status 2 for a folder or flag given
  wrong, 1 for an adapter that does not fit; one line naming the file and field."""
  from infllava_jax import cli as infllava
  root = lora_run["root"]

  def error(*argv, code):
    assert infllava.main(["convert", *map(str, argv)]) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]

  def from_pytorch(lora_dir, *flags, code):
    return error("from-pytorch", "--quiet", "--config", "configs/tiny.py", "--model", lora_dir,
                 *flags, "--out", tmp_path / "out", code=code)

  assert from_pytorch(root / "lora", code=2).endswith(
      "is a LoRA folder (adapter_config.json): give the model it was trained on with "
      "--model-base BASE")
  assert from_pytorch(root / "release", "--model-base", root / "release", code=2).endswith(
      f"{root / 'release' / 'adapter_config.json'} not found: a LoRA folder holds "
      "adapter_config.json and adapter_model.safetensors or adapter_model.bin "
      "(PEFT's save_pretrained)")
  broken = tmp_path / "broken"
  broken.mkdir()
  for name in (peft_layout.WEIGHT_FILES[0], peft_layout.NON_LORA_FILE):
    (broken / name).write_bytes((root / "lora" / name).read_bytes())
  config = json.loads((root / "lora" / peft_layout.CONFIG_FILE).read_text())
  for field, value, message in (
      ("target_modules", TARGETS + ["lm_head"],
       "target_modules ['lm_head'] are not mapped; LoRA is read on ['down_proj', 'gate_proj', "
       "'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"),
      ("use_dora", True, "use_dora=True is not supported; expected False (a plain LoRA)"),
      ("r", 8, None)):
    (broken / peft_layout.CONFIG_FILE).write_text(json.dumps({**config, field: value}))
    line = from_pytorch(broken, "--model-base", root / "release", code=1)
    if message:
      assert line.endswith(f"{broken / peft_layout.CONFIG_FILE}: {message}"), line
    else:
      assert line.endswith(f"{broken / peft_layout.WEIGHT_FILES[0]}: factors of rank {RANK} "
                           "but adapter_config.json says r=8"), line
  assert not (tmp_path / "out").exists()
  # to-pytorch: an adapter of params without LoRA; LoRA params without their settings.
  assert error("to-pytorch", "--checkpoint", root / "merged", "--out", tmp_path / "a",
               "--lora-adapter", code=2).endswith(
      "no LoRA factors (params *_lora_a / *_lora_b) to write as an adapter; without "
      "--lora-adapter it exports as release weights")
  unlabelled = tmp_path / "unlabelled"
  unlabelled.mkdir()
  for path in (root / "kept").iterdir():
    if path.name != "lora.json":
      (unlabelled / path.name).symlink_to(path)
  assert error("to-pytorch", "--checkpoint", unlabelled, "--out", tmp_path / "b",
               code=2).endswith(
      "the params hold LoRA factors but neither lora.json nor the run config's train.lora "
      "gives their rank and alpha")
