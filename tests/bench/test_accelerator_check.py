"""bench/accelerator_check.py in its reduced CPU mode (one subprocess, ~35 s on 2 cores), and
its section guard in-process."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_reduced_run_on_cpu(tmp_path):
  done = subprocess.run([sys.executable, os.path.join(REPO, "bench", "accelerator_check.py"),
                         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stdout + done.stderr
  assert "all checks passed: True" in done.stdout
  report = json.loads((tmp_path / "accelerator_check.json").read_text())
  assert report["reduced"] and report["device"]["platform"] == "cpu"
  sections = report["sections"]
  assert list(sections) == ["logits", "attention", "decode", "train_step"]
  assert all(s["passed"] and "error" not in s for s in sections.values()), sections

  logits = sections["logits"]
  assert positive(logits["max_abs_logit"])
  assert logits["max_abs_diff"] <= 1e-4 * logits["max_abs_logit"]

  kernels = sections["attention"]["kernels"]
  assert set(kernels) == {"einsum", "xla"}  # no cuDNN or splash on CPU
  for kernel in kernels.values():
    assert positive(kernel["fwd_bwd_ms"])
    assert set(kernel["relative_error"]) == {"out", "dq", "dk", "dv"}
    # bf16 rounding shows (a float32 run would be ~1e-7), within the tolerance
    assert all(1e-4 < e <= 2e-2 for e in kernel["relative_error"].values())

  decode = sections["decode"]
  assert positive(decode["weight_bytes_per_step"]) and positive(decode["bound_ms_per_token_batch1"])
  assert set(decode["bf16"]) == set(decode["int8"]) == {"1", "8"}
  assert 0 < decode["int8_weight_bytes_per_step"] < decode["weight_bytes_per_step"]
  for row in [*decode["bf16"].values(), *decode["int8"].values()]:
    assert row["tokens_valid"]
    assert positive(row["decode_tokens_per_s"]) and positive(row["bound_tokens_per_s"])
  assert decode["device_memory"] == "n/a"  # CPU reports none
  assert positive(decode["compiled_memory"]["bf16 batch 8"]["arguments"])
  assert positive(decode["compiled_memory"]["int8 batch 8"]["arguments"])

  step = sections["train_step"]
  for key in ("compile_s", "step_s", "tokens_per_s", "flops_per_step", "flops_per_s"):
    assert positive(step[key]), key
  assert step["compute_dtype"] == "bfloat16" and step["remat_policy"] == "nothing_saveable"
  assert all(math.isfinite(x) for x in step["losses"]) and len(step["losses"]) == 3
  assert step["mfu"] is None and step["peak_flops"] is None  # no known peak for a CPU
  assert positive(step["compiled_memory"]["temporaries"])


def test_a_failing_section_is_recorded_and_the_rest_still_run():
  from bench import accelerator_check

  def broken():
    raise ValueError("no such kernel\nsecond line")

  results = accelerator_check.run_sections({"broken": broken, "fine": lambda: {"passed": True}})
  assert results["broken"]["error"] == "ValueError: no such kernel"
  assert results["broken"]["passed"] is False and results["fine"]["passed"] is True
  table = accelerator_check.table({"device": {"kind": "cpu", "platform": "cpu"}, "jax": "x",
                                   "reduced": True, "sections": {"attention": results["broken"]},
                                   "passed": False})
  assert "attention   FAIL  ValueError: no such kernel" in table
