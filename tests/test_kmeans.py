"""compress/kmeans.py as specifications: optimal, bounded, deterministic, weight-aware, minimal covers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from compress.kmeans import assign, fewest_centers, kmeans_1d, kmeans_groups

small_values = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=9).map(np.array)
small_weights = st.lists(st.floats(0.01, 100, allow_nan=False), min_size=9, max_size=9).map(np.array)


def _sse(x, w, centers, labels) -> float:
    err = x - centers[labels]
    return float(np.sum(w * err * err))


def _brute_force_sse(x, w, k) -> float:
    """Best weighted SSE over every split of the sorted values into at most k contiguous runs."""
    order = np.argsort(x, kind="stable")
    xs, ws = x[order], w[order]
    best = np.inf
    for parts in range(1, min(k, len(xs)) + 1):
        for cuts in itertools.combinations(range(1, len(xs)), parts - 1):
            sse = 0.0
            for seg_x, seg_w in zip(np.split(xs, cuts), np.split(ws, cuts)):
                mean = np.sum(seg_w * seg_x) / np.sum(seg_w)
                sse += np.sum(seg_w * (seg_x - mean) ** 2)
            best = min(best, sse)
    return best


def _fewest_cover_brute_force(x, tol) -> int:
    xs = np.sort(x)
    for parts in range(1, len(xs) + 1):
        for cuts in itertools.combinations(range(1, len(xs)), parts - 1):
            if all(seg[-1] - seg[0] <= 2 * tol for seg in np.split(xs, cuts)):
                return parts
    raise AssertionError("unreachable: one run per value always fits")


@settings(max_examples=150, deadline=None)
@given(values=small_values, k=st.integers(1, 4))
def test_optimal_against_every_contiguous_partition(values, k):
    r = kmeans_1d(values, k)
    best = _brute_force_sse(values, np.ones_like(values), k)
    got = _sse(values, np.ones_like(values), r.centers, r.labels)
    assert got <= best + 1e-9 * max(1.0, best)
    assert r.inertia == pytest.approx(got, rel=1e-6, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(values=small_values, weights=small_weights, k=st.integers(1, 4))
def test_weighted_optimal_against_every_contiguous_partition(values, weights, k):
    w = weights[: len(values)]
    r = kmeans_1d(values, k, w)
    best = _brute_force_sse(values, w, k)
    # kmeans_1d nudges every weight by 1e-6 of the mean (so zero weights still place), hence 1e-5
    assert _sse(values, w, r.centers, r.labels) <= best * (1 + 1e-5) + 1e-9


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=300).map(np.array),
       k=st.integers(1, 40))
@example(values=np.array([0.0, 1.0, 2.0, 3.0, 2.225073858507e-311, -1.0, -2.257286911544144e-68]), k=6)
def test_at_most_k_sorted_centres_labels_in_range_and_nearest(values, k):
    r = kmeans_1d(values, k)
    assert 1 <= len(r.centers) <= k
    assert np.all(np.diff(r.centers) > 0)
    assert r.labels.shape == values.shape and r.labels.dtype == np.int32
    assert r.labels.min() >= 0 and r.labels.max() < len(r.centers)
    np.testing.assert_array_equal(r.labels, assign(values, r.centers))
    dist = np.abs(values[:, None] - r.centers[None, :])
    np.testing.assert_allclose(dist[np.arange(len(values)), r.labels], dist.min(axis=1), rtol=0, atol=1e-9)


def test_deterministic():
    x = np.random.default_rng(3).standard_normal(5000)
    a, b = kmeans_1d(x, 16), kmeans_1d(x.copy(), 16)
    np.testing.assert_array_equal(a.centers, b.centers)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.inertia == b.inertia


@given(uniq=st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=8, unique=True),
       reps=st.integers(1, 5), extra=st.integers(0, 4))
def test_fewer_distinct_values_than_k_is_exact(uniq, reps, extra):
    x = np.repeat(np.array(uniq), reps)
    r = kmeans_1d(x, len(uniq) + extra)
    assert r.inertia == 0.0
    np.testing.assert_array_equal(r.centers, np.unique(x))
    np.testing.assert_array_equal(r.centers[r.labels], x)


def test_heavily_weighted_value_sits_on_a_centre():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(400)
    target = 40  # a value between the obvious 4-cluster centres
    x[target] = 0.37
    w = np.ones_like(x)
    plain = kmeans_1d(x, 4)
    w[target] = 1e6
    weighted = kmeans_1d(x, 4, w)
    plain_err = abs(plain.centers[plain.labels[target]] - x[target])
    weighted_err = abs(weighted.centers[weighted.labels[target]] - x[target])
    assert plain_err > 0.05
    assert weighted_err < 1e-3 < plain_err


def test_zero_weights_still_get_labels():
    x = np.array([0.0, 1.0, 2.0, 10.0])
    r = kmeans_1d(x, 2, np.array([1.0, 1.0, 1.0, 0.0]))
    assert r.labels.shape == (4,) and r.labels.max() < len(r.centers)


@pytest.mark.parametrize("bad", [np.array([1.0, -1.0, 1.0]), np.array([1.0, np.nan, 1.0])],
                         ids=["negative", "nan"])
def test_bad_weights_are_refused(bad):
    with pytest.raises(ValueError, match="finite and non-negative"):
        kmeans_1d(np.array([0.0, 1.0, 2.0]), 2, bad)


def test_empty_input_and_bad_k():
    r = kmeans_1d(np.array([]), 4)
    assert r.centers.size == 0 and r.labels.size == 0 and r.inertia == 0.0
    with pytest.raises(ValueError, match="k must be >= 1"):
        kmeans_1d(np.array([1.0]), 0)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=8).map(np.array),
       tol=st.floats(0, 1.5))
def test_fewest_centers_keeps_tolerance_and_is_minimal(values, tol):
    r = fewest_centers(values, tol)
    assert np.all(np.abs(values - r.centers[r.labels]) <= tol + 1e-12)
    assert len(r.centers) == _fewest_cover_brute_force(values, tol)


def test_fewest_centers_zero_tolerance_counts_distinct_values():
    x = np.array([3.0, 1.0, 3.0, 2.0, 1.0])
    r = fewest_centers(x, 0.0)
    np.testing.assert_array_equal(r.centers, [1.0, 2.0, 3.0])
    assert r.inertia == 0.0
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        fewest_centers(x, -1.0)


@pytest.mark.parametrize("shape,k,groups", [((12, 5), 4, 3), ((10, 3, 3), 2, 4), ((7,), 8, 1)],
                         ids=["matrix", "conv", "vector-k-over-distinct"])
def test_kmeans_groups_shapes_and_total(shape, k, groups):
    x = np.random.default_rng(0).standard_normal(shape)
    centers, labels, total = kmeans_groups(x, k, groups)
    assert centers.shape == (groups, k)
    assert labels.shape == x.shape and labels.max() < k
    rows = shape[0]
    size = -(-rows // groups)
    flat = x.reshape(rows, -1)
    flat_labels = labels.reshape(rows, -1)
    block = np.arange(rows) // size
    decoded = centers[block[:, None], flat_labels]
    assert float(np.sum((flat - decoded) ** 2)) == pytest.approx(total, rel=1e-9, abs=1e-12)
    expected = sum(kmeans_1d(flat[g * size:(g + 1) * size], k).inertia for g in range(groups))
    assert total == pytest.approx(expected, rel=1e-12)


_DISTRIBUTIONS = {
    "normal": lambda rng: rng.standard_normal(1500),
    "laplace": lambda rng: rng.laplace(size=1500),
    "bimodal": lambda rng: np.concatenate([rng.normal(-2, 0.3, 750), rng.normal(1.5, 0.8, 750)]),
}


@pytest.mark.slow
@pytest.mark.parametrize("k", [4, 16])
@pytest.mark.parametrize("dist", list(_DISTRIBUTIONS))
def test_not_worse_than_sklearn(dist, k):
    from sklearn.cluster import KMeans

    x = _DISTRIBUTIONS[dist](np.random.default_rng(7))
    ours = kmeans_1d(x, k).inertia
    theirs = KMeans(n_clusters=k, n_init=10, random_state=0).fit(x.reshape(-1, 1)).inertia_
    assert ours <= theirs * (1 + 1e-9)
