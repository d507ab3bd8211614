"""glibc's allocator policy in Dask workers (sacla_dask.memory), switched by Dask's config."""

from __future__ import annotations

import platform
import subprocess
import sys

import dask
import pytest

import sacla_dask as sd
from sacla_dask import memory


def test_allocator_tuned_in_workers_only_and_modes_checked():
    # glibc tuning happens in Dask workers only, never in the user's own process
    was = memory.applied_mode()
    memory.tune_worker_allocator((1000, 30000))
    assert memory.applied_mode() == was
    with pytest.raises(sd.ParameterError, match="allocator mode"):
        memory.tune_allocator("keep")
    code = ("import numpy as np\n"
            "from sacla_dask.memory import tune_allocator as t\n"
            "print(t('retain'), t('release'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert out.stdout.split() == [str(glibc)] * 2


def test_allocator_policy_follows_the_config():
    """worker.retain-image-bytes sets the image size from which workers retain memory;
    worker.malloc-tune: false leaves glibc alone."""
    assert memory.allocator_mode((1000, 6912)) == "retain"   # 27.6 MB images
    assert memory.allocator_mode((40, 5000)) == "release"    # 0.8 MB images
    with dask.config.set({"sacla_dask.worker.retain-image-bytes": "100kB"}):
        assert memory.allocator_mode((40, 5000)) == "retain"
    code = ("import dask\n"
            "from sacla_dask.memory import applied_mode, tune_allocator\n"
            "with dask.config.set({'sacla_dask.worker.malloc-tune': False}):\n"
            "    print(tune_allocator('retain'), applied_mode())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "retain"]
