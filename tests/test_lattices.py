"""Lattices: exact closest points, index maps, coding contexts, the box-shaped cell."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medustore.codecs import LATTICES, Lattice, get_lattice
from medustore.testing import (
    brute_force_closest,
    in_voronoi,
    is_lattice_point,
    relevant_vectors,
    scaled_examples,
    short_vectors,
)

NAMES = sorted(LATTICES)
SQRT3 = float(np.sqrt(3.0))

# Published values (Conway & Sloane, SPLAG table 2.3 and ch. 21), written out independently
# of the code: normalized second moment, fundamental volume, covering radius, kissing number.
THEORY = {
    "Z": dict(G=1.0 / 12.0, volume=1.0, rho=0.5, kissing=2),
    "A2": dict(G=0.0801875, volume=SQRT3 / 2.0, rho=1.0 / SQRT3, kissing=6),
    "D4": dict(G=0.0766032, volume=2.0, rho=1.0, kissing=24),
    "E8": dict(G=0.0716821, volume=1.0, rho=1.0, kissing=240),
}
# A generator matrix of each lattice in the coordinates medustore uses (rows are basis vectors).
BASES = {
    "Z": [[1.0]],
    "A2": [[1.0, 0.0], [0.5, SQRT3 / 2.0]],
    "D4": [[2, 0, 0, 0], [-1, 1, 0, 0], [0, -1, 1, 0], [0, 0, -1, 1]],
    "E8": [[2, 0, 0, 0, 0, 0, 0, 0], [-1, 1, 0, 0, 0, 0, 0, 0], [0, -1, 1, 0, 0, 0, 0, 0],
           [0, 0, -1, 1, 0, 0, 0, 0], [0, 0, 0, -1, 1, 0, 0, 0], [0, 0, 0, 0, -1, 1, 0, 0],
           [0, 0, 0, 0, 0, -1, 1, 0], [0.5] * 8],
}
# Largest natural-unit magnitude at which to_index/from_index must round-trip here; the
# codec accepts indices up to 2**50 (see test_index_round_trip_large_a2).
SAFE_MAGNITUDE = 2.0**30


@pytest.fixture(params=NAMES)
def lat(request: pytest.FixtureRequest) -> Lattice:
    return get_lattice(request.param)


def _inputs(lat: Lattice, seed: int, n: int = 2000) -> np.ndarray:
    """Points that stress a closest-point search: generic, near cell faces, far away."""
    rng = np.random.default_rng(seed)
    generic = rng.normal(0.0, 3.0, (n, lat.dim))
    far = rng.uniform(-1e6, 1e6, (n // 4, lat.dim))
    # Midpoints between a lattice point and a neighbour lie on a Voronoi facet; nudge them.
    base = lat.closest(rng.normal(0.0, 5.0, (n // 2, lat.dim)))
    rel = relevant_vectors(lat)
    mids = base + 0.5 * rel[rng.integers(0, len(rel), n // 2)]
    mids += rng.normal(0.0, 1e-7, mids.shape)
    return np.concatenate([generic, far, mids])


# ---------------------------------------------------------------- reference geometry


def test_reference_geometry_matches_published_values(lat: Lattice) -> None:
    theory = THEORY[lat.name]
    basis = np.asarray(BASES[lat.name], dtype=np.float64)
    assert is_lattice_point(lat, basis).all()
    # Rows in L with |det| equal to L's covolume generate L itself.
    assert abs(np.linalg.det(basis)) == pytest.approx(theory["volume"], rel=1e-12)
    assert len(relevant_vectors(lat)) == theory["kissing"]
    assert lat.volume == pytest.approx(theory["volume"], rel=1e-12)
    assert lat.covering_radius == pytest.approx(theory["rho"], rel=1e-12)
    assert lat.G == pytest.approx(theory["G"], rel=1e-5)
    assert lat.scale_per_dim == pytest.approx(theory["volume"] ** (1.0 / lat.dim), rel=1e-12)


def test_in_voronoi_agrees_with_brute_force(lat: Lattice) -> None:
    # Random directions, radii up to 1.3 covering radii: both sides of every facet.
    rng = np.random.default_rng(1)
    d = rng.normal(size=(3000, lat.dim))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    y = d * rng.uniform(0.0, 1.3 * lat.covering_radius, (3000, 1))
    inside = np.all(np.abs(brute_force_closest(lat, y)) < 1e-12, axis=1)
    assert inside.any() and not inside.all()
    np.testing.assert_array_equal(in_voronoi(lat, y), inside)


# ---------------------------------------------------------------- closest point


@pytest.mark.parametrize("seed", [0, 1])
def test_closest_is_nearest(lat: Lattice, seed: int) -> None:
    y = _inputs(lat, seed)
    got = lat.closest(y)
    assert got.shape == y.shape and got.dtype == np.float64
    assert is_lattice_point(lat, got).all()
    ref = brute_force_closest(lat, y)
    d_got = np.einsum("ij,ij->i", y - got, y - got)
    d_ref = np.einsum("ij,ij->i", y - ref, y - ref)
    # Never farther than the reference (a tie on a facet may pick either point), up to the
    # rounding of y - v at |y| (about 1e-16 |y| per coordinate).
    tol = 1e-12 + 1e-14 * (1.0 + np.abs(y).max(axis=1))
    assert np.all(d_got <= d_ref + tol)
    same = np.all(np.abs(got - ref) <= 1e-9 * (1.0 + np.abs(y)), axis=1)
    assert same.mean() > 0.999
    assert np.sqrt(d_got.max()) <= lat.covering_radius * (1 + 1e-9)


@settings(max_examples=scaled_examples(200))
@given(name=st.sampled_from(NAMES), data=st.data())
def test_closest_is_nearest_hypothesis(name: str, data: st.DataObject) -> None:
    lat = get_lattice(name)
    row = data.draw(st.lists(st.floats(-1e4, 1e4), min_size=lat.dim, max_size=lat.dim))
    y = np.asarray([row], dtype=np.float64)
    got, ref = lat.closest(y), brute_force_closest(lat, y)
    assert is_lattice_point(lat, got).all()
    assert np.sum((y - got) ** 2) <= np.sum((y - ref) ** 2) * (1 + 1e-12) + 1e-12


def test_closest_of_lattice_points_is_identity(lat: Lattice) -> None:
    pts = short_vectors(lat, 2.0 * lat.covering_radius)
    np.testing.assert_allclose(lat.closest(pts), pts, atol=1e-12)


def test_measured_second_moment(lat: Lattice) -> None:
    # Uniform points over a large region: the mean squared distance to the nearest lattice
    # point per dimension, over V^(2/n), is G.
    y = np.random.default_rng(5).uniform(-50.0, 50.0, (200_000 // lat.dim * 2, lat.dim))
    err = y - lat.closest(y)
    per_block = np.einsum("ij,ij->i", err, err) / lat.dim / lat.volume ** (2.0 / lat.dim)
    se = per_block.std() / np.sqrt(per_block.size)
    assert abs(per_block.mean() - THEORY[lat.name]["G"]) < 6 * se


# ---------------------------------------------------------------- indices


def test_index_round_trip_points(lat: Lattice) -> None:
    rng = np.random.default_rng(2)
    for mag in (1.0, 1e3, 1e6, SAFE_MAGNITUDE):
        v = lat.closest(rng.uniform(-mag, mag, (4000, lat.dim)))
        k = lat.to_index(v)
        assert k.dtype == np.int64
        np.testing.assert_array_equal(lat.from_index(k), v)


def test_index_round_trip_indices(lat: Lattice) -> None:
    rng = np.random.default_rng(3)
    k = rng.integers(-(2**29), 2**29, (5000, lat.dim))
    v = lat.from_index(k)
    assert is_lattice_point(lat, v).all()
    np.testing.assert_array_equal(lat.to_index(v), k)


def test_index_is_floor_over_widths(lat: Lattice) -> None:
    # The documented map k_j = floor(v_j / w_j), i.e. v - k w lies in the box cell.
    v = lat.closest(np.random.default_rng(4).normal(0.0, 20.0, (3000, lat.dim)))
    k = lat.to_index(v)
    r = v - k * lat.widths
    assert np.all(r >= -1e-9) and np.all(r < lat.widths - 1e-9)


def test_index_round_trip_large_a2() -> None:
    lat = get_lattice("A2")
    v = lat.closest(np.random.default_rng(6).uniform(2.0**36, 2.0**40, (20_000, 2)))
    np.testing.assert_array_equal(lat.from_index(lat.to_index(v)), v)


# ---------------------------------------------------------------- coding contexts


def test_contexts_depend_only_on_earlier_columns(lat: Lattice) -> None:
    rng = np.random.default_rng(7)
    k = rng.integers(-1000, 1000, (4000, lat.dim))
    for j in range(lat.dim):
        ctx, n = lat.contexts(k, j)
        assert n >= 1
        if ctx is None:
            assert n == 1
            continue
        assert ctx.shape == (len(k),) and ctx.min() >= 0 and ctx.max() < n
        assert len(np.unique(ctx)) == n  # every context value occurs on random indices
        changed = k.copy()
        changed[:, j:] = rng.integers(-1000, 1000, changed[:, j:].shape)
        ctx2, n2 = lat.contexts(changed, j)
        assert n2 == n
        np.testing.assert_array_equal(ctx2, ctx)


def test_contexts_ignore_uninitialised_later_columns(lat: Lattice) -> None:
    # The decoder fills columns in order into an np.empty array: garbage (even extreme
    # values) in later columns must not change the context of column j.
    k = np.random.default_rng(8).integers(-50, 50, (500, lat.dim))
    for j in range(lat.dim):
        garbage = k.copy()
        garbage[:, j:] = np.iinfo(np.int64).max
        a, b = lat.contexts(k, j), lat.contexts(garbage, j)
        assert a[1] == b[1]
        if a[0] is not None:
            np.testing.assert_array_equal(a[0], b[0])


# ---------------------------------------------------------------- the box cell


def test_box_volume_equals_lattice_volume(lat: Lattice) -> None:
    assert np.prod(lat.widths) == pytest.approx(THEORY[lat.name]["volume"], rel=1e-12)
    assert lat.widths.shape == (lat.dim,) and np.all(lat.widths > 0)


# Each lattice lies in a rectangular grid (steps per coordinate), for exhaustive enumeration.
_GRIDS = {"Z": [1.0], "A2": [0.5, SQRT3 / 2.0], "D4": [1.0] * 4, "E8": [0.5] * 8}


def test_box_translates_do_not_overlap(lat: Lattice) -> None:
    # v + box and v' + box overlap iff |v_j - v'_j| < w_j for every j: no non-zero lattice
    # point may lie in the open box (-w, w). With equal volumes the translates then tile.
    g = np.asarray(_GRIDS[lat.name])
    m = np.ceil(lat.widths / g).astype(int)
    pts = np.stack(np.meshgrid(*[np.arange(-a, a + 1) * b for a, b in zip(m, g, strict=True)],
                               indexing="ij"), axis=-1).reshape(-1, lat.dim)
    pts = pts[np.all(np.abs(pts) < lat.widths - 1e-12, axis=1)]
    members = pts[is_lattice_point(lat, pts)]
    assert members.shape == (1, lat.dim) and not members.any()


def test_box_is_fundamental_cell(lat: Lattice) -> None:
    # Every point x has exactly one lattice point v with x - v in [0, w): enumerate every
    # grid point in (x - w, x] and count the lattice points among them.
    x = np.random.default_rng(9).uniform(-100.0, 100.0, (300, lat.dim))
    g = np.asarray(_GRIDS[lat.name])
    steps = np.rint(lat.widths / g).astype(int)
    offsets = np.stack(np.meshgrid(*[np.arange(s) for s in steps], indexing="ij"),
                       axis=-1).reshape(-1, lat.dim)
    top = np.floor(x / g) * g  # the grid point at or below x, coordinatewise
    cand = top[:, None, :] - offsets[None, :, :] * g
    in_box = np.all((x[:, None, :] - cand >= 0) & (x[:, None, :] - cand < lat.widths), axis=2)
    member = is_lattice_point(lat, cand.reshape(-1, lat.dim)).reshape(in_box.shape)
    np.testing.assert_array_equal((in_box & member).sum(axis=1), 1)


def test_get_lattice_by_name_and_code(lat: Lattice) -> None:
    assert get_lattice(lat.name) is lat
    assert get_lattice(lat.code) is lat
    for bad in ("B3", "e8", 0, 99, None):
        with pytest.raises(ValueError, match="unknown lattice"):
            get_lattice(bad)  # type: ignore[arg-type]
