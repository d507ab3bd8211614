"""Where the work runs: a running scheduler, a LocalCluster, dask-jobqueue (SLURM, PBS).

A real ``dask scheduler`` and ``dask worker`` (separate processes, loopback
only) serve the API and the CLI. The SLURM tests drive a real SLURM when one
is up on this machine (``deploy/ci/slurm-single-node.sh`` starts one) and are
skipped otherwise; the job scripts dask-jobqueue generates from the
``deploy/`` configurations are checked everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
import yaml
from dask_procs import DaskProcesses

from sacla_dask import store
from sacla_dask.cluster import dask_client
from sacla_dask.errors import ParameterError
from sacla_dask.plan import plan_run

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CHUNK = 8


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """``dask scheduler --port 0 --scheduler-file F`` and one ``dask worker``."""
    procs = DaskProcesses(tmp_path_factory.mktemp("dask"))
    try:
        procs.start_scheduler()
        procs.start_worker(nanny=True)
        yield procs
    finally:
        procs.close()


def reference(small_run, small_params) -> xr.Dataset:
    plan = plan_run(small_run.path, chunks=CHUNK, **small_params)
    return plan.dataset().compute(scheduler="sync")


def assert_same_result(res: xr.Dataset, ref: xr.Dataset) -> None:
    assert res.attrs["complete"] is True
    xr.testing.assert_identical(res.drop_attrs(), ref.drop_attrs())


def cli_args(small_run, small_params, out) -> list[str]:
    cx, cy = small_params["center"]
    return ["process", str(small_run.path), "--out", str(out), "--center", repr(cx), repr(cy),
            "--qmin", repr(small_params["qmin"]), "--qmax", repr(small_params["qmax"]),
            "--pixel-size", repr(small_params["pixel_size"]),
            "--distance", repr(small_params["distance"]), "--chunk-size", str(CHUNK)]


# -- options -------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(scheduler="tcp://127.0.0.1:1", scheduler_file="f.json"), "either --scheduler"),
    (dict(scheduler="tcp://127.0.0.1:1", workers=2), "do not also give --workers"),
    (dict(scheduler_file="f.json", cluster="jobqueue"), "do not also give"),
    (dict(cluster="slurm"), r"cluster must be one of \('local', 'jobqueue'\)"),
    (dict(workers=0), "--workers must be >= 1"),
    (dict(jobs=2), "--jobs needs --cluster jobqueue"),
])
def test_dask_client_rejects_bad_options(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        with dask_client(**kwargs):
            pass  # pragma: no cover


def test_unreachable_scheduler_is_a_clear_error():
    with pytest.raises(ParameterError, match=r"cannot reach the Dask scheduler at tcp://127"):
        with dask_client(scheduler="tcp://127.0.0.1:9", timeout="1s"):
            pass  # pragma: no cover


def test_missing_scheduler_file_does_not_wait_for_ever(tmp_path):
    """(distributed.Client would poll for the file indefinitely.)"""
    t0 = time.monotonic()
    with pytest.raises(ParameterError, match=r"scheduler file .*missing.json' does not exist"):
        with dask_client(scheduler_file=str(tmp_path / "missing.json"), timeout="0.5s"):
            pass  # pragma: no cover
    assert time.monotonic() - t0 < 10


def test_local_cluster_is_the_default():
    """One single-threaded worker process per requested worker; dashboard on loopback."""
    with dask_client(workers=1) as client:
        info = client.scheduler_info(n_workers=-1)
        assert [w["nthreads"] for w in info["workers"].values()] == [1]
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        assert client.cluster is not None  # we started it, and close it on exit
        # one glibc arena per worker process, set before it starts (unless the user's own)
        envs = client.run(lambda: os.environ.get("MALLOC_ARENA_MAX"))
        want = os.environ.get("MALLOC_ARENA_MAX", "1")
        assert list(envs.values()) == [want]
        # one chunk read per worker thread at a time (not Dask's 1.1)
        sat = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.WORKER_SATURATION)
        assert sat == 1.0
    assert client.status == "closed"


def test_worker_saturation_and_env_follow_the_config():
    """``sacla_dask.worker.saturation`` in dask's config overrides the package's 1.0 and
    ``sacla_dask.worker.env`` sets the workers' environment; nothing of it leaks into the
    caller's config."""
    before = dask.config.get("distributed.scheduler.worker-saturation")
    env = {"SACLA_DASK_TEST_WORKER_ENV": "7"}
    with dask.config.set({"sacla_dask.worker.saturation": 1.5, "sacla_dask.worker.env": env}), \
            dask_client(workers=1) as client:
        sat = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.WORKER_SATURATION)
        assert sat == 1.5
        got = client.run(lambda: os.environ.get("SACLA_DASK_TEST_WORKER_ENV"))
        assert list(got.values()) == ["7"]
    assert dask.config.get("distributed.scheduler.worker-saturation") == before


