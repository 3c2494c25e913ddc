"""The example notebook runs from top to bottom without an error, in a kernel of this interpreter.

The kernel is named in a kernel spec made for the test (in a temporary JUPYTER_PATH, which Jupyter searches
first), so it is this environment's python whatever kernels the machine has registered, and nothing is
installed or fetched. A cell that raises fails the test (nbclient's CellExecutionError names the cell). nbclient, nbformat, ipykernel
and matplotlib are in the test extra.
"""

from __future__ import annotations

import json
import os
import re
import sys

import nbclient
import nbformat
import pytest

from tests.support import HANG_S, ROOT

pytestmark = pytest.mark.slow

NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
KERNEL = "mask-impact-test"


@pytest.fixture()
def kernel(tmp_path, monkeypatch) -> str:
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mask_impact tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return KERNEL


def test_the_example_notebook_runs_without_error(kernel, tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # kept clean
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    imports = re.findall(r"^(?:from|import) (mask_impact\S*)", code, re.M)
    assert imports and set(imports) == {"mask_impact"}  # the public API only: no mask_impact.config, ...
    client = nbclient.NotebookClient(notebook, kernel_name=kernel, timeout=HANG_S, allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "answer: red" in text and "image1 r0-1 c2-3" in text and "shape_quarter" in text and "answer_prob" in text
    tables = [output["data"]["text/html"] for output in outputs if "<b>KnockoutResult</b>" in
              output.get("data", {}).get("text/html", "")]
    assert tables and all(len(table) < 10_000 and "<iframe" not in table for table in tables)  # show(): light HTML
    assert "iframe" not in "".join(output.get("text", "") for output in outputs if output.get("name") == "stderr")
    pictures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(pictures) == 3  # heatmap, overlay, flow curves
    assert not list(tmp_path.glob("output*"))  # the notebook writes into its own temporary folder only
