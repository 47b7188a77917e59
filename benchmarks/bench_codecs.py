#!/usr/bin/env python
"""Codec benchmark: rate-distortion and single-core speed of `LatticeCodec` and baselines.

For every lattice (Z, A2, D4, E8) and every resolution ``bits`` in 1..8, on each data set:

* **stored rate**: bytes of the encoded chunks (headers, stream table and checksum
  included) in bits per parameter;
* **distortion**: MSE, SNR (dB), the Shannon rate of a Gaussian source of the data's
  variance at the measured MSE, ``R_shannon = 0.5 log2(var / MSE)``, and the gap
  ``rate - R_shannon``; the measured normalized second moment ``G = MSE / s**2`` (``s``
  the cell size in the chunk header);
* **entropy coding**: the empirical entropy of the stored index streams (one stream per
  coordinate and coding context, each coded on its own: the zeroth-order entropy of
  each stream), the stored rate minus that entropy, and the entropy the same indices
  would have without the context split (one stream per coordinate);
* **speed**: encode and decode MB/s of float32 input on one pinned core (best of
  ``--repeats``; both process-CPU and wall clock are recorded).

Side by side, on the same data: numcodecs ``BitRound`` + ``Zstd`` (what a zarr user would
pick for lossy floats; also with a byte ``Shuffle``), swept over ``keepbits``, and a plain
scalar rounding quantiser (``round(x / step)`` as the smallest int type, Zstd-coded),
compared with the lattices at equal MSE; and `DiffThresholdCodec` with a `LatticeCodec`
inner at a few relative thresholds.

Data sets:

* ``gaussian``: i.i.d. N(0, 1) float32 chunks of ``--values`` values;
* ``mlp``: model updates ``w_user - w_global`` of a 64-1024-512-10 MLP (596,490
  parameters) on scikit-learn's digits: a global model pre-trained for a few SGD steps,
  then ``--users`` users, each holding a Dirichlet(0.5) label shard, run ``--local-steps``
  SGD steps from it (PyTorch on CPU). One update is one chunk, as in a store record;
* ``heavy`` (used instead of ``mlp`` when PyTorch or scikit-learn is missing): Student-t
  (3 degrees of freedom) values with per-layer scales spanning three decades.

The Gaussian bound applies to the ``gaussian`` set; on other data the gap is reported
against the Gaussian of the same variance (an upper bound on the true rate-distortion
function, so the gap there may be negative).

    python benchmarks/bench_codecs.py                   # default, a few minutes
    python benchmarks/bench_codecs.py --quick           # smoke test, seconds
    python benchmarks/bench_codecs.py --markdown out.md --json out.json
    python benchmarks/bench_codecs.py --small-chunks    # rate vs Shannon, 4,810 vs 2**20
    python benchmarks/bench_codecs.py --per-tensor      # segments on bench_store's model

``--small-chunks`` codes Gaussian chunks of 4,810 values (the demo's record) and of 2**20
values at 1, 1.5, 2 and 4 bits with the context streams only (format 1's layout) and with
format 2's per-chunk choice of layout, and reports the stored rate, the Shannon rate at
the measured MSE and their gap. ``--per-tensor`` codes updates of bench_store's CNN
(tensors whose update scales span 1e-1..1e-4, 1,000,000 parameters in one 2**20-value
chunk) with E8 at 2 and 4 bits, one segment per chunk or one per tensor
(`medustore.segments.chunk_segments`), and reports bytes and the relative error
``||e_t|| / ||d_t||`` of every tensor.
"""

from __future__ import annotations

import os

# One thread for every library, before numpy, BLAS or torch start their pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any  # noqa: E402

import numcodecs  # noqa: E402
import numpy as np  # noqa: E402

from medustore.codecs import DiffThresholdCodec, LatticeCodec, get_lattice  # noqa: E402
from medustore.codecs.lattice import chunk_streams, lattice_info  # noqa: E402

LATTICE_NAMES = ("Z", "A2", "D4", "E8")
DEFAULTS = {"values": 1 << 20, "chunks": 2, "users": 8, "local_steps": 10, "repeats": 7,
            "bits": list(range(1, 9))}
QUICK = {"values": 1 << 16, "chunks": 1, "users": 2, "local_steps": 2, "repeats": 1,
         "bits": [2, 4, 8]}
THRESHOLDS = (0.1, 0.3, 0.5, 1.0)
SEED = 20250505

#: Targets: (lattice, encode MB/s, decode MB/s), gap to the Gaussian bound by bits.
SPEED_TARGETS = {"A2": (150.0, 400.0), "E8": (60.0, 200.0)}
GAP_TARGETS = {"A2": {2: 0.40, 3: 0.30, 4: 0.30, 5: 0.30, 6: 0.30},
               "E8": {2: 0.40, 3: 0.25, 4: 0.25, 5: 0.25, 6: 0.25}}
