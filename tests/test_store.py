"""The result store: states, parameter fingerprints, chunk-by-chunk writes."""

from __future__ import annotations

import json
import os

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from sacla_dask import store
from sacla_dask.errors import IncompleteStoreError, OutputError


def _lazy_result(n_tags: int = 10, per: int = 3) -> xr.Dataset:
    """A small result-like dataset: per-tag dask arrays and in-memory arrays."""
    rng = np.random.default_rng(0)
    polar = da.from_array(rng.random((n_tags, 4, 6), dtype=np.float32), chunks=(per, 4, 6))
    rmean = da.from_array(rng.random((n_tags, 4)), chunks=(per, 4))
    total = polar.sum(axis=0)  # a reduction over all tags
    ds = xr.Dataset(
        {"polar": (("tag", "q", "phi"), polar), "row_mean": (("tag", "q"), rmean),
         "total": (("q", "phi"), total), "mask": (("q", "phi"), np.ones((4, 6), bool))},
        coords={"tag": np.arange(100, 100 + n_tags), "q": np.linspace(1, 2, 4)},
        attrs={"sacla_dask_version": "test", "qmin": 1.0, "complete": False},
    )
    return ds


def _write_all(path, ds, todo=None):
    params, sha = store.parameters(ds)
    store.write_template(path, ds, ["polar", "row_mean"], 3, "lz4", params, sha)
    n = len(ds.polar.data.chunks[0])
    todo = np.ones(n, bool) if todo is None else todo
    arrays = {"polar": ds.polar.data, "row_mean": ds.row_mean.data}
    return store.chunk_writes(path, arrays, todo)


def _files(root) -> dict:
    """A store's files: parsed JSON for metadata, bytes for chunks."""
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                data = fh.read()
            out[os.path.relpath(path, root)] = json.loads(data) if f == "zarr.json" else data
    return out


@pytest.mark.parametrize("compression", store.COMPRESSIONS)
def test_template_is_what_xarray_writes_to_disk(tmp_path, compression):
    """write_template (made in memory, written as files) leaves the very store xarray's own
    to_zarr(compute=False) writes of the template dataset, and of the result with its real
    lazy arrays: the same files, metadata and chunk bytes."""
    ds = _lazy_result()
    params, sha = store.parameters(ds, compression=compression)
    store.write_template(tmp_path / "t.zarr", ds, ["polar", "row_mean"], 3, compression,
                         params, sha)
    tmpl, encoding = store.template_dataset(ds, ["polar", "row_mean"], 3, compression,
                                            params, sha)
    tmpl.to_zarr(tmp_path / "ref.zarr", mode="w", compute=False, consolidated=False,
                 zarr_format=3, encoding=encoding, safe_chunks=False)
    # and the lazy arrays' stand-ins change nothing: the real ones written the same way
    real = ds.assign({store.DONE: tmpl[store.DONE]})
    real.attrs = dict(tmpl.attrs)
    real.to_zarr(tmp_path / "real.zarr", mode="w", compute=False, consolidated=False,
                 zarr_format=3, encoding=encoding, safe_chunks=False)
    got = _files(tmp_path / "t.zarr")
    assert any(k.startswith("mask" + os.sep + "c") for k in got)  # in-memory data written
    assert not any(k.startswith("polar" + os.sep + "c") for k in got)  # lazy: metadata only
    for ref in (_files(tmp_path / "ref.zarr"), _files(tmp_path / "real.zarr")):
        assert sorted(got) == sorted(ref)
        for key in ref:
            assert got[key] == ref[key], key
    assert got["zarr.json"]["attributes"][store.FINGERPRINT] == sha
    assert store.store_state(tmp_path / "t.zarr") == "incomplete"


def test_states(tmp_path):
    assert store.store_state(tmp_path / "none") == "absent"
    (tmp_path / "file").write_text("x")
    assert store.store_state(tmp_path / "file") == "foreign"
    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["x"] = 1
    assert store.store_state(tmp_path / "other.zarr") == "foreign"
    with pytest.raises(OutputError, match="not a sacla_dask result store"):
        store.prepare_output(tmp_path / "other.zarr", resume=True)
    with pytest.raises(OutputError, match="does not exist"):
        store.prepare_output(tmp_path / "no" / "dir.zarr")


