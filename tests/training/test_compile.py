"""`infllava compile` on the 8 simulated CPU devices of conftest.py.

One real compile (the tiny synthetic config on fsdp=4 x tensor=2, ~30 s on 2 cores). The 8B
stage configs' abstract state is checked in test_state.py (traced only).
"""

import jax
import pytest

from infllava_jax import aot
from infllava_jax.config import load_config
from infllava_jax.training import compile as compile_cli


@pytest.fixture(scope="module")
def tiny_figures():
  config = load_config("configs/synthetic.py", ["--config.mesh=fsdp=4,tensor=2"])
  return compile_cli.compile_train_step(config, jax.devices(), 1, config.data.max_length,
                                        log=lambda _: None)


def test_tiny_compile_figures_are_consistent(tiny_figures):
  mem = tiny_figures["memory"]
  assert tiny_figures["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  assert tiny_figures["global_batch"] == 4  # 1 row per batch shard x 4 fsdp shards
  for key in ("arguments", "outputs", "temporaries"):
    assert mem[key] > 0, key
  # The donated state comes back as the new state in place: almost all output bytes alias.
  assert 0 < mem["alias"] <= mem["outputs"] <= mem["arguments"]
  assert mem["outputs"] - mem["alias"] < 0.01 * mem["outputs"]
  labels = [label for label, _ in tiny_figures["bound"]]
  assert labels[:4] == ["params", "gradients (trainable params only)", "AdamW state", "batch"]
  bound = dict(tiny_figures["bound"])
  # Everything trains in the synthetic config: gradients as big as params, AdamW 2x.
  assert bound["gradients (trainable params only)"] == bound["params"]
  assert bound["AdamW state"] >= 2 * bound["params"]
  assert any(label.startswith("carry: 2 CLIP layers") for label in labels)  # CLIP trains (2 of 3 used)
  assert tiny_figures["bound_total"] == sum(bound.values())
  # A lower bound: XLA cannot hold the step in less.
  assert mem["total"] >= tiny_figures["bound_total"] > 0
  assert tiny_figures["flops_xla"] > 0 and tiny_figures["flops_formula"] > 0


def test_main_reports_and_fails_over_device_memory(tiny_figures, monkeypatch, capsys):
  """The CLI path (argument parsing, report, limit) on the figures compiled above."""
  seen = {}

  def fake_compile(config, devices, rows, length, log):
    seen.update(mesh=config.mesh, devices=len(devices), rows=rows, length=length,
                accum=config.train.grad_accum_steps)
    return tiny_figures

  monkeypatch.setattr(compile_cli, "compile_train_step", fake_compile)
  argv = ["--config", "configs/synthetic.py", "--mesh", "fsdp=4,tensor=2", "--length", "64"]
  assert compile_cli.main(argv + ["--device-memory", "80GiB"]) == 0
  out = capsys.readouterr().out
  assert seen == {"mesh": "fsdp=4,tensor=2", "devices": 8, "rows": 1, "length": 64,
                  "accum": 1}
  assert "compiled / bound:" in out and "analytic lower bound per device:" in out

  assert compile_cli.main(argv + ["--device-memory", "1KiB"]) == 1
  err = capsys.readouterr().err
  total = aot.format_bytes(tiny_figures["memory"]["total"]).strip()
  assert f"per-device total {total} exceeds --device-memory 0.001 MiB" in err

  # The micro-batch count: --grad-accum, or the config override (not reset to 1), not both.
  assert compile_cli.main(argv + ["--grad-accum", "2"]) == 0 and seen["accum"] == 2
  assert compile_cli.main(argv + ["--config.train.grad_accum_steps=4"]) == 0
  assert seen["accum"] == 4
  with pytest.raises(SystemExit):
    compile_cli.main(argv + ["--grad-accum", "2", "--config.train.grad_accum_steps=4"])
  assert "both set the micro-batch count" in capsys.readouterr().err


def test_note_names_the_flags_for_the_configs_own_micro_batch():
  """The default compile (1 row, 1 micro-batch) measures less than stage 2 trains: 128 rows
  over 8 fsdp shards in 4 micro-batches are 4 rows per shard per micro-batch."""
  stage2 = load_config("configs/infllava_8b_stage2.py")
  mesh = {"data": 1, "fsdp": 8, "tensor": 1}
  note = compile_cli.configured_batch_note(stage2, mesh, 1, 1)
  assert "trains 4 row(s) per batch shard per micro-batch x 4 micro-batches" in note
  assert "--batch 4 --grad-accum 4" in note
  assert compile_cli.configured_batch_note(stage2, mesh, 4, 4) is None
  assert compile_cli.configured_batch_note(stage2, {"data": 2, "fsdp": 4, "tensor": 1}, 1,
                                           1).count("4 row(s)") == 1
  synthetic = load_config("configs/synthetic.py")  # rows per process, no global batch
  assert compile_cli.configured_batch_note(synthetic, mesh, 1, 1) is None


def test_main_rejects_a_mesh_larger_than_the_devices():
  with pytest.raises(SystemExit, match="needs 16 devices but jax has 8"):
    compile_cli.main(["--config", "configs/synthetic.py", "--mesh", "fsdp=16"])


def test_topology_compiles_for_a_tpu_slice_without_a_tpu(capsys):
  """libtpu's compile-only client: the tiny run compiled by the TPU compiler for a v5e:2x2
  slice. libtpu is the `tpu` extra, not a test dependency (its 200 MB and its TPU probing
  stay out of CI): without it this test skips, and the flag must say what to install."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    with pytest.raises(SystemExit, match=r"pip install 'infllava-jax\[tpu\]'"):
      compile_cli.main(["--config", "configs/synthetic.py", "--topology", "v5e:2x2"])
    pytest.skip("libtpu is not installed")
  assert compile_cli.main(["--config", "configs/synthetic.py", "--topology", "v5e:2x2",
                           "--mesh", "fsdp=2,tensor=2"]) == 0
  out = capsys.readouterr().out
  assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 2} of TPU v5 lite" in out
  assert "compiled / bound:" in out
  with pytest.raises(SystemExit):
    compile_cli.main(["--config", "configs/synthetic.py", "--topology", "v5e:2x2",
                      "--mesh", "fsdp=8"])  # more than the slice's 4 chips


@pytest.mark.parametrize("text, size", [("80GiB", 80 * 2 ** 30), ("1.5GB", 1_500_000_000),
                                        ("512 MiB", 2 ** 29), ("4096", 4096)])
def test_parse_size(text, size):
  assert aot.parse_size(text) == size


def test_parse_size_rejects_unknown_units():
  with pytest.raises(Exception, match="80Gb/s"):
    aot.parse_size("80Gb/s")