ENTROPY_TARGET = 0.05

# ------------------------------------------------------------------------------- data sets


def gaussian(values: int, chunks: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(values, dtype=np.float32) for _ in range(chunks)]


def heavy(values: int, chunks: int, seed: int) -> list[np.ndarray]:
    """Student-t(3) values, split into 8 'layers' whose scales span three decades."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(chunks):
        x = rng.standard_t(3.0, values)
        edges = np.linspace(0, values, 9).astype(int)
        for i, scale in enumerate(np.logspace(-4, -1, 8)):
            x[edges[i] : edges[i + 1]] *= scale
        out.append(x.astype(np.float32))
    return out


def mlp_updates(users: int, local_steps: int, seed: int) -> list[np.ndarray]:
    """Updates of a 64-1024-512-10 MLP on digits, one float32 vector per user."""
    import torch
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    X, y = load_digits(return_X_y=True)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    X, y = torch.tensor(X, dtype=torch.float32), torch.tensor(y)
    model = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10))
    loss_fn = torch.nn.CrossEntropyLoss()

    def sgd(net: torch.nn.Module, idx: np.ndarray, steps: int, lr: float, batch: int) -> None:
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        for _ in range(steps):
            b = torch.tensor(rng.choice(idx, size=min(batch, idx.size), replace=False))
            opt.zero_grad()
            loss_fn(net(X[b]), y[b]).backward()
            opt.step()

    sgd(model, np.arange(len(y)), 30, 0.1, 64)  # a global model part-way through training
    base = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    # Dirichlet(0.5) label shares: non-IID shards, as in federated benchmarks
    shares = rng.dirichlet([0.5] * users, size=10)
    owner = np.empty(len(y), dtype=int)
    for c in range(10):
        members = np.flatnonzero(y.numpy() == c)
        owner[members] = rng.choice(users, size=members.size, p=shares[c])
    out = []
    for u in range(users):
        idx = np.flatnonzero(owner == u)
        if idx.size == 0:
            idx = rng.choice(len(y), size=32, replace=False)
        torch.nn.utils.vector_to_parameters(base.clone(), model.parameters())
        sgd(model, idx, local_steps, 0.05, 32)
        w = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        out.append((w - base).numpy().astype(np.float32))
    return out


def load_datasets(names: list[str], p: dict[str, Any]) -> dict[str, tuple[list, str]]:
    sets: dict[str, tuple[list, str]] = {}
    for name in names:
        if name == "gaussian":
            sets[name] = (gaussian(p["values"], p["chunks"], SEED),
                          f"N(0,1) float32, {p['chunks']} chunk(s) of {p['values']:,} values")
        elif name == "mlp":
            try:
                upd = mlp_updates(p["users"], p["local_steps"], SEED)
            except ImportError as err:
                log(f"mlp data set needs torch and scikit-learn ({err}); using 'heavy'")
                name = "heavy"
            else:
                sets[name] = (upd, f"MLP 64-1024-512-10 updates on digits, {len(upd)} users x "
                                   f"{upd[0].size:,} params, {p['local_steps']} local SGD steps")
                continue
        if name == "heavy":
            sets[name] = (heavy(p["values"], p["chunks"], SEED + 1),
                          f"Student-t(3), per-layer scales 1e-4..1e-1, {p['chunks']} chunk(s) "
                          f"of {p['values']:,} values")
    return sets


# --------------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pin_to_one_core(cpu: int | None) -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[0] if cpu is None else cpu
    os.sched_setaffinity(0, {core})
    return core


def machine(core: int | None) -> dict[str, str]:
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "numcodecs": numcodecs.__version__, "platform": platform.platform()}
    for mod in ("zarr", "pcodec", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            info[mod] = "-"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "?").strip()
        info["cores"] = fields.get("CPU(s)", "?").strip()
        for cache in ("L2 cache", "L3 cache"):
            info[cache] = fields.get(cache, "?").strip()
    except (OSError, subprocess.CalledProcessError):
        info["cpu"], info["cores"] = platform.processor() or "?", str(os.cpu_count())
    info["pinned core"] = str(core)
    info["load average"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return info


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best wall and best process-CPU seconds of ``repeats`` calls (after one warm-up)."""
    fn()
    wall, cpu = math.inf, math.inf
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        c1, w1 = time.thread_time(), time.perf_counter()
        wall, cpu = min(wall, w1 - w0), min(cpu, c1 - c0)
    return wall, cpu


def entropy_bits(values: np.ndarray) -> float:
    """Total zeroth-order empirical entropy (bits) of an integer sequence."""
    if values.size == 0:
        return 0.0
    _, counts = np.unique(values, return_counts=True)
    n = values.size
    return float(n * math.log2(n) - np.sum(counts * np.log2(counts)))


