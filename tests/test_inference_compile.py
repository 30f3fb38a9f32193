"""`infllava compile --inference`: the Assistant's generation compiled ahead of time on the
tiny config (a few seconds per compile on CPU)."""

import jax
import pytest

from infllava_jax import inference_compile
from infllava_jax.config import load_config
from infllava_jax import aot, compile_cli

CONTEXT, NEW = 128, 16


def figures(quantize=None):
  config = load_config("configs/tiny.py", ["--config.model.dtype=bfloat16"])
  return inference_compile.compile_generation(config, jax.devices()[0], 2, CONTEXT, NEW,
                                              quantize, log=lambda _: None)


@pytest.fixture(scope="module")
def bf16_and_int8():
  return figures(), figures("int8")


def test_arguments_are_the_params_and_inputs_and_int8_is_smaller(bf16_and_int8):
  for run in bf16_and_int8:
    bound = dict(run["bound"])
    params = next(b for label, b in run["bound"] if label.startswith("params"))
    inputs = next(b for label, b in run["bound"] if label.startswith("inputs"))
    cache = next(b for label, b in run["bound"] if label.startswith("KV cache"))
    assert run["memory"]["arguments"] == params + inputs
    assert run["prompt_tokens"] == CONTEXT - NEW
    # The decode cache is made inside the program: it is among the temporaries.
    assert run["memory"]["temporaries"] >= cache > 0
    assert run["bound_total"] == sum(bound.values())
    assert run["memory"]["total"] >= run["bound_total"]
  bf16, int8 = bf16_and_int8
  assert "params (unquantised)" in dict(bf16["bound"])
  assert dict(int8["bound"])["params (int8)"] < dict(bf16["bound"])["params (unquantised)"]
  assert int8["memory"]["arguments"] < bf16["memory"]["arguments"]


def test_kv_cache_bytes_at_8b():
  """LLaMA-3-8B: 32 layers x K and V x 8 heads x 128 dims in bfloat16 = 128 KiB per token."""
  config = load_config("infllava_8b")
  per_token = inference_compile.kv_cache_bytes(config.model, 1, 1) - 4  # less the segment id
  assert per_token == 128 * 2 ** 10


def test_cli_prints_the_fit_line_and_fails_over_the_limit(bf16_and_int8, monkeypatch, capsys):
  seen = {}

  def fake_compile(config, device, batch, context, max_new_tokens, quantize, log):
    seen.update(batch=batch, context=context, new=max_new_tokens, quantize=quantize)
    return bf16_and_int8[1]

  monkeypatch.setattr(inference_compile, "compile_generation", fake_compile)
  argv = ["--inference", "--config", "configs/tiny.py", "--batch", "2", "--context", "128",
          "--max-new-tokens", "16", "--quantize", "int8"]
  assert compile_cli.main(argv + ["--device-memory", "16GiB"]) == 0
  out = capsys.readouterr().out
  assert seen == {"batch": 2, "context": 128, "new": 16, "quantize": "int8"}
  total = aot.format_bytes(bf16_and_int8[1]["memory"]["total"]).strip()
  assert f"fits in --device-memory 16.000 GiB: total {total}" in out
  assert compile_cli.main(argv + ["--device-memory", "1KiB"]) == 1
  captured = capsys.readouterr()
  assert f"does NOT fit in --device-memory 0.001 MiB: total {total}" in captured.out
  assert f"per-device total {total} exceeds --device-memory" in captured.err


def test_a_context_the_image_does_not_fit_is_refused(capsys):
  with pytest.raises(SystemExit) as exit_info:
    compile_cli.main(["--inference", "--config", "configs/tiny.py", "--context", "32",
                      "--max-new-tokens", "16"])
  assert exit_info.value.code == 2
  assert "the image alone takes" in capsys.readouterr().err


def test_one_tpu_chip_compiles_without_a_tpu(capsys):
  """--topology v5e:1x1: one chip, which libtpu refuses without its host bounds (skips
  without libtpu, the `tpu` extra)."""
  pytest.importorskip("libtpu")
  assert compile_cli.main(["--inference", "--config", "configs/tiny.py", "--context", "128",
                           "--max-new-tokens", "16", "--quantize", "int8",
                           "--topology", "v5e:1x1", "--device-memory", "16GiB"]) == 0
  out = capsys.readouterr().out
  assert "one TPU v5 lite" in out and "fits in --device-memory 16.000 GiB" in out