def test_template_then_chunks_then_finish(tmp_path):
    """Chunks land where they belong; the store reads back equal to the lazy result."""
    ds = _lazy_result()
    p = tmp_path / "r.zarr"
    writes = _write_all(p, ds)
    assert store.store_state(p) == "incomplete"
    assert store.done_chunks(p).tolist() == [False] * 4
    # the template already holds the in-memory arrays, the lazy ones are not computed
    assert zarr.open_group(p, mode="r")["mask"][...].all()
    with pytest.raises(IncompleteStoreError, match="0 of 4 tag chunks written"):
        store.open_result(p)
    assert dask.compute(writes)[0] == 10
    assert store.done_chunks(p).all()
    store.write_arrays(p, {"total": ds.total.values})
    store.finish(p)
    assert store.store_state(p) == "complete"
    res = store.open_result(p)
    assert store.DONE not in res.variables and store.DONE_DIM not in res.dims
    xr.testing.assert_identical(res.drop_attrs(), ds.compute().drop_attrs())
    assert res.attrs["complete"] is True
    assert json.loads(res.attrs[store.PARAMETERS])["qmin"] == 1.0


def test_partial_writes_and_resume_array(tmp_path):
    """Only flagged chunks are written; a resumed array reads those back and
    computes only the others."""
    ds = _lazy_result()
    p = tmp_path / "r.zarr"
    todo = np.array([True, False, True, False])
    dask.compute(_write_all(p, ds, todo))
    assert store.done_chunks(p).tolist() == todo.tolist()
    assert store.progress_text(p) == "2 of 4 tag chunks written"
    stored = zarr.open_array(store=str(p), path="polar", mode="r")[...]
    np.testing.assert_array_equal(stored[0:3], ds.polar.values[0:3])
    np.testing.assert_array_equal(stored[6:9], ds.polar.values[6:9])

    # a "fresh" array whose chunks 0 and 2 must not be computed again
    computed = []

    def mark(block, block_info=None):
        computed.append(block_info[0]["chunk-location"][0])
        return block

    fresh = ds.polar.data.map_blocks(mark, dtype=np.float32)
    resumed = store.resume_array(p, "polar", fresh, todo)
    np.testing.assert_array_equal(resumed.compute(scheduler="sync"), ds.polar.values)
    assert sorted(computed) == [1, 3]
    assert resumed.chunks == fresh.chunks
    assert store.resume_array(p, "polar", fresh, np.zeros(4, bool)) is fresh


def _row_max(block):
    return block.max(axis=1)


def test_chunk_writes_compute_derived_arrays_in_the_write(tmp_path):
    """A derived per-tag array is computed by each chunk's write task from its source
    block: it lands in the store with the chunk, with no task of its own."""
    ds = _lazy_result()
    ds = ds.assign(row_max=(("tag",), ds.row_mean.data.max(axis=1)))
    p = tmp_path / "r.zarr"
    params, sha = store.parameters(ds)
    store.write_template(p, ds, ["polar", "row_mean", "row_max"], 3, "lz4", params, sha)
    arrays = {"polar": ds.polar.data, "row_mean": ds.row_mean.data}
    todo = np.array([True, True, False, True])
    writes = store.chunk_writes(p, arrays, todo, {"row_max": (_row_max, "row_mean")})
    graph = dict(writes.__dask_graph__())
    assert sum(1 for k in graph if isinstance(k, tuple) and "write-tag-chunk" in k[0]) == 3
    assert not any("max" in str(k) for k in graph)     # no task computes row_max
    assert dask.compute(writes)[0] == 7
    got = zarr.open_array(store=str(p), path="row_max", mode="r")[...]
    want = ds.row_mean.values.max(axis=1)
    np.testing.assert_array_equal(got[todo.repeat(3)[:10]], want[todo.repeat(3)[:10]])
    assert np.isnan(got[6:9]).all()                        # chunk 2 not written (fill NaN)
    with pytest.raises(ValueError, match="source array 'nope'"):
        store.chunk_writes(p, arrays, todo, {"row_max": (_row_max, "nope")})


def test_chunk_writes_reject_misaligned_chunks(tmp_path):
    ds = _lazy_result()
    with pytest.raises(ValueError, match="not the tag chunks"):
        store.chunk_writes(tmp_path / "x.zarr", {"polar": ds.polar.data,
                                                  "row_mean": ds.row_mean.data.rechunk(5)},
                           np.ones(4, bool))


def test_fingerprint_tracks_parameters_and_data(tmp_path):
    ds = _lazy_result()
    _, sha = store.parameters(ds, compression="lz4")
    assert store.parameters(_lazy_result(), compression="lz4")[1] == sha
    assert store.parameters(ds, compression="zstd")[1] != sha
    other = ds.assign_attrs(qmin=1.5)
    assert store.parameters(other)[1] != store.parameters(ds)[1]
    # in-memory data enter by digest: another mask is another result
    m = ds.mask.values.copy()
    m[0, 0] = False
    assert store.parameters(ds.assign(mask=(("q", "phi"), m)))[1] != store.parameters(ds)[1]
    # the "complete" flag itself does not
    assert store.parameters(ds.assign_attrs(complete=True))[1] == store.parameters(ds)[1]


