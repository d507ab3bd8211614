"""Real ``dask scheduler`` / ``dask worker`` processes on loopback, for tests.

Used by tests/test_cluster.py and tests/test_resume.py. Every process is
started in its own session and stopped (SIGTERM, then SIGKILL after a
timeout) by :meth:`DaskProcesses.close`, which the fixtures always call.

This file is also a worker preload (``dask worker --preload <this file>``):
:func:`dask_setup` makes every read of a block of raw images sleep
``SACLA_DASK_TEST_DELAY`` seconds (so that a test has time to kill something
mid-run) and append a line to the file ``SACLA_DASK_TEST_READ_LOG`` (so that
a test can count what was read from the raw data).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
DELAY_ENV = "SACLA_DASK_TEST_DELAY"
READ_LOG_ENV = "SACLA_DASK_TEST_READ_LOG"


def dask_setup(worker: Any) -> None:
    """Worker preload: slow down and log each raw image block read."""
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    log = os.environ.get(READ_LOG_ENV, "")
    if delay <= 0 and not log:
        return
    from sacla_dask.io import hdf5

    def logged(original: Any) -> Any:
        def read(sources: Any, *args: Any, **kwargs: Any) -> Any:
            time.sleep(delay)
            out = original(sources, *args, **kwargs)
            if log:
                with open(log, "a") as fh:  # one short line per write: atomic with O_APPEND
                    fh.write(f"{sources[0].tag} {len(sources)}\n")
            return out

        return read

    # _TagReader and the pipeline's polar task look the functions up at call time
    hdf5._read_block = logged(hdf5._read_block)
    hdf5.read_pixels = logged(hdf5.read_pixels)


def reads_logged(path: Path) -> int:
    """How many raw image blocks the workers read (see :func:`dask_setup`)."""
    try:
        return len(Path(path).read_text().splitlines())
    except FileNotFoundError:
        return 0


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)


class DaskProcesses:
    """A scheduler and workers started with the ``dask`` command line.

    Parameters
    ----------
    workdir : Path
        Scheduler file, worker spill directories and process logs.
    delay : float
        Seconds each worker sleeps before each raw image block read (see
        :func:`dask_setup`); the reads are logged to :attr:`read_log`.
    """

    def __init__(self, workdir: Path, delay: float = 0.0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.scheduler_file = self.workdir / "scheduler.json"
        self.read_log = self.workdir / "reads.log"
        self.delay = delay
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self._client: Any = None

    # -- processes -----------------------------------------------------------
    def _popen(self, args: list[str], log: str) -> subprocess.Popen:
        env = dict(os.environ, **{DELAY_ENV: str(self.delay), READ_LOG_ENV: str(self.read_log)})
        fh = open(self.workdir / log, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
                                start_new_session=True)
        fh.close()
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        out = []
        for p in sorted(self.workdir.glob("*.log")):
            out.append(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def start_scheduler(self, timeout: float = 30.0) -> None:
        self._popen(["scheduler", "--host", "127.0.0.1", "--port", "0",
                     "--dashboard-address", "127.0.0.1:0", "--no-show",
                     "--scheduler-file", str(self.scheduler_file)], "scheduler.log")
        t0 = time.monotonic()
        while True:
            try:
                if json.loads(self.scheduler_file.read_text()).get("address"):
                    return
            except (OSError, ValueError):
                pass
            if self.procs[0].poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError("dask scheduler did not start:\n" + self.logs())
            time.sleep(0.1)

    def start_worker(self, nanny: bool = False, wait: bool = True,
                     timeout: float = 60.0) -> subprocess.Popen:
        """One single-threaded worker (``--no-nanny``: its pid is the worker's)."""
        n = len(self.workers)
        before = len(self.client.scheduler_info(n_workers=-1)["workers"]) if wait else 0
        proc = self._popen(["worker", "--scheduler-file", str(self.scheduler_file),
                            "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1",
                            "--dashboard-address", "127.0.0.1:0", "--name", f"w{n}",
                            "--local-directory", str(self.workdir / f"w{n}"),
                            "--memory-limit", "2GiB", "--death-timeout", "60",
                            "--nanny" if nanny else "--no-nanny",
                            "--preload", str(HERE)], f"worker{n}.log")
        self.workers.append(proc)
        if wait:
            try:
                self.client.wait_for_workers(before + 1, timeout=timeout)
            except Exception as exc:
                raise RuntimeError(f"dask worker did not start ({exc}):\n" + self.logs()) from None
        return proc

    def kill_worker(self, proc: subprocess.Popen) -> None:
        """SIGKILL, as an out-of-memory killer or a lost node would."""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    @property
    def address(self) -> str:
        return json.loads(self.scheduler_file.read_text())["address"]

    @property
    def client(self) -> Any:
        """A client of the test itself (not set as the default client)."""
        if self._client is None:
            from distributed import Client

            self._client = Client(scheduler_file=str(self.scheduler_file), timeout="30s",
                                  set_as_default=False)
        return self._client

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until neither the scheduler nor a worker holds a task.

        When a client dies the scheduler forgets its tasks at once, but a
        task already running on a worker runs to its end (and may still
        write); wait for that too.
        """
        t0 = time.monotonic()
        # lambdas: pickled by value (the scheduler and workers cannot import this file)
        while (self.client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
               or any(self.client.run(lambda dask_worker: len(dask_worker.state.tasks)).values())):
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("the Dask cluster is still busy")
            time.sleep(0.1)

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close(timeout=10)
            except Exception:
                pass
            self._client = None
        for proc in reversed(self.procs):
            _stop(proc)
