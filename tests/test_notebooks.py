"""The Colab notebooks run top to bottom on CPU in a fresh kernel, from the installed wheel.

Each notebook is executed with nbclient in a kernel whose python is a fresh virtualenv's
(`tests/wheel_env.py`: it sees this environment's dependencies, not its infllava_jax), from
a folder outside the checkout, on one CPU device, with matplotlib's inline backend. The
notebook's first cell installs the package: here the wheel that INFLLAVA_WHEEL names,
offline. The committed files carry no outputs.
"""

import json
import os
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

from infllava_jax.data import synthetic
from tests.wheel_env import make_venv, session_wheel

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
NAMES = ["quickstart", "convert_and_chat", "finetune"]


def run_notebook(name: str, tmp_path, tmp_path_factory, monkeypatch,
                 ) -> tuple[nbformat.NotebookNode, str]:
  """Executes notebooks/<name>.ipynb in the wheel's virtualenv; returns the executed
  notebook and its stdout, joined (a streamed answer arrives as many outputs)."""
  wheel = session_wheel(tmp_path_factory)
  venv = make_venv(tmp_path, None)  # the notebook's first cell installs the wheel
  python = venv / "bin" / "python"
  kernels = tmp_path / "jupyter" / "kernels" / "wheel"
  kernels.mkdir(parents=True)
  (kernels / "kernel.json").write_text(json.dumps({
      "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "infllava wheel", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  # The kernel inherits this environment: the wheel to install, CPU only, one device (not
  # the suite's 8 simulated ones), matplotlib inline (no GUI), no checkout on the path.
  monkeypatch.setenv("INFLLAVA_WHEEL", str(wheel))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  monkeypatch.delenv("PYTHONPATH", raising=False)
  outside = tmp_path / "colab"
  outside.mkdir()
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell("import sys; print('kernel python:', sys.executable)"))
  client = NotebookClient(nb, timeout=600, kernel_name="wheel",
                          resources={"metadata": {"path": str(outside)}})
  try:
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
  finally:  # to read its outputs and figures
    nbformat.write(nb, tmp_path / f"{name}.executed.ipynb")
  text = "".join(out.text for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")
  assert f"kernel python: {python}" in text
  assert f"installed {wheel}" in text
  assert f"infllava_jax from {venv}/" in text, text  # the wheel's copy, not the checkout's
  assert "runtime: CPU, 1 x cpu" in text, text
  return nb, text


def count_images(nb) -> int:
  return sum("image/png" in out.get("data", {}) for cell in nb.cells
             if cell.cell_type == "code" for out in cell.outputs)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_have_no_outputs(name):
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  first = code[0].source
  assert "git+https://" in first and "pip" in first and "INFLLAVA_WHEEL" in first, \
      "the first code cell installs the package"
  assert "REPO_DIR" not in "".join(c.source for c in code), "no checkout needed"
  assert nb.cells[0].cell_type == "markdown"


@pytest.mark.slow
def test_quickstart_runs(tmp_path, tmp_path_factory, monkeypatch):
  nb, text = run_notebook("quickstart", tmp_path, tmp_path_factory, monkeypatch)
  assert "local crops (9, 84, 84, 3) global crops (9, 84, 84, 3)" in text
  assert "low-res view == global crop 4: True" in text
  assert "The model encodes 10 views per image" in text
  assert re.search(r"logits \(4, 128, 512\)", text), text
  first, last = map(float, re.search(r"mean loss of the first 5 steps ([\d.]+), "
                                     r"of the last 5 steps ([\d.]+)", text).groups())
  assert 4.5 < first < 6.6, first  # from about ln 512 at random init
  assert last < first - 2.0, (first, last)
  answers = re.findall(r"^   answer '(.*)', expected '(.*)'$", text, re.M)
  assert len(answers) == 4, text
  # 100 steps teach the answer format: some answer is one of the closed set.
  closed = set(synthetic.PATTERNS)
  assert {expected for _, expected in answers} <= closed
  assert any(answer in closed for answer, _ in answers), answers
  assert count_images(nb) == 3  # the input and its 84 px views, the crop grids, the loss curve


@pytest.mark.slow
def test_convert_and_chat_runs(tmp_path, tmp_path_factory, monkeypatch):
  nb, text = run_notebook("convert_and_chat", tmp_path, tmp_path_factory, monkeypatch)
  assert "$ infllava convert from-pytorch --config tiny" in text
  assert re.search(r"converted: converted checkpoint", text)
  assert re.search(r"^total\s+272,776 in 57 tensors$", text, re.M), text
  assert re.search(r"^llm/embed/embedding\s+\[512, 64\]\s+float32$", text, re.M), text
  assert "vocabulary: 512 rows, 512 tokenizer entries" in text
  llm, clip = map(float, re.search(r"LLM logits (\S+), CLIP features (\S+)", text).groups())
  assert llm < 1e-4 and clip < 1e-4
  # Two chat turns, each streamed after its "assistant> " and then summed up.
  turns = re.findall(r"^you> (.+)\nassistant> (.+)\n   \((stop|length) after (\d+) tokens; "
                     r"prompt (\d+) tokens\)$", text, re.M)
  assert len(turns) == 2, text
  assert turns[1][0] == "How many dots are in the left cell? Answer with one digit."
  assert int(turns[1][4]) > int(turns[0][4])  # the follow-up's prompt carries the first turn
  assert "2 turns in the history" in text
  batched = re.findall(r"^A: (['\"])(.+)\1$", text, re.M)
  assert len(batched) == 2, text  # a random model's words, but words
  assert "ask_batch gives the chat's first answer: True" in text
  # No 8B weights here: the section says so and goes on.
  assert "8B section skipped: no weights at" in text, text


@pytest.mark.slow
def test_finetune_runs(tmp_path, tmp_path_factory, monkeypatch):
  nb, text = run_notebook("finetune", tmp_path, tmp_path_factory, monkeypatch)
  assert "base model 150 steps, fine-tuning 60 steps" in text
  base = float(re.search(r"held-out accuracy ([\d.]+) in its own words", text).group(1))
  assert re.search(r"train\.json \(300 records\), heldout\.json \(32\), images/ \(332 PNGs\)",
                   text), text
  assert '"value": "<image>\\nWhich pattern fills the image?' in text
  # The base model answers in its own words: nothing right in the new format.
  assert "before fine-tuning: held-out accuracy 0.00" in text, text
  curve = [float(a) for a in re.findall(r"^fine-tuning step \d+: loss [\d.]+, "
                                        r"held-out accuracy ([\d.]+)$", text, re.M)]
  assert len(curve) == 3, text
  table = re.findall(r"^([ABCD])\s+'(.*)'\s+'(.*)'$", text, re.M)
  assert len(table) == 8, text
  assert all(before in synthetic.PATTERNS for _, before, _ in table), table
  assert all(after in "ABCD" and after for _, _, after in table), table
  before, after = map(float, re.search(r"held-out accuracy: before ([\d.]+), after ([\d.]+) "
                                       r"\(32 records\)", text).groups())
  assert before == 0.0 and after == curve[-1]
  # The format is learnt: above chance (1/4; measured 0.47 = 15/32), near the base model's
  # accuracy in its own words (measured 0.41).
  assert after >= 0.375 and after >= base - 0.15, (after, base)
  assert count_images(nb) == 1  # the loss and accuracy curves