# -- a running scheduler -----------------------------------------------------------
def test_api_uses_the_active_client(small_run, small_params, tmp_path, dask_cluster, capsys):
    """No client argument anywhere: execute() computes on the attached scheduler."""
    from distributed import Client

    out = tmp_path / "r.zarr"
    plan = plan_run(small_run.path, chunks=CHUNK, out=out, **small_params)
    with Client(dask_cluster.address, timeout="30s") as client:
        before = len(client.get_task_stream())
        res = plan.execute(progress=True)
        ran = client.get_task_stream()[before:]
    # the work ran on the external worker, under the progress bar
    assert {r["worker"] for r in ran} == set(
        dask_cluster.client.scheduler_info(n_workers=-1)["workers"])
    # one store write per tag chunk (5 of 8 tags), each on that worker
    writes = [r for r in ran if isinstance(r["key"], tuple)
              and r["key"][0].startswith("write-tag-chunk-")]
    assert sorted(r["key"][1] for r in writes) == list(range(plan.n_chunks)) == list(range(5))
    assert "100% Completed" in capsys.readouterr().out
    assert_same_result(res, reference(small_run, small_params))


def test_dask_client_attaches_without_closing_the_scheduler(dask_cluster, small_run,
                                                            small_params, tmp_path):
    with dask_client(scheduler_file=str(dask_cluster.scheduler_file)) as client:
        assert client.scheduler.address == dask_cluster.address
        res = plan_run(small_run.path, chunks=CHUNK, out=tmp_path / "r.zarr",
                       **small_params).execute()
    assert_same_result(res, reference(small_run, small_params))
    # the scheduler we attached to still runs
    assert dask_cluster.client.scheduler_info(n_workers=-1)["workers"]