def test_prepare_output_refuses_other_parameters(tmp_path):
    ds = _lazy_result()
    p = tmp_path / "r.zarr"
    dask.compute(_write_all(p, ds, np.array([True, False, False, False])))
    params, sha = store.parameters(ds)
    assert store.prepare_output(p, resume=True, fingerprint=sha, params=params) == "incomplete"
    with pytest.raises(OutputError, match="unfinished result; pass --overwrite"):
        store.prepare_output(p, resume=False, fingerprint=sha)
    p2, sha2 = store.parameters(ds.assign_attrs(qmin=1.5))
    with pytest.raises(OutputError, match=r"different parameters \(qmin \(store 1.0, now 1.5\)"):
        store.prepare_output(p, resume=True, fingerprint=sha2, params=p2)
    assert store.done_chunks(p).sum() == 1  # untouched by the refusal
    assert store.prepare_output(p, overwrite=True, fingerprint=sha2) == "absent"
    assert not p.exists()


def test_prepare_output_complete_store(tmp_path):
    ds = _lazy_result()
    p = tmp_path / "r.zarr"
    dask.compute(_write_all(p, ds))
    store.write_arrays(p, {"total": ds.total.values})
    store.finish(p)
    params, sha = store.parameters(ds)
    assert store.prepare_output(p, resume=True, fingerprint=sha, params=params) == "complete"
    with pytest.raises(OutputError, match="complete result; pass --overwrite"):
        store.prepare_output(p, resume=False, fingerprint=sha)
    p2, sha2 = store.parameters(ds.assign_attrs(qmin=2.0))
    with pytest.raises(OutputError, match="complete result computed with different"):
        store.prepare_output(p, resume=True, fingerprint=sha2, params=p2)


def test_half_written_template_is_restarted(tmp_path):
    """A store of ours without a fingerprint was killed while writing its
    template: it holds nothing worth keeping and is started again."""
    p = tmp_path / "r.zarr"
    zarr.open_group(p, mode="w").attrs.update({store.MARKER: "x", "complete": False})
    assert store.store_state(p) == "incomplete"
    assert store.prepare_output(p, resume=True, fingerprint="abc") == "absent"
    assert not p.exists()


def test_write_arrays_checks_shape(tmp_path):
    ds = _lazy_result()
    p = tmp_path / "r.zarr"
    _write_all(p, ds)
    with pytest.raises(ValueError, match="does not match"):
        store.write_arrays(p, {"total": np.zeros((3, 3))})


def _disk_full_after(monkeypatch, n_ok: int) -> None:
    """Every write to a LocalStore (or a template file) after the first ``n_ok`` fails
    with ENOSPC."""
    import errno
    import os

    import zarr.storage

    orig = zarr.storage.LocalStore.set
    count = [0]

    async def set_(store_, key, value):
        count[0] += 1
        if count[0] > n_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
        return await orig(store_, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_)
    # the template's nodes are written as plain files after its root group
    write_file = store._write_file

    def write_file_(path, data):
        count[0] += 1
        if count[0] > n_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return write_file(path, data)

    monkeypatch.setattr(store, "_write_file", write_file_)


@pytest.mark.parametrize("n_ok", [1, 4])
def test_disk_full_while_writing_the_template(tmp_path, monkeypatch, n_ok):
    """An OutputError naming the store; what is left is ours and unfinished, and the
    same parameters start it again."""
    ds = _lazy_result()
    p = tmp_path / "r.zarr"
    params, sha = store.parameters(ds)
    with monkeypatch.context() as m:
        _disk_full_after(m, n_ok)
        with pytest.raises(OutputError, match=r"r\.zarr.*No space left on device.*resume"):
            store.write_template(p, ds, ["polar", "row_mean"], 3, "lz4", params, sha)
    assert store.store_state(p) == "incomplete"  # the marker came with the first write
    assert store.prepare_output(p, resume=True, fingerprint=sha, params=params) == "absent"


def test_disk_full_while_writing_a_chunk(tmp_path, monkeypatch):
    ds = _lazy_result()
    p = tmp_path / "r.zarr"
    writes = _write_all(p, ds)
    with monkeypatch.context() as m:
        _disk_full_after(m, 1)
        with pytest.raises(OutputError, match=r"cannot write the result store .*r\.zarr"):
            dask.compute(writes, scheduler="sync")
    # one array of the first chunk went in, the next failed: the chunk is not flagged
    assert store.done_chunks(p).sum() == 0