def lattice_header(buf: bytes) -> tuple[float, list[int]]:
    """Cell size ``s`` and the payload bytes of each index stream of a chunk."""
    info = lattice_info(buf)
    return info.scale, list(info.stream_bytes)


def stored_indices(buf: bytes, lat: Any, blocks: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The stored streams of a chunk and its indices ``(blocks, dim)``, whatever its layout."""
    streams = chunk_streams(buf)
    layout = lattice_info(buf).layout
    if layout == 0:
        k = lat.to_index(lat.stream_points(streams, blocks))
    elif layout == 1:
        k = streams[0].reshape(lat.dim, blocks).T
    else:
        k = np.stack(streams, axis=1)
    return streams, k


# ------------------------------------------------------------------------------- lattices


def lattice_point(name: str, bits: int, chunks: list[np.ndarray], repeats: int,
                  detail: bool) -> dict[str, Any]:
    lat = get_lattice(name)
    n = sum(c.size for c in chunks)
    stored = sq_err = sq_sig = cell = h_ctx = h_col = 0.0
    streams_detail: list[dict[str, Any]] = []
    encoded = []
    for i, x in enumerate(chunks):
        codec = LatticeCodec(name, bits=bits, seed=SEED + i)
        buf = codec.encode(x)
        encoded.append((codec, buf))
        xhat = codec.decode(buf)
        err = xhat.astype(np.float64) - x
        sq_err += float(err @ err)
        sq_sig += float(x.astype(np.float64) @ x)
        stored += 8 * len(buf)
        s, lengths = lattice_header(buf)
        cell += x.size * s * s
        blocks = -(-x.size // lat.dim)
        streams, k = stored_indices(buf, lat, blocks)
        hs = [entropy_bits(st) for st in streams]
        h_ctx += sum(hs)
        h_col += sum(entropy_bits(k[:, j]) for j in range(lat.dim))
        if detail and i == 0 and lattice_info(buf).layout == 0:
            ctx_of = [(j, c) for j in range(lat.dim)
                      for c in range(lat.contexts(np.zeros((1, lat.dim), np.int64), j)[1])]
            for (j, c), st, h, nbytes in zip(ctx_of, streams, hs, lengths, strict=True):
                streams_detail.append({"coordinate": j, "context": c, "count": int(st.size),
                                       "entropy_bits_per_index": h / max(st.size, 1),
                                       "stored_bits_per_index": 8 * nbytes / max(st.size, 1)})
    all_x = np.concatenate(chunks).astype(np.float64)
    var = float(np.var(all_x))
    mse = sq_err / n
    rate = stored / n
    r_sh = 0.5 * math.log2(var / mse)
    out_buf = np.empty_like(chunks[0])
    x0 = chunks[0]
    codec0, buf0 = encoded[0]
    enc_w, enc_c = best_time(lambda: codec0.encode(x0), repeats)
    dec_w, dec_c = best_time(lambda: codec0.decode(buf0, out=out_buf), repeats)
    mb = x0.size * 4 / 1e6  # float32 input bytes
    return {
        "lattice": name, "bits": bits, "rate": rate, "mse": mse,
        "snr_db": 10 * math.log10(sq_sig / sq_err), "var": var, "r_shannon": r_sh,
        "gap": rate - r_sh, "entropy": h_ctx / n, "rate_minus_entropy": rate - h_ctx / n,
        "entropy_no_context": h_col / n, "context_gain": (h_col - h_ctx) / n,
        "G_measured": sq_err / cell, "G": lat.G,
        "enc_mbs": mb / enc_c, "dec_mbs": mb / dec_c,
        "enc_mbs_wall": mb / enc_w, "dec_mbs_wall": mb / dec_w, "chunk_values": x0.size,
        "streams": streams_detail,
    }


# ------------------------------------------------------------------------------- baselines


def bitround_sweep(chunks: list[np.ndarray], shuffle: bool, repeats: int) -> list[dict]:
    """(keepbits, rate, MSE, speed) of BitRound [+ Shuffle] + Zstd over keepbits 0..23."""
    zstd = numcodecs.Zstd()  # level 0: zstd's default (3), as zarr v3's zstd codec
    shuf = numcodecs.Shuffle(elementsize=4) if shuffle else None
    n = sum(c.size for c in chunks)
    rows = []
    for keep in range(0, 24):
        br = numcodecs.BitRound(keep)

        def encode(x: np.ndarray, br: numcodecs.BitRound = br) -> bytes:
            r = np.asarray(br.encode(x)).view(np.float32)
            return zstd.encode(shuf.encode(r) if shuf else r)

        def decode(buf: bytes, size: int) -> np.ndarray:
            raw = zstd.decode(buf)
            if shuf:
                raw = shuf.decode(raw)
            return np.frombuffer(raw, dtype=np.float32, count=size)

        stored = sq = 0.0
        for x in chunks:
            buf = encode(x)
            stored += 8 * len(buf)
            err = decode(buf, x.size).astype(np.float64) - x
            sq += float(err @ err)
        x0 = chunks[0]
        enc = best_time(partial(encode, x0), repeats)[1]
        dec = best_time(partial(decode, encode(x0), x0.size), repeats)[1]
        rows.append({"keepbits": keep, "rate": stored / n, "mse": sq / n,
                     "enc_mbs": x0.size * 4e-6 / enc, "dec_mbs": x0.size * 4e-6 / dec})
    return rows


def at_mse(curve: list[dict], mse: float) -> tuple[float, float]:
    """Rate of a (rate, MSE) sweep at ``mse``: log-interpolated, and at the cheapest
    point with MSE <= ``mse`` (NaN outside the sweep)."""
    pts = sorted(((r["mse"], r["rate"]) for r in curve), reverse=True)  # MSE falling
    le = [r for m, r in pts if m <= mse]
    at_or_below = min(le) if le else math.nan
    for (m0, r0), (m1, r1) in zip(pts, pts[1:], strict=False):
        if m1 <= mse <= m0 and m1 > 0:
            w = 0.0 if m0 == m1 else (math.log(m0) - math.log(mse)) / (math.log(m0) - math.log(m1))
            return r0 + w * (r1 - r0), at_or_below
    return math.nan, at_or_below


def scalar_point(chunks: list[np.ndarray], mse: float, repeats: int) -> dict[str, Any]:
    """round(x / step), smallest int dtype, Zstd; step chosen so that step**2 / 12 = mse."""
    zstd = numcodecs.Zstd()
    step = math.sqrt(12.0 * mse)

    def encode(x: np.ndarray) -> bytes:
        q = np.rint(x / np.float32(step))
        peak = float(np.max(np.abs(q))) if q.size else 0.0
        dt = np.int8 if peak < 2**7 else np.int16 if peak < 2**15 else np.int32
        return b"\x00" * 9 + zstd.encode(q.astype(dt))  # header: step f64 + dtype u8

    n = sum(c.size for c in chunks)
    stored = sq = 0.0
    for x in chunks:
        buf = encode(x)
        stored += 8 * len(buf)
        q = np.rint(x / np.float32(step)).astype(np.float64)
        err = q * step - x
        sq += float(err @ err)
    enc = best_time(lambda: encode(chunks[0]), repeats)[1]
    return {"step": step, "rate": stored / n, "mse": sq / n,
            "enc_mbs": chunks[0].size * 4e-6 / enc}


def threshold_points(chunks: list[np.ndarray], lattices: list[str], bits: int,
                     repeats: int) -> list[dict[str, Any]]:
    rows = []
    n = sum(c.size for c in chunks)
    for name in lattices:
        for rel in THRESHOLDS:
            stored = sq = sig = kept = 0.0
            for i, x in enumerate(chunks):
                codec = DiffThresholdCodec(relative=rel,
                                           inner=LatticeCodec(name, bits=bits, seed=SEED + i))
                buf = codec.encode(x)
                xhat = codec.decode(buf)
                err = xhat.astype(np.float64) - x
                stored += 8 * len(buf)
                sq += float(err @ err)
                sig += float(x.astype(np.float64) @ x)
                kept += int(np.count_nonzero(np.abs(x) > codec.tau(x)))
            c0 = DiffThresholdCodec(relative=rel, inner=LatticeCodec(name, bits=bits, seed=1))
            enc = best_time(partial(c0.encode, chunks[0]), repeats)[1]
            dec = best_time(partial(c0.decode, c0.encode(chunks[0])), repeats)[1]
            rows.append({"lattice": name, "bits": bits, "relative": rel, "kept": kept / n,
                         "rate": stored / n, "mse": sq / n, "snr_db": 10 * math.log10(sig / sq),
                         "enc_mbs": chunks[0].size * 4e-6 / enc,
                         "dec_mbs": chunks[0].size * 4e-6 / dec})
    return rows


# ---------------------------------------------------------------------------------- report


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            if v != 0.0 and abs(v) < 0.01:
                return f"{v:.3g}"
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _snr_at_rate(ds: dict[str, Any], lattice: str, rate: float) -> float:
    """SNR of the plain lattice codec at ``rate``, interpolated over its bits sweep."""
    curve = sorted((p["rate"], p["snr_db"]) for p in ds["lattice"] if p["lattice"] == lattice)
    for (r0, s0), (r1, s1) in zip(curve, curve[1:], strict=False):
        if r0 <= rate <= r1:
            return s0 + (rate - r0) / (r1 - r0) * (s1 - s0)
    return math.nan


def _pair(interpolated: float, at_or_below: float) -> str:
    first = "-" if math.isnan(interpolated) else f"{interpolated:.3f}"
    return f"{first} ({at_or_below:.3f})"


def _bitround_rate(ds: dict[str, Any], p: dict[str, Any]) -> float:
    """BitRound+Zstd's rate at the lattice point's MSE: interpolated where its sweep spans
    that MSE, else (coarser than keepbits 0 reaches) its cheapest point with lower MSE."""
    cmp = ds["vs_bitround"][f"{p['lattice']}/{p['bits']}"]
    return cmp["bitround_zstd"] if not math.isnan(cmp["bitround_zstd"]) \
        else cmp["bitround_zstd_le"]


def check_targets(res: dict[str, Any]) -> list[tuple[str, bool, str]]:
    checks: list[tuple[str, bool, str]] = []
    gauss = res["datasets"].get("gaussian")
    for ds_name, ds in res["datasets"].items():
        pts = ds["lattice"]
        worst = max(pts, key=lambda p: p["rate_minus_entropy"])
        checks.append((f"{ds_name}: stored rate <= entropy of stored indices + "
                       f"{ENTROPY_TARGET} bit/param (all lattices, bits)",
                       worst["rate_minus_entropy"] <= ENTROPY_TARGET,
                       f"worst {worst['rate_minus_entropy']:+.4f} ({worst['lattice']}, "
                       f"{worst['bits']} bits)"))
        for name in LATTICE_NAMES:
            losses = [(p["bits"], p["rate"], _bitround_rate(ds, p)) for p in pts
                      if p["lattice"] == name and 2 <= p["bits"] <= 8]
            if not losses:
                continue
            ok = all(r < b for _, r, b in losses if not math.isnan(b))
            margin = min((b - r, bits) for bits, r, b in losses if not math.isnan(b))
            checks.append((f"{ds_name}: {name} fewer bits than BitRound+Zstd at equal MSE, "
                           "2..8 bits", ok,
                           f"smallest saving {margin[0]:.2f} bit/param at {margin[1]} bits"))
    if gauss:
        for name, limits in GAP_TARGETS.items():
            for bits, limit in limits.items():
                p = next((p for p in gauss["lattice"] if p["lattice"] == name
                          and p["bits"] == bits), None)
                if p is not None:
                    checks.append((f"gaussian: {name} at {bits} bits within {limit} bit/param "
                                   "of the Shannon bound", p["gap"] <= limit,
                                   f"gap {p['gap']:.3f}"))
        for name, (enc_t, dec_t) in SPEED_TARGETS.items():
            pts = [p for p in gauss["lattice"] if p["lattice"] == name]
            if not pts:
                continue
            slow_e = min(pts, key=lambda p: p["enc_mbs"])
            slow_d = min(pts, key=lambda p: p["dec_mbs"])
            bad_e = [p["bits"] for p in pts if p["enc_mbs"] < enc_t]
            checks.append((f"{name} encode >= {enc_t:.0f} MB/s (gaussian, every bits)",
                           not bad_e, f"slowest {slow_e['enc_mbs']:.0f} MB/s at "
                           f"{slow_e['bits']} bits" + (f"; below at {bad_e}" if bad_e else "")))
            bad_d = [p["bits"] for p in pts if p["dec_mbs"] < dec_t]
            checks.append((f"{name} decode >= {dec_t:.0f} MB/s (gaussian, every bits)",
                           not bad_d, f"slowest {slow_d['dec_mbs']:.0f} MB/s at "
                           f"{slow_d['bits']} bits" + (f"; below at {bad_d}" if bad_d else "")))
    return checks


def report(res: dict[str, Any]) -> str:
    out = ["### Command and machine", "", "```", res["command"], "```", ""]
    out.append(table(["", ""], [[k, v] for k, v in res["machine"].items()]))
    out.append("")
    for ds_name, ds in res["datasets"].items():
        out += [f"### Data: `{ds_name}`", "", ds["description"] + ".", ""]
        out += ["Lattice codec, all rates in bit/param (headers included); `H` = entropy of the "
                "stored index streams; `H no ctx` = the same indices coded per coordinate "
                "without contexts; speeds in MB/s of float32 input, one core, chunks of "
                f"{ds['lattice'][0]['chunk_values']:,} values.", ""]
        rows = [[p["lattice"], p["bits"], p["rate"], p["mse"], p["snr_db"], p["r_shannon"],
                 p["gap"], p["entropy"], p["rate_minus_entropy"], p["entropy_no_context"],
                 f"{p['G_measured']:.5f}", round(p["enc_mbs"]), round(p["dec_mbs"])]
                for p in ds["lattice"]]
        out.append(table(["lattice", "bits", "rate", "MSE", "SNR dB", "R_shannon", "gap",
                          "H", "rate - H", "H no ctx", "G meas.", "enc MB/s", "dec MB/s"],
                         rows))
        out += ["", "At equal MSE: rate of each baseline log-interpolated between its sweep "
                "points at the lattice's MSE, in brackets its cheapest point with MSE <= it; `-` "
                "where even keepbits 0 has a lower MSE (the saving is then counted against that "
                "point):", ""]
        rows = []
        for key, cmp in ds["vs_bitround"].items():
            name, bits = key.split("/")
            p = next(q for q in ds["lattice"] if q["lattice"] == name and q["bits"] == int(bits))
            rows.append([name, int(bits), p["mse"], p["rate"],
                         _pair(cmp["bitround_zstd"], cmp["bitround_zstd_le"]),
                         _pair(cmp["bitround_shuffle_zstd"], cmp["bitround_shuffle_zstd_le"]),
                         cmp["scalar_zstd"], _bitround_rate(ds, p) - p["rate"]])
        out.append(table(["lattice", "bits", "MSE", "lattice rate", "BitRound+Zstd",
                          "BitRound+Shuffle+Zstd", "round+Zstd", "saving vs BitRound+Zstd"],
                         rows))
        out += ["", "BitRound sweep (float32, keepbits 0..16 shown; Zstd level 0 = zstd's "
                "default):", ""]
        rows = [[a["keepbits"], a["rate"], a["mse"], b["rate"], round(a["enc_mbs"]),
                 round(a["dec_mbs"]), round(b["enc_mbs"]), round(b["dec_mbs"])]
                for a, b in zip(ds["bitround"], ds["bitround_shuffle"], strict=True)
                if a["keepbits"] <= 16]
        out.append(table(["keepbits", "rate +Zstd", "MSE", "rate +Shuffle+Zstd",
                          "enc MB/s", "dec MB/s", "enc MB/s (shuffle)", "dec MB/s (shuffle)"],
                         rows))
        out += ["", "DiffThresholdCodec(relative=r, inner=LatticeCodec(bits="
                f"{ds['threshold_bits']})): `kept` = share of coordinates coded:", ""]
        rows = [[t["lattice"], t["relative"], t["kept"], t["rate"], t["mse"], t["snr_db"],
                 _snr_at_rate(ds, t["lattice"], t["rate"]), round(t["enc_mbs"]),
                 round(t["dec_mbs"])] for t in ds["threshold"]]
        out.append(table(["inner", "relative r", "kept", "rate", "MSE", "SNR dB",
                          "lattice alone: SNR dB at this rate", "enc MB/s", "dec MB/s"], rows))
        if ds.get("streams"):
            out += ["", "Index streams of one chunk (bits per stored index; the stored bits "
                    "include each stream's pcodec header):", ""]
            rows = [[s["lattice"], s["bits"], s["coordinate"], s["context"], s["count"],
                     s["entropy_bits_per_index"], s["stored_bits_per_index"]]
                    for s in ds["streams"]]
            out.append(table(["lattice", "bits", "coordinate", "context", "indices",
                              "entropy", "stored"], rows))
        out.append("")
    out += ["### Targets", ""]
    out.append(table(["target", "result", "measured"],
                     [[t, "pass" if ok else "FAIL", m] for t, ok, m in res["targets"]]))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ main


# ------------------------------------------------------------------ small chunks


def small_chunks(lattices: list[str]) -> str:
    """Rate vs Shannon on 4,810- and 2**20-value Gaussian chunks, format 1's context
    streams against format 2's per-chunk layout (markdown)."""
    from medustore.codecs import lattice as mod

    def contexts_only(streams, k, blocks, lat, coded, orig=mod._smallest_layout):
        return orig(streams, k, blocks, lat, mod.SMALL_CHUNK + 1)

    rows = []
    for values, chunks in ((4810, 40), (2**20, 2)):
        xs = gaussian(values, chunks, SEED)
        var = float(np.var(np.concatenate(xs).astype(np.float64)))
        for bits in (1, 1.5, 2, 4):
            for name in lattices:
                cells = []
                for mode in ("contexts", "chosen"):
                    stored = sq = 0.0
                    layouts = set()
                    orig = mod._smallest_layout
                    if mode == "contexts":
                        mod._smallest_layout = contexts_only
                    try:
                        for i, x in enumerate(xs):
                            codec = LatticeCodec(name, bits=bits, seed=SEED + i)
                            buf = codec.encode(x)
                            layouts.add(lattice_info(buf).layout)
                            e = codec.decode(buf).astype(np.float64) - x
                            stored += 8 * len(buf)
                            sq += float(e @ e)
                    finally:
                        mod._smallest_layout = orig
                    n = values * chunks
                    rate, r_sh = stored / n, 0.5 * math.log2(var / (sq / n))
                    cells.append((rate, rate - r_sh, layouts))
                (r0, g0, _), (r1, g1, lay) = cells
                rows.append([f"{values:,}", f"{bits:g}", name, f"{r0:.3f}", f"{g0:+.3f}",
                             f"{r1:.3f}", f"{g1:+.3f}", ",".join(map(str, sorted(lay)))])
    return table(["values/chunk", "bits", "lattice", "contexts only: rate", "gap",
                  "format 2: rate", "gap", "layouts"], rows)


# ------------------------------------------------------------------ per-tensor error

#: bench_store's CNN (benchmarks/bench_store.py, `_FIXED_LAYERS`, `_FC1_SCALE`): name,
#: shape and update scale of each tensor; fc1.weight takes the rest of the parameters.
STORE_LAYERS = [("conv1.weight", (32, 3, 3, 3), 1e-2), ("conv1.bias", (32,), 3e-3),
                ("conv2.weight", (64, 32, 3, 3), 3e-3), ("conv2.bias", (64,), 1e-3),
                ("bn2.weight", (64,), 1e-4), ("bn2.bias", (64,), 1e-4),
                ("fc1.weight", None, 3e-4), ("fc1.bias", (512,), 1e-3),
                ("fc2.weight", (10, 512), 3e-2), ("fc2.bias", (10,), 1e-1)]


def store_model(params: int) -> list[tuple[str, tuple[int, ...], float]]:
    fixed = sum(math.prod(s) for _, s, _ in STORE_LAYERS if s is not None)
    big = params - fixed
    out = []
    for n, s, sc in STORE_LAYERS:
        out.append((n, (big // 512, 512) if s is None else s, sc))
        if s is None and big % 512:
            out.append(("fc1.extra", (big % 512,), sc))
    return out


def per_tensor(params: int = 1_000_000, chunk: int = 2**20, records: int = 4,
               pairs: tuple[tuple[float, float], ...] = ((2, 2), (4, 4), (2, 0.75), (4, 1.5))
               ) -> str:
    """Bytes and per-tensor relative error of E8 records, with and without segments."""
    from medustore.layout import ModelLayout
    from medustore.segments import chunk_segments

    layers = store_model(params)
    sizes = [math.prod(s) for _, s, _ in layers]
    layout = ModelLayout.from_template({n: np.zeros(s, np.float32) for n, s, _ in layers})
    segs = chunk_segments(layout, chunk)
    rng = np.random.default_rng(SEED)
    scale = np.repeat([sc for _, _, sc in layers], sizes)
    sens = np.exp(0.75 * rng.standard_normal(params))  # as bench_store: heavy tails
    sens /= np.sqrt(np.mean(sens**2))
    ds = [(scale * sens * rng.standard_normal(params)).astype(np.float32)
          for _ in range(records)]
    bounds = np.cumsum([0, *sizes])
    out = []
    summary = []
    for bits, seg_bits in pairs:
        res = {}
        for mode in ("one segment", "per tensor"):
            nbytes, e2, d2 = 0, np.zeros(len(layers)), np.zeros(len(layers))
            for r, d in enumerate(ds):
                b = bits if mode == "one segment" else seg_bits
                codec = LatticeCodec("E8", bits=b, seed=SEED + r)
                dec = []
                for i, start in enumerate(range(0, params, chunk)):
                    part = np.zeros(chunk, np.float32)
                    piece = d[start : start + chunk]
                    part[: piece.size] = piece
                    buf = codec.encode(part, segs[i] if mode == "per tensor" else None)
                    nbytes += len(buf)
                    dec.append(codec.decode(buf)[: piece.size])
                err = np.concatenate(dec).astype(np.float64) - d
                for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                    e2[j] += float(err[a:b] @ err[a:b])
                    d2[j] += float(d[a:b].astype(np.float64) @ d[a:b])
            rel = np.sqrt(e2 / d2)
            whole = math.sqrt(e2.sum() / d2.sum())
            res[mode] = (nbytes, rel, whole)
        (b0, rel0, w0), (b1, rel1, w1) = res["one segment"], res["per tensor"]
        if (bits, seg_bits) not in pairs[:2]:
            summary.append([f"{bits:g} / {seg_bits:g}", f"{8 * b0 / (params * records):.3f}",
                            f"{8 * b1 / (params * records):.3f}",
                            f"{100 * (b1 / b0 - 1):+.2f}%", f"{w0:.3f} / {w1:.3f}",
                            f"{rel0.max() / w0:.2f}", f"{rel1.max() / w1:.2f}"])
            continue
        for j, (name, shape, sc) in enumerate(layers):
            out.append([bits, name, f"{math.prod(shape):,}", f"{sc:g}", f"{rel0[j]:.3f}",
                        f"{rel1[j]:.3f}"])
        out.append([bits, "**whole model**", f"{params:,}", "", f"{w0:.3f}", f"{w1:.3f}"])
        summary.append([f"{bits:g} / {seg_bits:g}", f"{8 * b0 / (params * records):.3f}",
                        f"{8 * b1 / (params * records):.3f}", f"{100 * (b1 / b0 - 1):+.2f}%",
                        f"{w0:.3f} / {w1:.3f}",
                        f"{rel0.max() / w0:.2f}", f"{rel1.max() / w1:.2f}"])
    return (table(["bits (one segment / per tensor)", "one segment: bit/param",
                   "per tensor: bit/param", "bytes", "whole-model rel. error",
                   "worst/whole, one segment", "worst/whole, per tensor"], summary)
            + "\n\n" + table(["bits", "tensor", "values", "update scale",
                               "rel. error, one segment", "rel. error, per tensor"], out))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    ap.add_argument("--data", default="gaussian,mlp",
                    help="comma-separated data sets: gaussian, mlp, heavy (default: %(default)s)")
    ap.add_argument("--lattices", default=",".join(LATTICE_NAMES))
    ap.add_argument("--bits", help="comma-separated resolutions (default 1..8)")
    ap.add_argument("--values", type=int, help="values per chunk of the synthetic sets")
    ap.add_argument("--chunks", type=int, help="chunks per synthetic set")
    ap.add_argument("--users", type=int, help="users (chunks) of the mlp set")
    ap.add_argument("--local-steps", type=int, help="local SGD steps of each mlp user")
    ap.add_argument("--repeats", type=int, help="timing repeats, best taken")
    ap.add_argument("--threshold-bits", type=int, default=4)
    ap.add_argument("--cpu", type=int, help="core to pin to (default: first allowed)")
    ap.add_argument("--markdown", help="write the report here too")
    ap.add_argument("--json", help="write all measurements here")
    ap.add_argument("--small-chunks", action="store_true",
                    help="only the rate vs Shannon table of small and large chunks")
    ap.add_argument("--per-tensor", action="store_true",
                    help="only the per-tensor error table on bench_store's model")
    args = ap.parse_args(argv)
    if args.small_chunks or args.per_tensor:
        lattices = [n.strip() for n in args.lattices.split(",")]
        if args.small_chunks:
            print(small_chunks(lattices) + "\n")
        if args.per_tensor:
            print(per_tensor() + "\n")
        return

    p = dict(QUICK if args.quick else DEFAULTS)
    for key in ("values", "chunks", "users", "local_steps", "repeats"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    if args.bits:
        p["bits"] = [int(b) for b in args.bits.split(",")]
    lattices = [n.strip() for n in args.lattices.split(",")]
    core = pin_to_one_core(args.cpu)
    res: dict[str, Any] = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                           "machine": machine(core), "params": p, "datasets": {}}
    t_start = time.perf_counter()
    for ds_name, (chunks, desc) in load_datasets(args.data.split(","), p).items():
        log(f"[{ds_name}] {desc}")
        ds: dict[str, Any] = {"description": desc, "lattice": [], "streams": [],
                              "vs_bitround": {}, "threshold_bits": args.threshold_bits}
        for name in lattices:
            for bits in p["bits"]:
                pt = lattice_point(name, bits, chunks, p["repeats"],
                                   detail=bits == 4 and name in ("A2", "E8"))
                for s in pt.pop("streams"):
                    ds["streams"].append({"lattice": name, "bits": bits, **s})
                ds["lattice"].append(pt)
                log(f"  {name} {bits} bits: rate {pt['rate']:.3f} gap {pt['gap']:+.3f} "
                    f"rate-H {pt['rate_minus_entropy']:+.4f} enc {pt['enc_mbs']:.0f} "
                    f"dec {pt['dec_mbs']:.0f} MB/s")
        log("  BitRound sweeps")
        ds["bitround"] = bitround_sweep(chunks, False, p["repeats"])
        ds["bitround_shuffle"] = bitround_sweep(chunks, True, p["repeats"])
        for pt in ds["lattice"]:
            br, br_le = at_mse(ds["bitround"], pt["mse"])
            bs, bs_le = at_mse(ds["bitround_shuffle"], pt["mse"])
            sc = scalar_point(chunks, pt["mse"], p["repeats"])
            ds["vs_bitround"][f"{pt['lattice']}/{pt['bits']}"] = {
                "bitround_zstd": br, "bitround_zstd_le": br_le,
                "bitround_shuffle_zstd": bs, "bitround_shuffle_zstd_le": bs_le,
                "scalar_zstd": sc["rate"], "scalar_mse": sc["mse"]}
        log("  DiffThresholdCodec")
        ds["threshold"] = threshold_points(chunks, [n for n in ("A2", "E8") if n in lattices],
                                           args.threshold_bits, p["repeats"])
        res["datasets"][ds_name] = ds
    res["targets"] = check_targets(res)
    res["seconds"] = time.perf_counter() - t_start
    text = report(res)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=float)
    log(f"done in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
