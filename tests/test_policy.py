"""`MeduPolicy`: stage-1 selection, record thresholding, presets, JSON form, validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medustore import PRESETS, MeduPolicy
from medustore.codecs import DiffThresholdCodec, LatticeCodec
from medustore.policy import parse_policy


def select(policy: MeduPolicy, weights: list[float], dnorms: list[float],
           users: list | None = None, agg_norm: float = 1.0) -> set:
    users = list(range(len(weights))) if users is None else users
    mask = policy.select(users, np.array(weights, float), np.array(dnorms, float), agg_norm)
    assert mask.dtype == bool and mask.shape == (len(users),)
    return {u for u, k in zip(users, mask, strict=True) if k}


# ---------------------------------------------------------------------------- select


def test_keep_all_by_default() -> None:
    assert select(MeduPolicy(), [1, 2, 3], [0.0, 5.0, 1.0]) == {0, 1, 2}


def test_keep_top_ranks_by_weight_times_norm() -> None:
    # Scores 1*10=10, 5*3=15, 2*4=8, 1*1=1: weight matters, not the norm alone.
    w, d = [1, 5, 2, 1], [10, 3, 4, 1]
    assert select(MeduPolicy(keep_top=1), w, d) == {1}
    assert select(MeduPolicy(keep_top=2), w, d) == {0, 1}
    assert select(MeduPolicy(keep_top=3), w, d) == {0, 1, 2}
    assert select(MeduPolicy(keep_top=10), w, d) == {0, 1, 2, 3}


def test_keep_top_ties_prefer_the_earlier_user() -> None:
    assert select(MeduPolicy(keep_top=2), [1, 1, 1], [2, 2, 2], ["x", "y", "z"]) == {"x", "y"}


@pytest.mark.parametrize(("fraction", "n", "kept"), [
    (0.25, 4, 1), (0.25, 5, 2), (0.5, 4, 2), (0.3, 10, 3), (1.0, 7, 7), (0.01, 3, 1),
])
def test_keep_fraction_rounds_up(fraction: float, n: int, kept: int) -> None:
    d = list(range(1, n + 1))  # score grows with the index
    got = select(MeduPolicy(keep_fraction=fraction), [1.0] * n, d)
    assert got == set(range(n - kept, n))


@settings(max_examples=50)
@given(st.lists(st.tuples(st.floats(0.1, 10), st.floats(0, 100)), min_size=1, max_size=12),
       st.integers(1, 12))
def test_keep_top_keeps_the_highest_scores(rows: list[tuple[float, float]], k: int) -> None:
    w = [r[0] for r in rows]
    d = [r[1] for r in rows]
    kept = select(MeduPolicy(keep_top=k), w, d)
    assert len(kept) == min(k, len(rows))
    scores = [wi * di for wi, di in rows]
    dropped = set(range(len(rows))) - kept
    if kept and dropped:
        assert min(scores[i] for i in kept) >= max(scores[i] for i in dropped)


def test_always_keep_forces_users_past_the_limit() -> None:
    p = MeduPolicy(keep_top=1, always_keep=("quiet", 3))
    users = ["loud", "quiet", 3, "other"]
    assert select(p, [1, 1, 1, 1], [9, 0.1, 0.2, 5], users) == {"loud", "quiet", 3}
    # Forced users need not take part.
    assert select(p, [1, 1], [1, 2], ["a", "b"]) == {"b"}


def test_kappa_drops_records_close_to_the_aggregate() -> None:
    p = MeduPolicy(kappa=0.5)
    # ||d|| <= kappa * ||hbar|| is dropped (the boundary too).
    assert select(p, [1, 1, 1, 1], [0.1, 1.0, 1.01, 5.0], agg_norm=2.0) == {2, 3}
    assert select(MeduPolicy(kappa=0.5, always_keep=(0,)), [1, 1], [0.1, 0.1],
                  agg_norm=2.0) == {0}
    # kappa combines with stage 1: the top user is still dropped when it is too small.
    assert select(MeduPolicy(keep_top=1, kappa=1.0), [5, 1], [1.0, 1.5], agg_norm=1.2) == set()


def test_kappa_zero_keeps_zero_differentials() -> None:
    assert select(MeduPolicy(), [1], [0.0], agg_norm=0.0) == {0}


# ---------------------------------------------------------------------------- presets


def test_presets() -> None:
    assert set(PRESETS) >= {"full", "lattice", "medu"}
    full, lattice, medu = PRESETS["full"], PRESETS["lattice"], PRESETS["medu"]
    assert full.lattice is None and full.coord_threshold is None and full.kappa == 0
    assert full.keep_top is None and full.keep_fraction is None
    assert full.record_serializer() is None and full.aggregate_serializer() is None
    assert lattice.lattice is not None and lattice.keep_top is None
    assert lattice.keep_fraction is None and lattice.coord_threshold is None
    assert medu.lattice is not None and medu.coord_threshold is not None
    assert medu.keep_top is not None or medu.keep_fraction is not None
    for name, p in PRESETS.items():
        assert p.name == name
        assert p.describe().startswith(f"{name}: ")
    assert parse_policy(None) is PRESETS["medu"]
    assert parse_policy("full") is full
    assert parse_policy(lattice) is lattice
    assert parse_policy(lattice.to_json()) == lattice


@pytest.mark.parametrize("bad", ["nope", "FULL", ""])
def test_unknown_preset(bad: str) -> None:
    with pytest.raises(ValueError, match="preset"):
        parse_policy(bad)


def test_policy_of_wrong_type() -> None:
    with pytest.raises(TypeError):
        parse_policy(3)  # type: ignore[arg-type]


def test_serializers_follow_the_stages() -> None:
    p = MeduPolicy(coord_threshold=0.5, lattice="A2", bits=3, aggregate_bits=6)
    rec = p.record_serializer()
    assert rec is not None and rec["name"] == DiffThresholdCodec.codec_id
    assert rec["configuration"]["relative"] == 0.5
    assert rec["configuration"]["inner"]["id"] == LatticeCodec.codec_id
    agg = p.aggregate_serializer()
    assert agg is not None and agg["name"] == LatticeCodec.codec_id
    assert agg["configuration"]["bits"] == 6
    assert MeduPolicy(lattice="Z").record_serializer()["name"] == LatticeCodec.codec_id
    assert MeduPolicy(lattice="Z").aggregate_serializer() is None


# ---------------------------------------------------------------------------- error model


def test_expected_error_lossless_and_thresholded() -> None:
    rng = np.random.default_rng(0)
    d = rng.normal(size=300).astype(np.float32)
    assert MeduPolicy().expected_error(d) == (0.0, 0.0, 300)
    ev, zn, surv = MeduPolicy(coord_threshold=1.0).expected_error(d)
    x = d.astype(np.float64)
    small = np.abs(x) <= np.sqrt(np.mean(x * x))
    assert ev == 0.0
    assert surv == int((~small).sum())
    assert zn == pytest.approx(np.linalg.norm(x[small]), rel=1e-12)


def test_expected_error_of_the_lattice_is_g_s2_per_value() -> None:
    rng = np.random.default_rng(1)
    d = rng.normal(size=256).astype(np.float32)
    p = MeduPolicy(lattice="E8", bits=4)
    ev, zn, surv = p.expected_error(d)
    codec = LatticeCodec("E8", bits=4)
    assert zn == 0.0 and surv == 256
    assert ev == pytest.approx(codec.error_variance(d) * 256, rel=1e-12)


def test_expected_error_mirrors_zarr_padding_of_the_last_chunk() -> None:
    # zarr hands the codec a full-length last chunk padded with zeros; the budget must
    # use the step the codec computes from that padded chunk, for the real values only.
    rng = np.random.default_rng(2)
    d = rng.normal(size=200).astype(np.float32)
    p = MeduPolicy(lattice="Z", bits=4, chunk_size=128)
    codec = LatticeCodec("Z", bits=4)
    tail = np.concatenate([d[128:], np.zeros(56, np.float32)])
    want = codec.error_variance(d[:128]) * 128 + codec.error_variance(tail) * 72
    assert p.expected_error(d)[0] == pytest.approx(want, rel=1e-12)
    assert p.expected_aggregate_error(d) == 0.0  # no aggregate_bits: lossless
    pa = MeduPolicy(lattice="Z", aggregate_bits=4, chunk_size=128)
    assert pa.expected_aggregate_error(d) == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------------- JSON form


policies = st.builds(
    MeduPolicy,
    keep_top=st.none() | st.integers(1, 50),
    always_keep=st.lists(st.integers(0, 99) | st.text(min_size=1, max_size=5), max_size=3,
                         unique=True).map(tuple),
    kappa=st.floats(0, 10),
    coord_threshold=st.none() | st.floats(0, 5),
    lattice=st.none() | st.sampled_from(["Z", "A2", "D4", "E8"]),
    bits=st.sampled_from([1.0, 2.5, 4.0, 8.0]),
    aggregate_bits=st.none() | st.sampled_from([4.0, 8.0]),
    keep_aggregates=st.booleans(),
    chunk_size=st.integers(64, 2**22),
    name=st.text(max_size=8),
)


@settings(max_examples=30)
@given(policies)
def test_json_round_trip(policy: MeduPolicy) -> None:
    data = json.loads(json.dumps(policy.to_json()))
    back = MeduPolicy.from_json(data)
    assert back == policy
    assert back.always_keep == policy.always_keep
    assert isinstance(back.always_keep, tuple)


def test_json_round_trip_of_presets_and_fraction() -> None:
    for p in [*PRESETS.values(), MeduPolicy(keep_fraction=0.3, always_keep=(1, "x"))]:
        assert MeduPolicy.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_from_json_refuses_unknown_fields() -> None:
    data = PRESETS["medu"].to_json()
    data["quantum"] = True
    with pytest.raises(ValueError, match="quantum"):
        MeduPolicy.from_json(data)


def test_evolve() -> None:
    p = PRESETS["medu"].evolve(bits=3.0)
    assert p.bits == 3.0 and p.name == "custom" and p.lattice == PRESETS["medu"].lattice
    assert PRESETS["medu"].evolve(name="mine").name == "mine"
    with pytest.raises(ValueError):
        PRESETS["medu"].evolve(keep_top=0)


def test_describe_mentions_each_stage() -> None:
    text = MeduPolicy(keep_top=3, always_keep=("m",), kappa=0.2, coord_threshold=0.5,
                      lattice="A2", bits=3, aggregate_bits=6).describe()
    for part in ("top 3", "'m'", "kappa 0.2", "0.5", "A2", "3 bits", "6 bits"):
        assert part in text


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs", [
    {"keep_top": 2, "keep_fraction": 0.5},
    {"keep_top": 0},
    {"keep_top": -1},
    {"keep_top": 1.5},
    {"keep_top": True},
    {"keep_fraction": 0.0},
    {"keep_fraction": 1.5},
    {"keep_fraction": math.nan},
    {"kappa": -0.1},
    {"kappa": math.inf},
    {"kappa": math.nan},
    {"coord_threshold": -1.0},
    {"coord_threshold": math.nan},
    {"coord_threshold": math.inf},
    {"lattice": "Q8"},
    {"lattice": "E8", "bits": 0.0},
    {"lattice": "E8", "bits": -2.0},
    {"lattice": "E8", "bits": 100.0},
    {"lattice": "A2", "aggregate_bits": 0.0},
    {"chunk_size": 10},
    {"chunk_size": 100.0},
    {"chunk_size": True},
])
def test_invalid_arguments_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        MeduPolicy(**kwargs)


# ---------------------------------------------------------------------------- segments


def _layered_record(seed: int = 3) -> tuple[np.ndarray, tuple[tuple[int, ...], ...], int]:
    """A record of a model with tensors of very different scales, its chunk segments
    (`medustore.segments.chunk_segments`) for chunks of 1,000 values, and that size."""
    from medustore.layout import ModelLayout
    from medustore.segments import chunk_segments

    shapes = {"conv.w": ((30, 40), 1e-2), "conv.b": ((30,), 1e-3), "bn.w": ((64,), 1e-4),
              "fc.w": ((1200,), 3e-4), "fc.b": ((10,), 1e-1), "out.w": ((500,), 3e-2)}
    layout = ModelLayout.from_template({k: np.zeros(s, np.float32)
                                        for k, (s, _) in shapes.items()})
    rng = np.random.default_rng(seed)
    d = np.concatenate([rng.normal(0.0, sc, int(np.prod(s))) for s, sc in shapes.values()])
    return d.astype(np.float32), chunk_segments(layout, 1000), 1000


def _encode_record(policy: MeduPolicy, d: np.ndarray, segments, chunk: int, seed: int
                   ) -> list[bytes]:
    """Encode ``d`` chunk by chunk as the writer does (zero padding, segments)."""
    inner = LatticeCodec(policy.lattice, bits=policy.bits, seed=seed)
    codec = (DiffThresholdCodec(relative=policy.coord_threshold, inner=inner)
             if policy.coord_threshold is not None else inner)
    out = []
    for i, start in enumerate(range(0, d.size, chunk)):
        part = np.zeros(chunk, np.float32)
        piece = d[start : start + chunk]
        part[: piece.size] = piece
        out.append(codec.encode(part, segments=segments[i]))
    return out


@pytest.mark.parametrize("threshold", [None, 0.0, 0.5])
@pytest.mark.parametrize("lattice", ["Z", "E8"])
def test_expected_error_mirrors_the_segmented_codecs(threshold: float | None,
                                                     lattice: str) -> None:
    from medustore.codecs import get_lattice, threshold_info
    from medustore.codecs.lattice import lattice_info
    from medustore.testing import threshold_header

    d, segments, chunk = _layered_record()
    policy = MeduPolicy(lattice=lattice, bits=2.0, coord_threshold=threshold,
                        chunk_size=chunk, aggregate_bits=3.0)
    evar, znorm, surv = policy.expected_error(d, segments)
    G = get_lattice(lattice).G
    want_evar, want_zsq, want_surv = 0.0, 0.0, 0
    for i, buf in enumerate(_encode_record(policy, d, segments, chunk, seed=1)):
        real = min(chunk, d.size - i * chunk)
        if threshold is not None:
            info = threshold_info(buf)
            want_zsq += info.zeroed_norm**2
            want_surv += info.survivors
            inner = threshold_header(buf).inner
            segs = lattice_info(inner).segments if inner else ()
            want_evar += sum(G * s**2 * n for n, s in segs)  # survivors are real values
        else:
            want_surv += real
            a = 0
            for n, s in lattice_info(buf).segments:
                want_evar += G * s**2 * max(0, min(a + n, real) - a)
                a += n
    assert evar == pytest.approx(want_evar, rel=1e-12)
    assert znorm == pytest.approx(np.sqrt(want_zsq), rel=1e-9)
    assert surv == want_surv
    # the aggregate: one segment table per chunk too
    agg = policy.expected_aggregate_error(d, segments)
    agg_codec = LatticeCodec(lattice, bits=3.0)
    want = 0.0
    for i, start in enumerate(range(0, d.size, chunk)):
        part = np.zeros(chunk, np.float64)
        part[: min(chunk, d.size - start)] = d[start : start + chunk]
        want += agg_codec.expected_error(part, segments[i], real=min(chunk, d.size - start))
    assert agg == pytest.approx(want, rel=1e-12)  # the same terms; numpy 2.5 may round apart


def test_expected_error_with_segments_is_measured_error() -> None:
    # E||e||^2 from the policy against the mean measured over seeds, per record.
    d, segments, chunk = _layered_record(seed=4)
    policy = MeduPolicy(lattice="E8", bits=2.0, chunk_size=chunk)
    evar, _, _ = policy.expected_error(d, segments)
    measured = []
    for seed in range(40):
        dec = np.concatenate([LatticeCodec().decode(b) for b in
                              _encode_record(policy, d, segments, chunk, seed=100 + seed)])
        measured.append(float(np.sum((dec[: d.size].astype(np.float64) - d) ** 2)))
    m = np.mean(measured)
    assert abs(m - evar) < 6 * np.std(measured) / np.sqrt(len(measured))


def test_expected_error_segments_must_match_the_chunks() -> None:
    d, segments, chunk = _layered_record()
    policy = MeduPolicy(lattice="Z", bits=2.0, chunk_size=chunk)
    with pytest.raises(ValueError, match="segment tables"):
        policy.expected_error(d, segments[:-1])
    with pytest.raises(ValueError, match="segments"):
        policy.expected_error(d, [(5,)] * len(segments))
    # None and one segment per chunk are the same thing
    one = [(chunk,)] * len(segments)
    assert policy.expected_error(d, one) == policy.expected_error(d)
