"""Following a run live (sacla_dask.live, ``sacla-dask follow``): exactness against
``process``, the growing store, kill-safety, the lock, the page in a real browser."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner

import sacla_dask as sd
from sacla_dask.cli import main
from sacla_dask.errors import OutputError, ParameterError
from sacla_dask.geometry import GeometrySpec
from sacla_dask.live import growing
from sacla_dask.live.follow import Follower, LiveOptions, LiveStatus, follow
from sacla_dask.live.lock import StoreLockedError, store_lock
from sacla_dask.live.source import DirectorySource, SWMRFileSource
from sacla_dask.live.synth import write_live_run, write_swmr_run
from sacla_dask.plan import OutputSpec, PairingSpec, PolarSpec, StatisticsSpec

SHAPE = (128, 128)
CENTER = ((SHAPE[1] - 1) / 2 + 3.3, (SHAPE[0] - 1) / 2 - 2.1)  # the writer's default
RING = (30.0, 45.0)
GEO = GeometrySpec(center=CENTER, pixel_size=50e-6, distance=0.053, wavelength=1.44)
_G = GEO.geometry(lambda: 1.44)
QMIN, QMAX = _G.radius_to_q(38), _G.radius_to_q(52)
PROCESS = dict(qmin=QMIN, qmax=QMAX, center=CENTER, pixel_size=50e-6, distance=0.053,
               wavelength=1.44)
CLI_GEOMETRY = ["--center", str(CENTER[0]), str(CENTER[1]), "--pixel-size", "5e-5",
                "--distance", "0.053", "--wavelength", "1.44", "--qmin", repr(QMIN),
                "--qmax", repr(QMAX)]


def _blocks(folder: Path, n_tags: int = 50, block: int = 8, **kw: Any) -> list[str]:
    return write_live_run(folder, n_tags, block=block, shape=SHAPE, n_dark=3,
                          ring_radii=RING, **kw)


def _options(out: Path, **kw: Any) -> LiveOptions:
    pairing = PairingSpec(q_pairs=kw.pop("q_pairs", "none"),
                          overlapping=kw.pop("overlapping", True))
    return LiveOptions(geometry=GEO, polar=PolarSpec(qmin=QMIN, qmax=QMAX), pairing=pairing,
                       statistics=StatisticsSpec(**kw), output=OutputSpec(out=str(out)),
                       threads=2)


def _assert_same(live: xr.Dataset, ref: xr.Dataset) -> None:
    """The followed store equals the batch one: tags, pairs, per-tag arrays exactly; the
    correlations to 1e-9 relative."""
    for v in ("tag", "pair_tag_a", "pair_tag_b", "bright", "selected", "run", "source",
              "polar", "row_mean", "nonfinite_bins", "image_ok", "corr_count", "n_pairs",
              "q", "phi", "polar_mask", "pair_stat"):
        if v in ref.variables:
            np.testing.assert_array_equal(live[v].values, ref[v].values, err_msg=v)
    for v in ref.data_vars:
        if str(v).startswith("corr") and not str(v).endswith("count"):
            a, b = live[v].values, ref[v].values
            scale = np.nanmax(np.abs(b)) if "fourier" in str(v) else np.abs(b)
            np.testing.assert_array_less(np.nan_to_num(np.abs(a - b)),
                                         1e-9 * np.nan_to_num(scale) + 1e-300, err_msg=v)
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=v)
    assert set(ref.data_vars) <= set(live.data_vars)
    assert live.attrs["complete"] is True


@pytest.fixture(scope="module")
def arrived(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, xr.Dataset]:
    """A run of 7 block files, and ``process`` over them (cross q pairs, bootstrap)."""
    d = tmp_path_factory.mktemp("live") / "incoming"
    paths = _blocks(d)
    ref = sd.process_run(sorted(paths), d.parent / "ref.zarr", q_pairs="0:3,2:5",
                         bootstrap=4, **PROCESS)
    return d, ref


def test_follow_equals_process(arrived: tuple[Path, xr.Dataset], tmp_path: Path) -> None:
    """Blocks folded one by one (pairs across blocks, products of linked pairs, bootstrap
    blocks) give the batch store."""
    d, ref = arrived
    ds = follow(DirectorySource(d), _options(tmp_path / "live.zarr", q_pairs="0:3,2:5",
                                             bootstrap=4), idle_timeout=0.2)
    assert ds is not None
    _assert_same(ds, ref)
    assert not os.path.exists(growing.state_path(tmp_path / "live.zarr"))


def test_non_overlapping_equals_process(tmp_path: Path) -> None:
    paths = _blocks(tmp_path / "in", n_tags=29, block=5)  # odd shots wait across blocks
    ref = sd.process_run(sorted(paths), tmp_path / "ref.zarr", overlapping=False, **PROCESS)
    ds = follow(DirectorySource(tmp_path / "in"), _options(tmp_path / "l.zarr",
                                                           overlapping=False), idle_timeout=0.2)
    _assert_same(ds, ref)  # type: ignore[arg-type]


def test_store_readable_while_growing_and_resumed(arrived: tuple[Path, xr.Dataset],
                                                 tmp_path: Path) -> None:
    """After each block the store opens (allow_incomplete) with the tags so far and a
    current corr; stopping and following again finishes it, equal to the batch store."""
    d, ref = arrived
    out = tmp_path / "live.zarr"
    opts = _options(out, q_pairs="0:3,2:5", bootstrap=4)
    assert follow(DirectorySource(d), opts, max_blocks=3) is None
    with pytest.raises(sd.IncompleteStoreError):
        sd.open_result(out)
    part = sd.open_result(out, allow_incomplete=True)
    assert part.sizes["tag"] == 24 and part.sizes["pair"] == 20
    np.testing.assert_array_equal(part["tag"].values, ref["tag"].values[:24])
    np.testing.assert_array_equal(part["pair_tag_b"].values, ref["pair_tag_b"].values[:20])
    assert int(part["n_pairs"]) == 20 and np.isfinite(part["corr"].values).any()
    assert np.isfinite(part["corr_sem"].values).any()
    ds = follow(DirectorySource(d), opts, idle_timeout=0.2)
    _assert_same(ds, ref)  # type: ignore[arg-type]


def test_crash_between_arrays_and_commit(arrived: tuple[Path, xr.Dataset], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after a block's arrays grew but before the state was replaced: the restart
    cuts them back and folds that block once."""
    d, ref = arrived
    out = tmp_path / "live.zarr"
    opts = _options(out, q_pairs="0:3,2:5", bootstrap=4)
    real = growing.save_state
    calls = {"n": 0}

    def dying(*a: Any, **k: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # the template's, two blocks', then die in the third block's
            raise KeyboardInterrupt
        real(*a, **k)

    monkeypatch.setattr(growing, "save_state", dying)
    with pytest.raises(KeyboardInterrupt):
        follow(DirectorySource(d), opts, idle_timeout=0.2)
    monkeypatch.setattr(growing, "save_state", real)
    assert zarr.open_array(store=str(out), path="tag").shape[0] == 24  # grown, not committed
    assert zarr.open_group(str(out)).attrs[growing.TAGS_ATTR] == 16
    ds = follow(DirectorySource(d), opts, idle_timeout=0.2)
    _assert_same(ds, ref)  # type: ignore[arg-type]


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait(cond: Any, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not cond():
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _committed(out: Path) -> int:
    try:
        return int(zarr.open_group(str(out), mode="r").attrs.get(growing.TAGS_ATTR, 0))
    except Exception:  # noqa: BLE001 - not there yet
        return 0


@pytest.mark.timeout(240)
def test_sigkill_then_same_command(tmp_path: Path) -> None:
    """SIGKILL of a real 'follow' while blocks arrive; the same command again: the store
    equals 'process' (nothing lost, nothing counted twice); the lock died with it."""
    d = tmp_path / "in"
    paths = _blocks(d, n_tags=60, block=4)
    ref = sd.process_run(sorted(paths), tmp_path / "ref.zarr", **PROCESS)
    out = tmp_path / "live.zarr"
    cmd = [sys.executable, "-m", "sacla_dask.cli", "follow", str(d), "--out", str(out),
           *CLI_GEOMETRY, "--idle-timeout", "60", "--workers", "1"]
    proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _committed(out) >= 12, 120, "three blocks folded")
        time.sleep(0.05)  # somewhere in the next blocks
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sd.store.store_state(out) == "incomplete"
    r = subprocess.run(cmd[:-4] + ["--idle-timeout", "0.3", "--workers", "1"], env=_cli_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    _assert_same(sd.open_result(out), ref)


def test_one_writer_per_store(arrived: tuple[Path, xr.Dataset], tmp_path: Path) -> None:
    """A second writer (follow or process) on a store being written is refused clearly."""
    d, _ = arrived
    out = tmp_path / "live.zarr"
    with store_lock(out, what="sacla-dask follow"):
        with pytest.raises(StoreLockedError, match="being written by another process"):
            follow(DirectorySource(d), _options(out), idle_timeout=0.2)
        with pytest.raises(StoreLockedError, match="pid"):
            sd.process_run(sorted(str(p) for p in d.glob("*.h5")), out, **PROCESS)
        r = CliRunner().invoke(main, ["follow", str(d), "--out", str(out), *CLI_GEOMETRY,
                                      "--idle-timeout", "0.2"])
        assert r.exit_code == 2 and "one writer per store" in r.output
    assert isinstance(StoreLockedError("x"), OutputError)
    follow(DirectorySource(d), _options(out), idle_timeout=0.2)  # free again


def test_refused_options_and_parameters(arrived: tuple[Path, xr.Dataset],
                                        tmp_path: Path) -> None:
    d, _ = arrived
    with pytest.raises(ParameterError, match="reject"):
        _options(tmp_path / "x.zarr", reject_outliers=3.0).check()
    out = tmp_path / "live.zarr"
    follow(DirectorySource(d), _options(out), max_blocks=1)
    other = LiveOptions(geometry=GEO, polar=PolarSpec(qmin=QMIN, qmax=QMAX * 1.01),
                        output=OutputSpec(out=str(out)))
    with pytest.raises(OutputError, match="different parameters"):
        Follower(other).resume()


def test_cli_synth_live_and_follow(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["synth", "--live", str(tmp_path / "in"), "--tags", "12",
                                  "--block", "5", "--rate", "0", "--shape", "128", "128",
                                  "--ring", "30", "--ring", "45", "--dark", "3"])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path / "in")) == [f"run_178884_0000{i}.h5" for i in range(3)]
    r = CliRunner().invoke(main, ["follow", str(tmp_path / "in"), "--out",
                                  str(tmp_path / "l.zarr"), *CLI_GEOMETRY,
                                  "--idle-timeout", "0.2"])
    assert r.exit_code == 0, r.output
    assert "12 tags, 8 pairs" in r.output


