"""Pairing strategies: consecutive shots, user lists, shots that look alike."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sacla_dask.errors import PairingError, ParameterError
from sacla_dask.io.run import open_run
from sacla_dask.pairs import (
    consecutive_pairs,
    pair_indices,
    read_pairs_file,
    shared_shots,
    sharing_pairs,
    similar_pairs,
    write_pairs_file,
)
from sacla_dask.plan import plan_run


def pulse_energy(path):
    ev = open_run(path).events
    return dict(zip(ev["tag"].values, ev["pulse_energy"].values, strict=True))


def test_consecutive_pairs_skip_dark_shots_without_breaking_the_chain():
    tags = np.array([10, 12, 14, 16, 18, 20, 22])
    bright = np.array([0, 1, 1, 0, 1, 1, 1], bool)
    np.testing.assert_array_equal(consecutive_pairs(tags, bright),
                                  [[12, 14], [14, 18], [18, 20], [20, 22]])
    np.testing.assert_array_equal(consecutive_pairs(tags, bright, overlapping=False),
                                  [[12, 14], [18, 20]])
    assert shared_shots(consecutive_pairs(tags, bright)) == 3
    assert shared_shots(consecutive_pairs(tags, bright, overlapping=False)) == 0
    assert sharing_pairs(consecutive_pairs(tags, bright)) == 3
    assert sharing_pairs(consecutive_pairs(tags, bright, overlapping=False)) == 0
    with pytest.raises(PairingError, match="at least two bright"):
        consecutive_pairs(tags, np.eye(1, 7, 2, dtype=bool)[0])


def test_pairs_file_in_the_tutorial_format(tmp_path):
    p = tmp_path / "pairs.json"
    p.write_text(json.dumps([["tag_166762140", "tag_166762142"], [166762144, "166762146"]]))
    np.testing.assert_array_equal(read_pairs_file(p),
                                  [[166762140, 166762142], [166762144, 166762146]])
    write_pairs_file(tmp_path / "back.json", read_pairs_file(p))
    assert json.loads((tmp_path / "back.json").read_text()) == [[166762140, 166762142],
                                                                [166762144, 166762146]]
    for text, msg in (("[[1, 2, 3]]", "not \\[tagA, tagB\\]"), ("{", "not valid JSON"),
                      ("[]", "non-empty"), ('[["a", "b"]]', "not a pair of tag")):
        p.write_text(text)
        with pytest.raises(PairingError, match=msg):
            read_pairs_file(p)
    with pytest.raises(PairingError, match="does not exist"):
        read_pairs_file(tmp_path / "nope.json")


def test_pairs_naming_missing_tags_are_dropped_and_counted():
    tags = np.array([100, 102, 104, 106])
    pairs = np.array([[100, 102], [102, 999], [104, 104], [106, 100]])
    ia, ib, kept = pair_indices(pairs, tags)
    np.testing.assert_array_equal(kept, [True, False, False, True])
    np.testing.assert_array_equal(tags[ia], [100, 106])
    np.testing.assert_array_equal(tags[ib], [102, 100])
    with pytest.raises(PairingError, match="999"):
        pair_indices(pairs, tags, strict=True)


def _min_cost_matching(x):
    """Brute force over every perfect matching of len(x) (even) points: min sum |dx|."""
    def matchings(idx):
        if not idx:
            yield []
            return
        a, rest = idx[0], idx[1:]
        for k, b in enumerate(rest):
            for m in matchings(rest[:k] + rest[k + 1:]):
                yield [(a, b)] + m

    return min(sum(abs(x[a] - x[b]) for a, b in m) for m in matchings(list(range(len(x)))))


def test_scalar_similarity_pairing_is_the_optimal_matching():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.random(8)
        tags = np.arange(8) * 2 + 1000
        got = similar_pairs(tags, np.ones(8, bool), x)
        cost = sum(abs(x[(a - 1000) // 2] - x[(b - 1000) // 2]) for a, b in got)
        assert cost == pytest.approx(_min_cost_matching(x))
        assert shared_shots(got) == 0 and got.shape == (4, 2)


def test_vector_similarity_pairing_recovers_planted_twins():
    rng = np.random.default_rng(1)
    centres = rng.random((15, 6)) * 10
    feats = np.concatenate([centres, centres + 0.01 * rng.standard_normal((15, 6))])
    order = rng.permutation(30)
    feats = feats[order]
    tags = 500 + 2 * np.arange(30)
    bright = np.ones(30, bool)
    got = similar_pairs(tags, bright, feats)
    twin = order % 15                      # the planted twin id of each shot
    pos = {t: i for i, t in enumerate(tags)}
    assert all(twin[pos[a]] == twin[pos[b]] for a, b in got)
    assert len(got) == 15 and shared_shots(got) == 0
    # dark shots and shots without a feature are left out
    bright[[0, 1]] = False
    feats[5] = np.nan
    got = similar_pairs(tags, bright, feats)
    assert not np.isin(tags[[0, 1, 5]], got).any()
    with pytest.raises(PairingError, match="at least two"):
        similar_pairs(tags[:3], np.array([1, 0, 0], bool), feats[:3])


def test_similar_pairs_odd_count_leaves_one_out():
    got = similar_pairs([1, 2, 3], [True, True, True], [0.0, 5.0, 0.1])
    np.testing.assert_array_equal(got, [[1, 3]])


def test_pipeline_pairing_by_pulse_energy(small_run, small_params):
    plan = plan_run(small_run.path, pairing="pulse_energy", **small_params)
    e = pulse_energy(small_run.path)
    d_sim = np.mean([abs(e[a] - e[b]) for a, b in plan.pairs])
    cons = plan_run(small_run.path, **small_params)
    d_cons = np.mean([abs(e[a] - e[b]) for a, b in cons.pairs])
    assert d_sim < 0.2 * d_cons, (d_sim, d_cons)
    assert plan.ia.size == small_run.bright.sum() // 2
    ds = plan.dataset()
    assert ds.attrs["pairing"] == "pulse_energy" and ds.attrs["shared_shots"] == 0
    assert set(ds["pair_tag_a"].values) | set(ds["pair_tag_b"].values) <= set(
        small_run.tags[small_run.bright])


@pytest.mark.parametrize("kind", ["intensity", "profile", "angular"])
def test_pipeline_pairing_by_image_features(small_run, small_params, kind):
    """Image-feature pairings read the band once at plan time; intensity pairs follow the
    pulse energy (the synthetic shots' intensity scales with it)."""
    plan = plan_run(small_run.path, pairing=kind, chunks=9, **small_params)
    assert plan.ia.size == small_run.bright.sum() // 2
    assert shared_shots(plan.pairs) == 0
    if kind == "intensity":
        e = pulse_energy(small_run.path)
        cons = plan_run(small_run.path, **small_params)
        d_sim = np.mean([abs(e[a] - e[b]) for a, b in plan.pairs])
        d_cons = np.mean([abs(e[a] - e[b]) for a, b in cons.pairs])
        assert d_sim < 0.3 * d_cons, (d_sim, d_cons)


def test_pipeline_pairs_file_with_missing_tags(small_run, small_params, tmp_path):
    t = small_run.tags
    p = tmp_path / "pairs.json"
    pairs = [[int(t[6]), int(t[7])], [int(t[8]), 123], [int(t[9]), int(t[12])]]
    p.write_text(json.dumps(pairs))
    plan = plan_run(small_run.path, pairs=p, **small_params)
    ds = plan.dataset()
    assert ds.attrs["n_pairs_dropped"] == 1 and ds.attrs["n_pairs_requested"] == 3
    assert ds.attrs["pairing"] == "file"
    np.testing.assert_array_equal(ds["pair_tag_a"].values, [t[6], t[9]])
    np.testing.assert_array_equal(ds["pair_tag_b"].values, [t[7], t[12]])
    assert int(ds["n_pairs"]) == 2
    with pytest.raises(ParameterError, match="either pairs"):
        plan_run(small_run.path, pairs=p, pairing="intensity", **small_params)
    with pytest.raises(ParameterError, match="pairing must be one of"):
        plan_run(small_run.path, pairing="random", **small_params)


def test_sharing_pairs_counts_pairs_of_pairs_with_a_shot_in_common():
    from itertools import combinations

    def brute(pairs):
        return sum(bool(set(a) & set(b)) for a, b in combinations(map(tuple, pairs), 2))

    rng = np.random.default_rng(3)
    cases = [np.zeros((0, 2), int), [[1, 2]], [[1, 2], [3, 4]], [[1, 2], [2, 1], [1, 2]],
             [[5, 1], [5, 2], [5, 3], [2, 3]]]
    cases += [rng.integers(0, 9, (12, 2)) for _ in range(20)]
    for pairs in cases:
        p = np.asarray(pairs).reshape(-1, 2)
        p = p[p[:, 0] != p[:, 1]]
        assert sharing_pairs(p) == brute(p), p
