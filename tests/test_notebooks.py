"""The notebooks in notebooks/ execute from top to bottom (nbclient), so they cannot rot.

They are stored without outputs and run in the notebooks folder as a user
would; their own cells check the results against the synthetic truth
(centre, 6-fold correlation peaks), so a notebook that runs but computes
nonsense fails here too. The scheduler notebook is run twice: attached to a
scheduler this test starts (and the test checks on that scheduler that the
work really ran there), and with no scheduler given (its LocalCluster
fallback).
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))

pytestmark = pytest.mark.slow


def execute(path: Path, timeout: int = 300):
    """Run a notebook in its folder; nbclient raises CellExecutionError on any error."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()
    return nb


def stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream")


def images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.outputs)


def test_the_notebooks_are_there():
    names = {p.name for p in NOTEBOOKS}
    assert {"tutorial.ipynb", "attach_to_scheduler.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name} is stored with outputs; clear them before committing")


def test_tutorial_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SACLA_NB_WORKDIR", str(tmp_path))
    nb = execute(NB_DIR / "tutorial.ipynb")
    out = stdout(nb)
    assert "circle fit is" in out and "highest correlation at dphi" in out
    assert images(nb) >= 5
    assert (tmp_path / "result.zarr").is_dir()
    assert len(list((tmp_path / "figures").glob("*.png"))) == 6
    from conftest import SHARED_DATA

    if (SHARED_DATA / "loki" / "test_img.npy").exists():
        assert "real data: " in out and "skipping" not in out
        assert images(nb) >= 8  # the real image, its polar view and the 111 correlation
    else:
        assert "skipping section 7" in out


def test_attach_notebook_uses_the_given_scheduler(tmp_path, monkeypatch):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        monkeypatch.setenv("SACLA_DASK_SCHEDULER", cluster.scheduler_address)
        monkeypatch.delenv("SACLA_DASK_SCHEDULER_FILE", raising=False)
        monkeypatch.setenv("SACLA_NB_WORKDIR", str(tmp_path))
        nb = execute(NB_DIR / "attach_to_scheduler.ipynb")
        ran_here = set(cluster.scheduler.task_prefixes)
    out = stdout(nb)
    assert f"attached to the running scheduler at {cluster.scheduler_address}" in out
    # the run's images were read by tasks of *this* scheduler, not of a fallback cluster
    assert "sacla-images" in ran_here, sorted(ran_here)
    assert (tmp_path / "dask-report.html").stat().st_size > 10_000
    assert images(nb) >= 1


def test_attach_notebook_falls_back_to_a_local_cluster(tmp_path, monkeypatch):
    monkeypatch.delenv("SACLA_DASK_SCHEDULER", raising=False)
    monkeypatch.delenv("SACLA_DASK_SCHEDULER_FILE", raising=False)
    monkeypatch.setenv("SACLA_NB_WORKDIR", str(tmp_path))
    nb = execute(NB_DIR / "attach_to_scheduler.ipynb")
    out = stdout(nb)
    assert "no scheduler given: started LocalCluster" in out
    assert "correlation maximum at dphi" in out
