"""notebooks/zero_shot_demo.ipynb runs headless on a tiny demo run and draws its three figures."""
import os

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")


def test_notebook_draws_three_figures(tiny_run, monkeypatch, tmp_path):
  monkeypatch.setenv("SIGLIP_JAX_WORKDIR", tiny_run["workdir"])
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path))   # no writes to the user's matplotlib dir
  nb = nbformat.read(os.path.join(REPO, "notebooks", "zero_shot_demo.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                          resources={"metadata": {"path": REPO}}).execute()
  pngs = [cell_index for cell_index, cell in enumerate(nb.cells) if cell.cell_type == "code"
          for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
  assert len(pngs) >= 3 and len(set(pngs)) >= 3, pngs    # three figures, in separate cells
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