def test_swmr_source(tmp_path: Path) -> None:
    """One file appended to with SWMR while it is followed: tags in order, all folded."""
    path = tmp_path / "run.h5"
    t = threading.Thread(target=write_swmr_run, args=(path, 30),
                         kwargs=dict(block=7, rate=200, shape=SHAPE, ring_radius=45))
    t.start()
    try:
        _wait(path.exists, 30, "the SWMR file")
        time.sleep(0.2)
        ds = follow(SWMRFileSource(path), _options(tmp_path / "l.zarr"), idle_timeout=1.0,
                    poll_interval=0.05)
    finally:
        t.join(60)
    assert ds is not None and ds.sizes["tag"] == 30
    assert int(ds["n_pairs"]) == 27 and np.all(np.diff(ds["tag"].values) > 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(180)
def test_page_in_a_real_browser(tmp_path: Path) -> None:
    """Headless Chromium loads the page; within one session the pair count in the page
    grows as blocks arrive (the page updates by itself)."""
    from browser import Browser, chromium

    if chromium() is None:
        pytest.skip("no chromium (apt-get install chromium)")
    from sacla_dask.live.page import serve_page

    d = tmp_path / "in"
    status = LiveStatus()
    port = _free_port()
    server = serve_page(status, port)
    writer = threading.Thread(target=_blocks, args=(d,), kwargs=dict(n_tags=80, block=8,
                                                                      rate=8))
    writer.start()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["ds"] = follow(DirectorySource(d), _options(tmp_path / "l.zarr"),
                                  idle_timeout=3.0, status=status, poll_interval=0.1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    fol = threading.Thread(target=run)
    fol.start()
    try:
        _wait(lambda: status.n_pairs > 0, 60, "the first pairs")
        with Browser(f"http://127.0.0.1:{port}/") as b:
            _wait(lambda: "pairs" in b.title(), 30, "the page")
            first = int(b.title().split(",")[1].split()[0])
            _wait(lambda: int(b.title().split(",")[1].split()[0]) > first, 60,
                  "the pair count to grow in the page")
            assert b.evaluate("document.querySelectorAll('.bk-Column, [data-root-id]')"
                              ".length") >= 1
            shot = tmp_path / "page.png"
            b.screenshot(str(shot))
            assert shot.stat().st_size > 10_000
    finally:
        writer.join(60)
        fol.join(120)
        server.stop()
    assert "error" not in result, result.get("error")
    assert result["ds"].sizes["tag"] == 80
