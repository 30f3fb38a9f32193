"""The Colab notebooks run top to bottom on CPU in a fresh kernel, and show what they claim.

Each notebook is executed with nbclient in a kernel of this interpreter (the "python3"
kernelspec resolves to `sys.executable`), from the repository root, on one CPU device,
with matplotlib's inline backend. The committed files carry no outputs.
"""

import os
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from infllava_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")


def run_notebook(name: str, monkeypatch) -> tuple[nbformat.NotebookNode, str]:
  """Executes notebooks/<name>.ipynb; returns the executed notebook and its stdout, joined
  (a streamed answer arrives as many outputs)."""
  # The kernel inherits this environment: CPU only, one device (not the suite's 8 simulated
  # ones), matplotlib inline (no GUI), and the ipykernel of this interpreter.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  path = os.path.join(NOTEBOOKS, f"{name}.ipynb")
  nb = nbformat.read(path, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell("import sys; print('kernel python:', sys.executable)"))
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": REPO}})
  client.execute()  # raises CellExecutionError, naming the cell, on the first error
  text = "".join(out.text for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")
  assert f"kernel python: {sys.executable}" in text
  return nb, text


def count_images(nb) -> int:
  return sum("image/png" in out.get("data", {}) for cell in nb.cells
             if cell.cell_type == "code" for out in cell.outputs)


@pytest.mark.parametrize("name", ["quickstart", "convert_and_chat"])
def test_committed_notebooks_have_no_outputs(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  first = code[0].source
  assert "REPO =" in first and "pip" in first, "the first code cell installs the package"
  assert nb.cells[0].cell_type == "markdown"


@pytest.mark.slow
def test_quickstart_runs(monkeypatch):
  nb, text = run_notebook("quickstart", monkeypatch)
  assert "infllava_jax is already installed: nothing to install" in text
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
def test_convert_and_chat_runs(monkeypatch):
  nb, text = run_notebook("convert_and_chat", monkeypatch)
  assert "infllava_jax is already installed: nothing to install" in text
  assert "$ infllava convert from-pytorch --config" in text
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