def test_cli_against_scheduler_address_with_report(small_run, small_params, tmp_path,
                                                   dask_cluster):
    out = tmp_path / "r.zarr"
    report = tmp_path / "report.html"
    cmd = [sys.executable, "-m", "sacla_dask.cli", *cli_args(small_run, small_params, out),
           "--scheduler", dask_cluster.address, "--report", str(report)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert re.search(r"dask dashboard: http://127\.0\.0\.1:\d+/status", r.stderr)
    assert "100% Completed" in r.stdout  # distributed's text progress bar
    assert f"dask performance report: {report}" in r.stderr
    html = report.read_text()
    assert "Dask Performance Report" in html and "write-tag-chunk" in html
    assert_same_result(store.open_result(out), reference(small_run, small_params))
    # the scheduler outlives the CLI that attached to it
    assert dask_cluster.client.scheduler_info(n_workers=-1)["workers"]


# -- dask-jobqueue -------------------------------------------------------------------
def deploy_config(system: str) -> dict:
    """dask's config merged with deploy/<system>/jobqueue.yaml, as DASK_CONFIG would."""
    with open(DEPLOY / system / "jobqueue.yaml") as fh:
        site = yaml.safe_load(fh)
    return dask.config.merge(dask.config.config, site)


LOOPBACK = {"scheduler_options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
            "interface": None}


def test_slurm_job_script_from_deploy_config():
    pytest.importorskip("dask_jobqueue")
    from sacla_dask.hpc import jobqueue_cluster

    with dask.config.set(deploy_config("slurm")):
        with jobqueue_cluster(**LOOPBACK) as cluster:
            script = cluster.job_script()
            address = cluster.scheduler_address
    assert type(cluster).__name__ == "SLURMCluster"
    assert script.startswith("#!/usr/bin/env bash")
    for line in ("#SBATCH -J sacla-dask-worker", "#SBATCH -p normal", "#SBATCH -n 1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=28G", "#SBATCH -t 04:00:00",
                 "source ~/venvs/sacla/bin/activate"):
        assert line in script.splitlines(), line
    worker = script.strip().splitlines()[-1]
    # 8 single-threaded worker processes sharing the job's memory, spilling to $TMPDIR
    assert "distributed.cli.dask_worker" in worker and address in worker
    for arg in ("--nthreads 1", "--nworkers 8", "--memory-limit 3.50GiB",
                "--local-directory $TMPDIR", "--interface ib0", "--death-timeout 120"):
        assert arg in worker, arg


def test_pbs_job_script_from_deploy_config():
    pytest.importorskip("dask_jobqueue")
    from sacla_dask.hpc import jobqueue_cluster

    with dask.config.set(deploy_config("pbs")):
        with jobqueue_cluster(**LOOPBACK) as cluster:
            script = cluster.job_script()
    assert type(cluster).__name__ == "PBSCluster"
    for line in ("#PBS -N sacla-dask-worker", "#PBS -q workq",
                 "#PBS -l select=1:ncpus=8:mem=28GB", "#PBS -l walltime=04:00:00"):
        assert line in script.splitlines(), line
    worker = script.strip().splitlines()[-1]
    for arg in ("--nthreads 1", "--nworkers 8", "--memory-limit 3.50GiB", "--interface ib0"):
        assert arg in worker, arg


def test_jobqueue_without_configuration_says_where_to_look():
    pytest.importorskip("dask_jobqueue")
    from sacla_dask.hpc import jobqueue_cluster

    with dask.config.set({"sacla_dask.jobqueue.system": None, "jobqueue.slurm.cores": None,
                          "jobqueue.pbs.cores": None}):
        with pytest.raises(ParameterError, match="deploy/README.md"):
            jobqueue_cluster()


def test_batch_scripts_are_valid_shell():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    scripts = [DEPLOY / "slurm" / "process.sbatch", DEPLOY / "slurm" / "srun.sbatch",
               DEPLOY / "pbs" / "process.pbs", DEPLOY / "ci" / "slurm-single-node.sh"]
    for s in scripts:
        r = subprocess.run([bash, "-n", str(s)], capture_output=True, text=True)
        assert r.returncode == 0, (s, r.stderr)
    assert "--cluster jobqueue" in scripts[0].read_text()
    assert "--scheduler-file" in scripts[1].read_text()


# -- a real SLURM ---------------------------------------------------------------------
def slurm_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and bool(re.search(r"idle|mixed", r.stdout))


needs_slurm = pytest.mark.skipif(
    not slurm_up(), reason="no SLURM controller with an idle node here "
                           "(sh deploy/ci/slurm-single-node.sh starts one, as root)")


@needs_slurm
@pytest.mark.slow
def test_cli_on_slurm_through_dask_jobqueue(small_run, small_params, tmp_path):
    """`sacla-dask process --cluster jobqueue`: the worker runs in a SLURM job; that
    job is cancelled mid-run, a replacement job is submitted, the result is whole."""
    from dask_procs import DELAY_ENV, HERE

    name = f"sacla-dask-test-{os.getpid()}"  # scancel only our own job
    conf = tmp_path / "dask-config"
    conf.mkdir()
    (conf / "jobqueue.yaml").write_text(yaml.safe_dump({
        "sacla_dask": {"jobqueue": {"system": "slurm", "replace-interval": "1s"}},
        "distributed": {"deploy": {"lost-worker-timeout": "1s"}},
        "jobqueue": {"slurm": {
            "name": name, "cores": 1, "processes": 1, "memory": "1GiB",
            "walltime": "00:10:00", "interface": "lo", "death-timeout": 30,
            "local-directory": str(tmp_path), "log-directory": str(tmp_path / "logs"),
            "python": sys.executable,
            # 0.5 s per raw image block read: time to cancel the job mid-run
            "job-script-prologue": [f"export {DELAY_ENV}=0.5"],
            "worker-extra-args": ["--preload", str(HERE)],
            "scheduler-options": {"dashboard_address": "127.0.0.1:0"}}}}))
    out = tmp_path / "r.zarr"
    env = {**os.environ, "DASK_CONFIG": str(conf)}
    cmd = [sys.executable, "-m", "sacla_dask.cli", "-v", *cli_args(small_run, small_params, out),
           "--cluster", "jobqueue", "--jobs", "1", "--no-progress"]
    with open(tmp_path / "cli.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=env)
        try:
            t0 = time.monotonic()
            while store.done_chunks(out, 5).sum() < 2:
                assert proc.poll() is None and time.monotonic() - t0 < 180, "no progress"
                time.sleep(0.2)
            subprocess.run(["scancel", f"--name={name}"], check=True, timeout=30)
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            subprocess.run(["scancel", f"--name={name}"], timeout=30)
    stderr = (tmp_path / "cli.log").read_text()
    job_logs = sorted((tmp_path / "logs").glob(f"{name}-*.err"))
    logs = "\n".join(p.read_text() for p in job_logs)
    assert proc.returncode == 0, stderr[-3000:] + logs[-3000:]
    assert f"#SBATCH -J {name}" in stderr  # the job script, logged with -v
    assert "a batch job ended: submitting a replacement" in stderr
    # two SLURM jobs (slurmd wrote their logs), each a worker of our scheduler
    assert len(job_logs) == 2, job_logs
    assert len(re.findall(r"Registered to:\s+tcp://127\.0\.0\.1:\d+", logs)) == 2
    assert_same_result(store.open_result(out), reference(small_run, small_params))


@needs_slurm
@pytest.mark.slow
def test_srun_batch_script_on_slurm(small_run, small_params, tmp_path):
    """deploy/slurm/srun.sbatch: scheduler, srun workers and driver in one allocation."""
    out = tmp_path / "r.zarr"
    env = {**os.environ, "IFACE": "lo", "WORKER_MEM": "1GiB",
           "VENV": str(tmp_path / "no-venv")}
    cmd = ["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=1", "--mem-per-cpu=1500M",
           "--time=5", f"--output={tmp_path}/job.out", str(DEPLOY / "slurm" / "srun.sbatch"),
           *cli_args(small_run, small_params, out)[1:]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert r.returncode == 0, r.stderr + log[-3000:]
    assert f"wrote {out}" in log
    assert_same_result(store.open_result(out), reference(small_run, small_params))
    assert np.all(store.open_result(out)["tag"].values == small_run.tags)
