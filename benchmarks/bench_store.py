#!/usr/bin/env python
"""Store and replay benchmark: size on disk, unlearning cost, append throughput.

One synthetic federated run (``--rounds`` rounds, ``--users`` users, ``--per-round`` of them
drawn at random each round with a seeded RNG, ``--params`` parameters) is recorded at once
into one archive per policy (format 2: an Icechunk repository per archive, one commit per
round, default `Retention`) and, the way peer implementations keep history, as one
``torch.save`` file per (round, user). Then:

1. **Size**: bytes each archive and the peers' folder occupy on disk, and bits per stored
   parameter and per participation-parameter (every participant of every round, times the
   model size). A format-2 archive is measured three times: right after its last commit
   (writer open), after its writer closed (close compacts with the default retention, which
   keeps versions replaced in the last minute for readers), and after ``compact(grace=0)``
   on a writer opened again (no version kept for readers: the steady-state size, the one
   the bits are computed from).
2. **Unlearning one user** (the malicious one): wall time, CPU time and peak RSS above the
   post-import baseline, each case in a fresh subprocess, for every archive, for the exact
   accumulators, and for the peers' full replay (load every saved file, FedAvg without the
   user). Also: unlearning time against the user's participation count, and the same user
   in a run with ``--scale-users`` users (same rounds, same number of participants per
   round, same participations of that user).
3. **Append throughput**: ``record_round`` wall and CPU seconds per round for each policy,
   and where one round's time goes.

Updates have the structure of real ones: a shared per-round drift that decays over the
run, a persistent per-user heterogeneity (non-IID data), per-layer scales spanning three
orders of magnitude, heavy-tailed coordinates (a log-normal per-coordinate sensitivity), and
one malicious user whose deviation from the others is five times larger.

With ``--format1 CHECKOUT`` (a checkout of the last format-1 version of medustore) the same
synthetic run (same seed, sizes and policies) also goes through format 1: that checkout's own
``benchmarks/bench_store.py`` runs in a subprocess whose ``PYTHONPATH`` puts the checkout
first (so ``import medustore`` is the old package; checked in a child before it starts),
after the format-2 measurements, with ``--no-peers``; its JSON is merged into this report
(``format1`` in the JSON) as format-2-vs-format-1 tables; its own report is written beside
``--markdown`` (``NAME.format1.md``).

Everything is written under ``--out`` (default /tmp/medustore-bench) and deleted at the
end unless ``--keep``. ``--quick`` is a smoke test that runs in well under a minute (about
two with ``--format1``).

    python benchmarks/bench_store.py                 # default sizes (see --help)
    python benchmarks/bench_store.py --quick
    python benchmarks/bench_store.py --rounds 40 --markdown results.md --json results.json
    python benchmarks/bench_store.py --quick --format1 ../medustore-format1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULTS = {"params": 1_000_000, "rounds": 100, "users": 50, "per_round": 10,
            "scale_users": 500, "repeats": 5}
QUICK = {"params": 50_000, "rounds": 8, "users": 12, "per_round": 4,
         "scale_users": 48, "repeats": 1}
MALICIOUS = 0  # user id of the malicious user, the one unlearned
SEED = 20250505
SUFFIX = ".icechunk"  # archive directories (Icechunk repositories)


def archive(root: Path, name: str) -> Path:
    """Path of the archive of policy ``name`` under ``root``."""
    return root / f"{name}{SUFFIX}"

# ---------------------------------------------------------------------------- synthetic run

#: (name, shape, scale): a small CNN; "fc1.weight" grows to reach the requested size.
_FIXED_LAYERS: list[tuple[str, tuple[int, ...], float]] = [
    ("conv1.weight", (32, 3, 3, 3), 1e-2),
    ("conv1.bias", (32,), 3e-3),
    ("conv2.weight", (64, 32, 3, 3), 3e-3),
    ("conv2.bias", (64,), 1e-3),
    ("bn2.weight", (64,), 1e-4),
    ("bn2.bias", (64,), 1e-4),
    ("fc1.bias", (512,), 1e-3),
    ("fc2.weight", (10, 512), 3e-2),
    ("fc2.bias", (10,), 1e-1),
]
_FC1_SCALE = 3e-4


def model_layers(params: int) -> list[tuple[str, tuple[int, ...], float]]:
    """Layer names, shapes and update scales of a model with exactly ``params`` values."""
    fixed = sum(math.prod(s) for _, s, _ in _FIXED_LAYERS)
    big = params - fixed
    if big < 4096:
        raise SystemExit(f"--params must be at least {fixed + 4096}")
    layers = list(_FIXED_LAYERS[:6])
    layers.append(("fc1.weight", (big // 512, 512), _FC1_SCALE))
    if big % 512:
        layers.append(("fc1.extra", (big % 512,), _FC1_SCALE))
    layers.extend(_FIXED_LAYERS[6:])
    return layers


class Run:
    """A reproducible synthetic FedAvg run: schedule, weights and every update."""

    def __init__(self, params: int, rounds: int, users: int, per_round: int,
                 focus_rounds: list[int] | None = None, seed: int = SEED) -> None:
        if per_round > users:
            raise SystemExit("--per-round cannot exceed --users")
        self.params, self.rounds, self.users, self.per_round = params, rounds, users, per_round
        self.seed = seed
        self.layers = model_layers(params)
        self.sizes = [math.prod(s) for _, s, _ in self.layers]
        self.offsets = np.cumsum([0, *self.sizes])[:-1]
        rng = np.random.default_rng([seed, 0])
        scale = np.repeat(np.array([sc for _, _, sc in self.layers], np.float32), self.sizes)
        # Heavy tails: a log-normal per-coordinate sensitivity (some units always move more).
        sens = np.exp(0.75 * rng.standard_normal(params)).astype(np.float32)
        sens /= np.float32(np.sqrt(np.mean(sens.astype(np.float64) ** 2)))
        self.coef = scale * sens
        self.w0 = (rng.standard_normal(params).astype(np.float32)
                   * np.repeat(np.array([10 * sc for _, _, sc in self.layers], np.float32),
                               self.sizes))
        wrng = np.random.default_rng([seed, 1])
        self.weights = {u: float(wrng.integers(100, 1000)) for u in range(users)}
        self.schedule = self._schedule(focus_rounds)

    def _schedule(self, focus_rounds: list[int] | None) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, 2, self.users])
        out = []
        for t in range(self.rounds):
            if focus_rounds is None:
                chosen = rng.choice(self.users, self.per_round, replace=False)
            else:  # the malicious user takes part exactly in focus_rounds
                k = self.per_round - (t in focus_rounds)
                chosen = 1 + rng.choice(self.users - 1, k, replace=False)
                if t in focus_rounds:
                    chosen = np.append(chosen, MALICIOUS)
            out.append(sorted(int(u) for u in chosen))
        return out

    def participation(self, user: int) -> list[int]:
        return [t for t, c in enumerate(self.schedule) if user in c]

    @property
    def participations(self) -> int:
        return sum(len(c) for c in self.schedule)

    def updates(self, t: int) -> dict[int, np.ndarray]:
        """Flat float32 updates ``h_t^u`` of round ``t``."""
        m = self.params
        drift = np.random.default_rng([self.seed, 3, t]).standard_normal(m, np.float32)
        drift *= np.float32(1.0 / math.sqrt(1.0 + t / 20.0))
        out = {}
        for u in self.schedule[t]:
            hetero = np.random.default_rng([self.seed, 4, u]).standard_normal(m, np.float32)
            noise = np.random.default_rng([self.seed, 5, t, u]).standard_normal(m, np.float32)
            dev = np.float32(0.5) * hetero + np.float32(0.6) * noise
            if u == MALICIOUS:
                dev *= np.float32(5.0)
            out[u] = (drift + dev) * self.coef
        return out

    def state_dict(self, flat: np.ndarray) -> dict[str, Any]:
        import torch

        return {name: torch.from_numpy(flat[o:o + n].reshape(shape).copy())
                for (name, shape, _), o, n in zip(self.layers, self.offsets, self.sizes,
                                                  strict=True)}


# ---------------------------------------------------------------------------- policies

def policies() -> dict[str, tuple[Any, bool]]:
    """Archive name -> (policy, accumulators)."""
    from medustore import PRESETS, MeduPolicy

    out: dict[str, tuple[Any, bool]] = {"full": (PRESETS["full"], False)}
    for b in (2, 4, 8):
        out[f"lattice-{b}b"] = (MeduPolicy(lattice="E8", bits=float(b), aggregate_bits=8.0,
                                           name=f"lattice-{b}b"), False)
    out["medu"] = (PRESETS["medu"], False)
    out["medu+acc"] = (PRESETS["medu"], True)
    return out


# ---------------------------------------------------------------------------- helpers

def disk_bytes(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under ``path``."""
    apparent = allocated = 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def disk_parts(path: Path) -> dict[str, int]:
    """Apparent bytes of each top-level entry of a repository directory (Icechunk: chunks,
    manifests, snapshots, transactions, refs, config)."""
    out = {}
    for child in sorted(path.iterdir()):
        out[child.name] = disk_bytes(child)[0] if child.is_dir() else child.stat().st_size
    return out


def _status_bytes(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def rss_now() -> int:
    """Resident memory now (falls back to the peak where /proc is missing)."""
    now = _status_bytes("VmRSS")
    return now if now is not None else rss_peak()


def reset_rss_peak() -> bool:
    """Restart the peak-RSS count at the current RSS (Linux ``clear_refs``).

    ``getrusage(RUSAGE_SELF).ru_maxrss`` cannot serve here: after fork + exec a child
    reports the high-water mark of its (large) parent, so the peak of a small child is lost.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_peak() -> int:
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict[str, str]:
    import numcodecs
    import zarr

    import medustore

    model = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {"cpu": model, "cores": str(os.cpu_count()),
            "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
            "python": platform.python_version(), "numpy": np.__version__,
            "zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
            "medustore": medustore.__version__}
    try:
        from importlib.metadata import version

        info["pcodec"] = version("pcodec")
    except Exception:  # noqa: BLE001 - informational only
        pass
    with contextlib.suppress(ImportError):
        import icechunk

        info["icechunk"] = icechunk.__version__
    with contextlib.suppress(ImportError):
        import torch

        info["torch"] = torch.__version__
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        src = Path(medustore.__file__).resolve().parent
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=src,
                               check=True, capture_output=True, text=True).stdout.strip()
        info["medustore"] += f" (commit {head}{', with local changes' if dirty else ''})"
    return info


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def opt_bytes(d: dict[str, Any], key: str) -> str:
    return fmt_bytes(d[key]) if key in d else "-"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load()}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- recording

def record_run(run: Run, root: Path, names: list[str], peers: bool) -> dict[str, Any]:
    """Record the whole run into one archive per policy (and the peers' folder).

    Every writer keeps the default `Retention` (it compacts every ``every`` rounds, inside
    ``record_round``, and when it closes). After the last round each archive is measured on
    disk with its writer still open, after ``close``, and after ``compact(grace=0)`` on a
    writer opened again (the benchmark is the archives' only user; see `finalize`)."""
    import torch

    import medustore

    pols = policies()
    template = run.state_dict(run.w0)
    stores = {}
    for name in names:
        pol, acc = pols[name]
        stores[name] = medustore.open(archive(root, name), "w", model=template, policy=pol,
                                      accumulators=acc, retention=medustore.Retention())
    peer_dir = root / "peers"
    if peers:
        peer_dir.mkdir(parents=True, exist_ok=True)
        torch.save(template, peer_dir / "w0.pt")
        torch.save({"schedule": run.schedule, "weights": run.weights}, peer_dir / "meta.pt")
    wall: dict[str, list[float]] = {n: [] for n in [*names, "peers"]}
    cpu: dict[str, list[float]] = {n: [] for n in [*names, "peers"]}
    gen = 0.0
    latest = run.w0.astype(np.float64)
    for t in range(run.rounds):
        g0 = time.perf_counter()
        flat = run.updates(t)
        P = sum(run.weights[u] for u in flat)
        for u, h in flat.items():
            latest += (run.weights[u] / P) * h.astype(np.float64)
        sds = {u: run.state_dict(h) for u, h in flat.items()}
        gen += time.perf_counter() - g0
        weights = {u: run.weights[u] for u in sds}
        for name, store in stores.items():
            w0, c0 = time.perf_counter(), time.process_time()
            store.record_round(t, sds, weights=weights)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
        if peers:
            w0, c0 = time.perf_counter(), time.process_time()
            for u, sd in sds.items():
                torch.save(sd, peer_dir / f"round{t:05d}_user{u:05d}.pt")
            wall["peers"].append(time.perf_counter() - w0)
            cpu["peers"].append(time.process_time() - c0)
        if t % max(1, run.rounds // 10) == 0:
            log(f"round {t + 1}/{run.rounds} recorded "
                f"({', '.join(f'{n} {wall[n][-1]:.2f}s' for n in stores)})")
    final = {name: finalize(store, archive(root, name)) for name, store in stores.items()}
    _LATEST[id(run)] = latest
    return {"wall": wall, "cpu": cpu, "generate_s": gen, "final": final}


def finalize(store: Any, path: Path) -> dict[str, Any]:
    """Close a writer that has just committed its last round; bytes on disk at each step.

    ``at_commit``: writer open, no compaction since the last periodic one; ``closed``: after
    ``close()`` (compaction with the default retention: versions replaced within its grace,
    60 s, are kept for readers); ``compacted``: after ``compact(grace=0)`` on a writer opened
    again with ``Retention(every=0)`` (only the latest version kept, nothing held for
    readers): the steady-state size.
    """
    import medustore

    out: dict[str, Any] = {"at_commit": disk_bytes(path)[0], "versions_at_commit":
                           len(store.versions())}
    t0 = time.perf_counter()
    store.close()
    out["close_s"] = time.perf_counter() - t0
    out["closed"] = disk_bytes(path)[0]
    with medustore.open(path, "r+", retention=medustore.Retention(every=0)) as w:
        out["versions_closed"] = len(w.versions())
        t0 = time.perf_counter()
        w.compact(grace=0)
        out["compact_s"] = time.perf_counter() - t0
        out["versions_compacted"] = len(w.versions())
    out["compacted"] = disk_bytes(path)[0]
    out["parts"] = disk_parts(path)
    return out


# ---------------------------------------------------------------------------- sizes

def sizes(run: Run, root: Path, names: list[str],
          final: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Sizes after `finalize` (``bytes``: `nbytes_stored`, bytes on disk of the compacted
    archive; ``logical``: bytes of the latest version's objects as Zarr keys)."""
    import medustore

    m, n_part = run.params, run.participations
    out = []
    for name in names:
        path = archive(root, name)
        with medustore.open(path) as s:
            idx = s.index
            stored = int((idx.entry_record >= 0).sum())
            records = int(idx.entry_nbytes.sum())
            total = s.nbytes_stored()
            logical = s.reader.nbytes_stored()
            acc = s.reader.arrays.get("acc")
            acc_bytes = 0 if acc is None else int(acc.nbytes_stored())
        apparent, allocated = disk_bytes(path)
        out.append({"name": name, "bytes": total, "apparent": apparent,
                    "allocated": allocated, "logical": logical, **final.get(name, {}),
                    "records_bytes": records, "acc_bytes": acc_bytes,
                    "stored_records": stored, "participations": n_part,
                    "bits_per_stored_param": 8 * total / (stored * m) if stored else math.nan,
                    "record_bits_per_stored_param": 8 * records / (stored * m) if stored
                    else math.nan,
                    "bits_per_participation_param": 8 * total / (n_part * m)})
    peer_dir = root / "peers"
    if peer_dir.exists():
        apparent, allocated = disk_bytes(peer_dir)
        out.append({"name": "peers (torch.save per round & user)", "bytes": apparent,
                    "apparent": apparent, "allocated": allocated, "records_bytes": apparent,
                    "acc_bytes": 0, "stored_records": n_part, "participations": n_part,
                    "bits_per_stored_param": 8 * apparent / (n_part * m),
                    "record_bits_per_stored_param": math.nan,
                    "bits_per_participation_param": 8 * apparent / (n_part * m)})
    return out


# ---------------------------------------------------------------------------- unlearning

def _child(argv: list[str]) -> None:
    """Subprocess entry: unlearn one user, print one JSON line."""
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["store", "peers"])
    p.add_argument("path")
    p.add_argument("user", type=int)
    p.add_argument("--exact-accumulator", action="store_true")
    p.add_argument("--threads", type=int, help="torch intra-op threads (peers)")
    p.add_argument("--save")
    a = p.parse_args(argv)
    import warnings

    if a.kind == "peers":
        import torch  # imports are part of the baseline

        if a.threads:
            torch.set_num_threads(a.threads)
    import zarr  # noqa: F401

    import medustore

    base = rss_now()
    exact_peak = reset_rss_peak()
    w0, c0 = time.perf_counter(), time.process_time()
    info: dict[str, Any] = {}
    if a.kind == "store":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with medustore.open(a.path) as s:
                w = s.unlearn([a.user], out="flat",
                              exact_accumulator=True if a.exact_accumulator else False)
                records = 0 if a.exact_accumulator else s.error_budget([a.user]).records_used
        info["records"] = records
        info["warnings"] = [str(c.message)[:120] for c in caught]
    else:
        w, info["records"] = _peers_replay(Path(a.path), a.user)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    peak = rss_peak()
    if a.save:
        np.save(a.save, np.asarray(w, dtype=np.float64))
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "rss_base": base, "rss_peak": peak,
                      "rss_delta": peak - base, "rss_peak_reset": exact_peak, **info}))


def _peers_replay(folder: Path, user: int) -> tuple[np.ndarray, int]:
    """Peers' way: load every saved update and replay FedAvg without ``user``.

    Streams round by round (one round's files in memory at a time), which is kinder to
    memory than implementations that hold the whole history in Python lists.
    """
    import torch

    meta = torch.load(folder / "meta.pt", weights_only=True)
    w = {k: v.clone() for k, v in torch.load(folder / "w0.pt", weights_only=True).items()}
    loaded = 0
    for t, chosen in enumerate(meta["schedule"]):
        keep = [u for u in chosen if u != user]
        if not keep:
            continue
        P = sum(meta["weights"][u] for u in keep)
        sds = [torch.load(folder / f"round{t:05d}_user{u:05d}.pt", weights_only=True) for u in keep]
        loaded += len(sds)
        for k in w:
            avg = torch.zeros_like(w[k])
            for u, sd in zip(keep, sds, strict=True):
                avg.add_(sd[k], alpha=meta["weights"][u] / P)
            w[k] += avg
    flat = np.concatenate([v.reshape(-1).numpy().astype(np.float64) for v in w.values()])
    return flat, loaded


def evict(path: Path) -> None:
    """Drop the page cache of every file under ``path`` (``posix_fadvise(DONTNEED)``; the
    files were flushed by `os.sync` beforehand), so the next read comes from the disk."""
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_child(args: list[str], repeats: int, cold: Path | None = None) -> dict[str, Any]:
    """Best of ``repeats`` fresh subprocesses (by wall time); with ``cold``, the files
    under that path are evicted from the page cache before each one."""
    best = None
    for _ in range(repeats):
        if cold is not None:
            evict(cold)
        proc = subprocess.run([sys.executable, __file__, "_child", *args], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        if best is None or res["wall_s"] < best["wall_s"]:
            best = res
    assert best is not None
    return best


def unlearn_cases(run: Run, root: Path, cases: list[tuple[str, list[str]]], repeats: int,
                  reference: str | None) -> list[dict[str, Any]]:
    """Run each case; compare results with the reference case's result."""
    out = []
    os.sync()
    for label, args in cases:
        save = root / f"result-{label.replace('/', '_').replace(' ', '_')}.npy"
        log(f"unlearn: {label}")
        res = run_child([*args, "--save", str(save)], repeats)
        cold = run_child(args, repeats, cold=Path(args[1]))
        res["cold_wall_s"], res["cold_cpu_s"] = cold["wall_s"], cold["cpu_s"]
        res["label"], res["save"] = label, str(save)
        out.append(res)
    refs = [r for r in out if r["label"].startswith(reference)]
    if refs:  # speed-ups against the fastest reference case, warm and cold separately
        w_ref = np.load(refs[0]["save"])
        ref_wall = min(r["wall_s"] for r in refs)
        ref_cold = min(r["cold_wall_s"] for r in refs)
        latest = run_latest(run)
        removed = float(np.linalg.norm(latest - w_ref))
        for r in out:
            w = np.load(r["save"])
            r["err_rel"] = float(np.linalg.norm(w - w_ref)) / removed
            r["removed_norm"] = removed
            r["speedup"] = ref_wall / r["wall_s"]
            r["cold_speedup"] = ref_cold / r["cold_wall_s"]
            worst = 0.0, ""
            for (name, _, _), o, n in zip(run.layers, run.offsets, run.sizes, strict=True):
                part = slice(o, o + n)
                rel = float(np.linalg.norm(w[part] - w_ref[part])
                            / np.linalg.norm(latest[part] - w_ref[part]))
                worst = max(worst, (rel, name))
            r["worst_tensor_err"], r["worst_tensor"] = worst
    for r in out:
        with contextlib.suppress(FileNotFoundError):
            os.remove(r["save"])
    return out


_LATEST: dict[int, np.ndarray] = {}


def run_latest(run: Run) -> np.ndarray:
    """w_T of the run in float64 (the model before unlearning; kept by `record_run`)."""
    key = id(run)
    if key not in _LATEST:
        w = run.w0.astype(np.float64)
        for t in range(run.rounds):
            ups = run.updates(t)
            P = sum(run.weights[u] for u in ups)
            for u, h in ups.items():
                w += (run.weights[u] / P) * h.astype(np.float64)
        _LATEST[key] = w
    return _LATEST[key]


def budget_of(path: Path, user: int) -> dict[str, Any]:
    import medustore

    with medustore.open(path) as s:
        return s.error_budget([user]).to_json()


# ---------------------------------------------------------------------------- profiling

class _Phases:
    """Wall time of labelled calls in the calling thread (outermost label wins) and CPU
    time of codec encodes in zarr's worker threads."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.encode_s = 0.0
        self.encodes = 0
        self._active = threading.local()
        self._lock = threading.Lock()
        self._patches: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, label: Any) -> None:
        orig = getattr(owner, attr)
        phases = self

        def wrapper(*a: Any, **k: Any) -> Any:
            if getattr(phases._active, "on", False) or threading.current_thread() is not \
                    threading.main_thread():
                return orig(*a, **k)
            name = label(a) if callable(label) else label
            phases._active.on = True
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return orig(*a, **k)
            finally:
                phases.wall[name] = phases.wall.get(name, 0.0) + time.perf_counter() - t0
                phases.cpu[name] = phases.cpu.get(name, 0.0) + time.process_time() - c0
                phases._active.on = False

        self._patches.append((owner, attr, orig))
        setattr(owner, attr, wrapper)

    def wrap_encode(self, owner: Any, attr: str) -> None:
        orig = getattr(owner, attr)
        phases = self

        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.thread_time()
            try:
                return orig(*a, **k)
            finally:
                with phases._lock:
                    phases.encode_s += time.thread_time() - t0
                    phases.encodes += 1

        self._patches.append((owner, attr, orig))
        setattr(owner, attr, wrapper)

    def restore(self) -> None:
        for owner, attr, orig in reversed(self._patches):
            setattr(owner, attr, orig)
        self._patches.clear()


def profile_round(run: Run, root: Path, names: list[str], rounds: int = 3) -> list[dict]:
    """Where one round's ``record_round`` time goes, per policy (mean over ``rounds``
    rounds recorded after two warm-up rounds, on fresh archives; no periodic compaction
    falls in them: it is timed apart, as ``compact_s``, on the profiled archive)."""
    import icechunk
    import zarr
    import zarr.core.array as zarray

    import medustore
    import medustore.writer as mwriter
    from medustore.archive.reader import ArchiveReader
    from medustore.archive.repository import Repository
    from medustore.codecs import zarr3
    from medustore.index import ArchiveIndex
    from medustore.layout import ModelLayout
    from medustore.policy import MeduPolicy

    pols = policies()
    data = [run.updates(t) for t in range(2 + rounds)]
    sds = [{u: run.state_dict(h) for u, h in ups.items()} for ups in data]
    out = []
    for name in names:
        pol, acc = pols[name]
        path = archive(root, f"profile-{name}")
        store = medustore.open(path, "w", model=run.state_dict(run.w0), policy=pol,
                               accumulators=acc, retention=medustore.Retention(every=0))
        for t in range(2):
            store.record_round(t, sds[t], weights={u: run.weights[u] for u in sds[t]})
        ph = _Phases()

        def arr_label(kind: str) -> Any:
            def label(a: tuple) -> str:
                arr_name = a[0].basename if isinstance(a[0], zarr.Array) else "?"
                group = {"records": "records", "aggregate": "aggregate", "model": "model",
                         "initial": "model", "acc": "accumulators"}.get(arr_name,
                                                                       "index tables")
                return f"zarr {kind}: {group}"
            return label

        ph.wrap(ModelLayout, "flatten", "flatten updates")
        for meth in ("select", "expected_error", "expected_aggregate_error"):
            ph.wrap(MeduPolicy, meth, "policy (select, expected error)")
        # writer.sync only runs the record-size look-ups (async getsize of every chunk).
        ph.wrap(mwriter, "sync", "record sizes (store getsize)")
        # record_round reopens the version it just committed before its next read (the
        # accumulator rows it adds to; w_t is cached).
        ph.wrap(Repository, "snapshot", "open committed version (snapshot, array metadata)")
        ph.wrap(ArchiveReader, "__init__", "open committed version (snapshot, array metadata)")
        ph.wrap(ArchiveReader, "accumulator", "zarr read: accumulators")
        ph.wrap(icechunk.Repository, "writable_session", "icechunk: writable session")
        ph.wrap(zarr.Group, "__getitem__", "zarr: open arrays in the session (metadata)")
        ph.wrap(zarray.Array, "resize", "zarr: resize (array metadata)")
        ph.wrap(mwriter, "write_meta", "index attribute (counts, digest)")
        ph.wrap(ArchiveIndex, "from_tables", "new in-memory index")
        ph.wrap(icechunk.Session, "commit", "icechunk: commit")
        ph.wrap(Repository, "compact", "compaction")
        for meth in ("set_basic_selection", "set_orthogonal_selection"):
            ph.wrap(zarray.Array, meth, arr_label("write"))
        for meth in ("get_basic_selection", "get_orthogonal_selection"):
            ph.wrap(zarray.Array, meth, arr_label("read"))
        ph.wrap_encode(zarr3.NumcodecsArrayBytesCodec, "_encode_sync")
        total = cpu = 0.0
        try:
            for t in range(2, 2 + rounds):
                weights = {u: run.weights[u] for u in sds[t]}
                w0, c0 = time.perf_counter(), time.process_time()
                store.record_round(t, sds[t], weights=weights)
                total += time.perf_counter() - w0
                cpu += time.process_time() - c0
        finally:
            ph.restore()
        # What one periodic compaction costs here (default grace: the versions just
        # replaced are kept, as they are during recording), then with grace 0.
        t0 = time.perf_counter()
        store.compact()  # Retention(every=0) keeps the default grace
        compact_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        store.compact(grace=0)
        compact0_s = time.perf_counter() - t0
        store.close()
        # Reference: the same records and aggregate encoded serially in this thread.
        serial = serial_encode_s(pol, data[2:], run)
        # The numpy work inlined in _write_round (aggregate, differentials, norms), alone.
        inline = inline_math_s(data[2:], run)
        shutil.rmtree(path)
        phases = {k: v / rounds for k, v in ph.wall.items()}
        phases_cpu = {k: v / rounds for k, v in ph.cpu.items()}
        out.append({"name": name, "rounds": rounds, "total_s": total / rounds,
                    "cpu_s": cpu / rounds, "phases": phases, "phases_cpu": phases_cpu,
                    "unlabelled_s": total / rounds - sum(phases.values()),
                    "unlabelled_cpu_s": cpu / rounds - sum(phases_cpu.values()),
                    "inline_math_s": inline, "encode_thread_cpu_s": ph.encode_s / rounds,
                    "encodes": ph.encodes / rounds, "serial_encode_s": serial,
                    "compact_s": compact_s, "compact_grace0_s": compact0_s})
        log(f"profiled {name}: {total / rounds:.3f} s/round")
    return out


def serial_encode_s(pol: Any, data: list[dict[int, np.ndarray]], run: Run) -> float | None:
    """Mean CPU seconds per round to encode the stored records and the aggregate serially."""
    if pol.lattice is None and pol.coord_threshold is None:
        return None
    import numcodecs

    rec = numcodecs.get_codec({"id": pol.record_serializer()["name"],
                               **pol.record_serializer()["configuration"]})
    agg_ser = pol.aggregate_serializer()
    agg = None if agg_ser is None else numcodecs.get_codec({"id": agg_ser["name"],
                                                           **agg_ser["configuration"]})
    total = 0.0
    for ups in data:
        users = list(ups)
        p = np.array([run.weights[u] for u in users])
        hbar = sum((pu / p.sum()) * ups[u].astype(np.float64) for pu, u in zip(p, users,
                                                                                strict=True))
        d = [(ups[u] - hbar).astype(np.float32) for u in users]
        dn = np.array([np.linalg.norm(x) for x in d])
        keep = pol.select(users, p, dn, float(np.linalg.norm(hbar)))
        t0 = time.process_time()
        for i in np.flatnonzero(keep):
            for s in range(0, run.params, pol.chunk_size):
                rec.encode(d[i][s:s + pol.chunk_size])
        if agg is not None and pol.keep_aggregates:
            h32 = hbar.astype(np.float32)
            for s in range(0, run.params, pol.chunk_size):
                agg.encode(h32[s:s + pol.chunk_size])
        total += time.process_time() - t0
    return total / len(data)


def inline_math_s(data: list[dict[int, np.ndarray]], run: Run) -> float:
    """CPU seconds per round of the aggregate / differential / norm arithmetic."""
    total = 0.0
    for ups in data:
        users = list(ups)
        p = np.array([run.weights[u] for u in users])
        t0 = time.process_time()
        P = float(p.sum())
        hbar = np.zeros(run.params)
        for pu, u in zip(p, users, strict=True):
            hbar += (pu / P) * ups[u]
        d = [(ups[u] - hbar).astype(np.float32) for u in users]
        _ = [np.linalg.norm(x.astype(np.float64)) for x in d]
        total += time.process_time() - t0
    return total / len(data)


def replay_profile(run: Run, root: Path, name: str, user: int) -> dict[str, float]:
    """In-process: unlearning ``user`` vs reading and decoding its records one by one."""
    import medustore

    with medustore.open(archive(root, name)) as s:
        idx, col = s.index, s.index.column(user)
        rounds = [t for t in s.participation(user)
                  if idx.entry_record[idx.entry(idx.row(t), col)] >= 0]
        best_u = best_r = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            s.unlearn([user], out="flat", exact_accumulator=False)
            best_u = min(best_u, time.perf_counter() - t0)
            t0 = time.perf_counter()
            acc = np.zeros(run.params)
            for t in rounds:
                acc += s.record(t, user, out="flat")
            best_r = min(best_r, time.perf_counter() - t0)
    return {"records": len(rounds), "unlearn_s": best_u, "serial_read_decode_s": best_r}


# ---------------------------------------------------------------------------- report

def report(res: dict[str, Any]) -> str:
    cfg, mach = res["config"], res["machine"]
    m = cfg["params"]
    parts = []
    parts.append(f"Command: `{res['command']}`  \n"
                 f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory']}; Python "
                 f"{mach['python']}, numpy {mach['numpy']}, zarr {mach['zarr']}, numcodecs "
                 f"{mach['numcodecs']}, pcodec {mach.get('pcodec', '?')}, icechunk "
                 f"{mach.get('icechunk', '-')}, torch {mach.get('torch', '-')}; medustore "
                 f"{mach['medustore']}.  \n"
                 f"Run: {cfg['rounds']} rounds, {cfg['users']} users, {cfg['per_round']} per "
                 f"round, m = {m:,} parameters, {res['participations']} participations; "
                 f"the malicious user (unlearned) took part in {res['focus_participations']} "
                 f"rounds. Total time {res['total_s'] / 60:.1f} min; load average at start "
                 f"{res['load_start']}, at end {res['load_end']}.")
    parts.append("Archives: " + "; ".join(f"`{n}` = {d}" for n, d in
                                           res["policies"].items()) + ".")
    # sizes
    rows = []
    peer = next((s for s in res["sizes"] if s["name"].startswith("peers")), None)
    for s in res["sizes"]:
        ratio = f"{peer['bytes'] / s['bytes']:.1f}x" if peer else "-"
        rec = s["record_bits_per_stored_param"]
        rows.append([s["name"], fmt_bytes(s["bytes"]), opt_bytes(s, "at_commit"),
                     opt_bytes(s, "closed"), opt_bytes(s, "logical"), fmt_bytes(s["allocated"]),
                     f"{s['stored_records']}/{s['participations']}",
                     "-" if math.isnan(rec) else f"{rec:.3f}",
                     f"{s['bits_per_stored_param']:.3f}",
                     f"{s['bits_per_participation_param']:.3f}", ratio])
    parts.append("#### Size on disk\n\n"
                 "Format-2 archives (Icechunk repositories): *on disk* is the sum of the "
                 "file sizes under the archive's directory (`nbytes_stored()`) after "
                 "`compact(grace=0)` (only the latest version, nothing kept for readers: the "
                 "steady-state size, the one the bits are computed from); *at last commit*: "
                 "writer still open, versions since the last periodic compaction (every "
                 "16 rounds) still on disk; *after close*: `close()` compacted with the "
                 "default retention, which keeps versions replaced in the last 60 s for "
                 "readers; *latest version*: the bytes of that version's objects as Zarr keys "
                 "(`store.reader.nbytes_stored()`, no Icechunk manifests or snapshots)."
                 "\n\n" + table(
                     ["archive", "on disk (compacted)", "at last commit", "after close",
                      "latest version (Zarr keys)", "allocated on disk", "records stored",
                      "record bits / stored param", "bits / stored param",
                      "bits / participation-param", "smaller than peers"], rows))
    acc = next((s for s in res["sizes"] if s["acc_bytes"]), None)
    if acc:
        parts.append(f"Of `{acc['name']}`, the exact accumulators take "
                     f"{fmt_bytes(acc['acc_bytes'])} (float64, one row per user).")
    with_parts = [s for s in res["sizes"] if s.get("parts")]
    if with_parts:
        keys = sorted({k for s in with_parts for k in s["parts"]})
        rows = [[s["name"], *[fmt_bytes(s["parts"].get(k, 0)) for k in keys],
                 f"{s['versions_at_commit']} / {s['versions_closed']} / "
                 f"{s['versions_compacted']}", f"{s['close_s']:.2f}",
                 f"{s['compact_s']:.2f}"] for s in with_parts]
        parts.append("Where a compacted format-2 archive's bytes lie (top-level entries of the "
                     "repository), versions kept (at last commit / after close / compacted) "
                     "and the time `close()` and `compact(grace=0)` took:\n\n" + table(
                         ["archive", *keys, "versions kept", "close s", "compact s"], rows))
    # unlearning
    rows = []
    for r in res["unlearn"]:
        rows.append([r["label"], r["records"], f"{r['wall_s']:.3f}", f"{r['cpu_s']:.3f}",
                     f"{r['cold_wall_s']:.3f}", f"{r['rss_delta'] / 2**20:.0f}",
                     f"{r.get('speedup', math.nan):.1f}x / {r.get('cold_speedup', math.nan):.1f}x",
                     f"{r.get('err_rel', math.nan):.1e}",
                     "-" if r.get("bound") is None else f"{r['bound']:.1e}",
                     f"{r.get('worst_tensor_err', math.nan):.1e} ({r.get('worst_tensor', '')})"])
    parts.append(f"#### Unlearning user {MALICIOUS} (fresh process per case, best of "
                 f"{cfg['repeats']}; cold: the case's files evicted from the page cache "
                 "first)\n\n" + table(
                     ["case", "records read", "wall s warm", "CPU s warm", "wall s cold",
                      "peak RSS above baseline MiB", "faster than the faster peers warm / cold",
                      "L2 error / L2 correction", "3-sigma budget / L2 correction",
                      "worst tensor (same ratio)"], rows))
    if res.get("replay_profile"):
        rp = res["replay_profile"]
        parts.append(f"In-process, `{rp['name']}`: unlearning ({rp['records']} records) takes "
                     f"{rp['unlearn_s']:.3f} s; reading and decoding the same records one by "
                     f"one with `store.record` takes {rp['serial_read_decode_s']:.3f} s.")
    if res.get("by_participation"):
        rows = [[r["label"], r["participations"], r["records"], f"{r['wall_s']:.3f}",
                 f"{r['rss_delta'] / 2**20:.0f}"] for r in res["by_participation"]]
        parts.append("#### Unlearning time against the user's participations "
                     f"({cfg['users']} users)\n\n" + table(
                         ["archive / user", "participations", "records read", "wall s",
                          "peak RSS above baseline MiB"], rows))
    if res.get("scale"):
        rows = [[r["label"], r["users"], r["records"], f"{r['wall_s']:.3f}",
                 f"{r['rss_delta'] / 2**20:.0f}"] for r in res["scale"]]
        parts.append(f"#### Same user, {cfg['users']} vs {cfg['scale_users']} users "
                     f"({cfg['rounds']} rounds, {cfg['per_round']} per round, same "
                     "participations of the user)\n\n" + table(
                         ["case", "users", "records read", "wall s",
                          "peak RSS above baseline MiB"], rows))
    # append
    rows = []
    raw = cfg["per_round"] * m * 4
    for name, walls in res["append"]["wall"].items():
        if not walls:
            continue
        st = append_stats(res["append"], name)
        rows.append([name, f"{st['median_s']:.3f}", f"{st['best_s']:.3f}",
                     f"{st['mean_s']:.3f}", f"{st['max_s']:.3f}", f"{st['cpu_s']:.3f}",
                     f"{raw / st['median_s'] / 1e6:.0f}"])
    parts.append(f"#### Append throughput ({cfg['per_round']} users x {m:,} parameters per "
                 "round; round 0 excluded; the mean and the worst round include the periodic "
                 "compactions every 16 rounds)\n\n" + table(
                     ["archive", "median s / round", "best s / round", "mean s / round",
                      "worst s / round", "CPU s / round (median)", "MB/s of float32 input"],
                     rows))
    # profile
    if res.get("profile"):
        parts.append("#### Where one round's time goes (wall / CPU seconds per round, mean of "
                     f"{res['profile'][0]['rounds']} rounds; CPU counts every thread)"
                     "\n\n" + profile_table(res["profile"]))
    if res.get("format1"):
        parts.append(compare_report(res))
    return "\n\n".join(parts) + "\n"


def append_stats(append: dict[str, Any], name: str) -> dict[str, float]:
    """Per-round ``record_round`` statistics of one archive (round 0 excluded)."""
    w = append["wall"][name][1:] or append["wall"][name]
    c = append["cpu"][name][1:] or append["cpu"][name]
    return {"median_s": statistics.median(w), "best_s": min(w), "mean_s": statistics.mean(w),
            "max_s": max(w), "cpu_s": statistics.median(c), "cpu_mean_s": statistics.mean(c)}


def profile_table(profile: list[dict[str, Any]]) -> str:
    labels = sorted({k for p in profile for k in p["phases"]})
    names = [p["name"] for p in profile]
    rows = []
    for lab in labels:
        rows.append([lab] + [f"{p['phases'].get(lab, 0.0):.3f} / "
                             f"{p['phases_cpu'].get(lab, 0.0):.3f}" for p in profile])
    rows.append(["aggregate, differentials, norms, rest (not wrapped)"] +
                [f"{p['unlabelled_s']:.3f} / {p['unlabelled_cpu_s']:.3f}" for p in profile])
    rows.append(["**record_round**"] + [f"**{p['total_s']:.3f} / {p['cpu_s']:.3f}**"
                                        for p in profile])
    rows.append(["codec encode inside the zarr writes (CPU, worker threads)"] +
                [f"{p['encode_thread_cpu_s']:.3f}" for p in profile])
    rows.append(["same records + aggregate encoded serially (CPU)"] +
                ["-" if p["serial_encode_s"] is None else f"{p['serial_encode_s']:.3f}"
                 for p in profile])
    rows.append(["aggregate + differentials + norms alone (CPU)"] +
                [f"{p['inline_math_s']:.3f}" for p in profile])
    if any("compact_s" in p for p in profile):
        rows.append(["one compaction after these rounds (wall; default grace / grace 0)"] +
                    [f"{p['compact_s']:.3f} / {p['compact_grace0_s']:.3f}" if "compact_s" in p
                     else "-" for p in profile])
    return table(["phase", *names], rows)


def _ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.{digits}f}"


def compare_report(res: dict[str, Any]) -> str:
    """Format 2 (this run) next to format 1 (the old checkout's run of the same sizes)."""
    f1 = res["format1"]
    r1 = f1["results"]
    m1 = r1["machine"]
    parts = [f"### Format 2 vs format 1\n\n"
             f"Format 1: `{f1['command']}` (cwd `{f1['cwd']}`, PYTHONPATH "
             f"`{f1['pythonpath']}`; the child imported medustore from "
             f"`{f1['medustore_file']}`: medustore {m1['medustore']}, zarr {m1['zarr']}). "
             f"Same seed, sizes and policies (`--no-peers`: its speed-ups are against "
             f"`full`). It ran after the format-2 run, in {r1['total_s'] / 60:.1f} min; "
             f"load average at its start {r1['load_start']}, at its end {r1['load_end']} "
             f"(format 2: {res['load_start']} / {f1['load_before']}). "
             "Ratios are format 2 / format 1 (below 1: format 2 smaller or faster)."]
    s1 = {s["name"]: s for s in r1["sizes"]}
    rows = []
    for s in res["sizes"]:
        o = s1.get(s["name"])
        if o is None or "compacted" not in s:
            continue
        rows.append([s["name"], fmt_bytes(o["apparent"]), fmt_bytes(s["compacted"]),
                     _ratio(s["compacted"], o["apparent"], 3), fmt_bytes(s["closed"]),
                     _ratio(s["closed"], o["apparent"], 3), fmt_bytes(s["at_commit"]),
                     _ratio(s["at_commit"], o["apparent"], 3),
                     f"{8 * o['apparent'] / (o['participations'] * r1['config']['params']):.3f}"
                     f" / {s['bits_per_participation_param']:.3f}"])
    parts.append("#### Size on disk, format 2 vs 1 (sum of file sizes under the archive "
                 "directory)\n\n" + table(
                     ["archive", "format 1", "format 2 compacted (grace 0)", "2/1",
                      "format 2 after close (default retention)", "2/1",
                      "format 2 at last commit", "2/1", "bits / participation-param 1 / 2"],
                     rows))
    rows = []
    for name in res["append"]["wall"]:
        if not res["append"]["wall"][name] or not r1["append"]["wall"].get(name):
            continue
        a2, a1 = append_stats(res["append"], name), append_stats(r1["append"], name)
        rows.append([name, f"{a1['median_s']:.3f}", f"{a2['median_s']:.3f}",
                     _ratio(a2["median_s"], a1["median_s"]), f"{a1['cpu_s']:.3f}",
                     f"{a2['cpu_s']:.3f}", _ratio(a2["cpu_s"], a1["cpu_s"]),
                     f"{a1['mean_s']:.3f}", f"{a2['mean_s']:.3f}",
                     _ratio(a2["mean_s"], a1["mean_s"])])
    parts.append("#### Append, format 2 vs 1 (`record_round` seconds per round, round 0 "
                 "excluded; format 2's mean includes its periodic compactions)\n\n" + table(
                     ["archive", "wall median 1", "wall median 2", "2/1", "CPU median 1",
                      "CPU median 2", "2/1", "wall mean 1", "wall mean 2", "2/1"], rows))
    u1 = {r["label"]: r for r in r1["unlearn"]}
    rows = []
    for r in res["unlearn"]:
        o = u1.get(r["label"])
        if o is None:
            continue
        rows.append([r["label"], f"{o['records']} / {r['records']}", f"{o['wall_s']:.3f}",
                     f"{r['wall_s']:.3f}", _ratio(r["wall_s"], o["wall_s"]),
                     f"{o['cpu_s']:.3f}", f"{r['cpu_s']:.3f}", _ratio(r["cpu_s"], o["cpu_s"]),
                     f"{o['cold_wall_s']:.3f}", f"{r['cold_wall_s']:.3f}",
                     _ratio(r["cold_wall_s"], o["cold_wall_s"]),
                     f"{o['rss_delta'] / 2**20:.0f} / {r['rss_delta'] / 2**20:.0f}",
                     f"{o.get('err_rel', math.nan):.1e} / {r.get('err_rel', math.nan):.1e}"])
    parts.append(f"#### Unlearning user {MALICIOUS}, format 2 vs 1 (fresh process per case, "
                 f"best of {res['config']['repeats']}; cold: the archive's files evicted from "
                 "the page cache first)\n\n" + table(
                     ["case", "records read 1 / 2", "warm wall 1", "warm wall 2", "2/1",
                      "warm CPU 1", "warm CPU 2", "2/1", "cold wall 1", "cold wall 2", "2/1",
                      "peak RSS above baseline MiB 1 / 2",
                      "L2 error / L2 correction 1 / 2 (vs each format's reference)"], rows))
    for key, title in (("by_participation", "Unlearning time against participations"),
                       ("scale", "Same user, more users")):
        b1 = {(r["label"], r.get("users")): r for r in r1.get(key) or []}
        rows = []
        for r in res.get(key) or []:
            o = b1.get((r["label"], r.get("users")))
            if o is None:
                continue
            rows.append([r["label"] + (f" ({r['users']} users)" if "users" in r else ""),
                         f"{o['wall_s']:.3f}", f"{r['wall_s']:.3f}",
                         _ratio(r["wall_s"], o["wall_s"]), f"{o['cpu_s']:.3f}",
                         f"{r['cpu_s']:.3f}", _ratio(r["cpu_s"], o["cpu_s"])])
        if rows:
            parts.append(f"#### {title}, format 2 vs 1 (warm, best of "
                         f"{res['config']['repeats']})\n\n" + table(
                             ["case", "wall 1", "wall 2", "2/1", "CPU 1", "CPU 2", "2/1"],
                             rows))
    if r1.get("profile") and res.get("profile"):
        p1 = {p["name"]: p for p in r1["profile"]}
        rows = [[p["name"], f"{p1[p['name']]['total_s']:.3f} / {p1[p['name']]['cpu_s']:.3f}",
                 f"{p['total_s']:.3f} / {p['cpu_s']:.3f}",
                 _ratio(p["total_s"], p1[p["name"]]["total_s"])]
                for p in res["profile"] if p["name"] in p1]
        parts.append("#### Profiled rounds, format 2 vs 1 (wall / CPU s per round)\n\n" +
                     table(["archive", "format 1", "format 2", "wall 2/1"], rows))
        parts.append("Format 1's per-round profile (its own labels):\n\n" +
                     profile_table(r1["profile"]))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        _child(argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, < 1 minute")
    p.add_argument("--params", type=int, help=f"model size m (default {DEFAULTS['params']:,})")
    p.add_argument("--rounds", type=int, help=f"rounds (default {DEFAULTS['rounds']})")
    p.add_argument("--users", type=int, help=f"users (default {DEFAULTS['users']})")
    p.add_argument("--per-round", type=int,
                   help=f"participants per round (default {DEFAULTS['per_round']})")
    p.add_argument("--scale-users", type=int,
                   help=f"users of the scaling run (default {DEFAULTS['scale_users']}; 0 skips)")
    p.add_argument("--repeats", type=int,
                   help=f"subprocesses per unlearning case (default {DEFAULTS['repeats']})")
    p.add_argument("--no-peers", action="store_true", help="skip the torch.save baseline")
    p.add_argument("--no-profile", action="store_true", help="skip the per-round profile")
    p.add_argument("--out", type=Path, default=Path("/tmp/medustore-bench"),
                   help="scratch directory (default /tmp/medustore-bench)")
    p.add_argument("--keep", action="store_true", help="keep the archives afterwards")
    p.add_argument("--json", type=Path, help="write the raw results here")
    p.add_argument("--markdown", type=Path, help="write the result tables here")
    p.add_argument("--format1", type=Path, metavar="CHECKOUT",
                   help="also run the same benchmark through format 1: a checkout of the last "
                        "format-1 medustore (its benchmarks/bench_store.py runs with the "
                        "checkout first on PYTHONPATH) and compare")
    a = p.parse_args(argv)
    cfg = dict(QUICK if a.quick else DEFAULTS)
    for k in cfg:
        if getattr(a, k, None) is not None:
            cfg[k] = getattr(a, k)
    if a.no_peers:
        cfg["peers"] = False
    command = "python benchmarks/bench_store.py" + ("" if not argv else " " + " ".join(argv))
    started = time.perf_counter()
    load_start = load()
    root = a.out / f"run-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=False)
    if a.format1 is not None:
        a.format1 = a.format1.resolve()
        if not (a.format1 / "benchmarks" / "bench_store.py").is_file():
            raise SystemExit(f"--format1: no benchmarks/bench_store.py under {a.format1}")
        check_format1(a.format1)  # before the long run: fail fast
    need = 2.2 * cfg["rounds"] * cfg["per_round"] * cfg["params"] * 4
    free = shutil.disk_usage(a.out).free
    if need > 0.8 * free:
        raise SystemExit(f"needs about {fmt_bytes(need)} under {a.out}, {fmt_bytes(free)} free")
    res: dict[str, Any] = {"command": command, "config": cfg, "machine": machine(),
                           "load_start": load_start}
    try:
        _bench(cfg, a, root, res)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    if a.format1 is not None:
        res["format1"] = run_format1(a.format1, cfg, a)
    res["total_s"] = time.perf_counter() - started
    res["load_end"] = load()
    if a.json:  # first: a failing report must not lose the measurements
        a.json.write_text(json.dumps(res, indent=1, default=str))
    text = report(res)
    print(text)
    if a.markdown:
        a.markdown.write_text(text)
        if res.get("format1"):
            a.markdown.with_suffix(".format1.md").write_text(res["format1"]["markdown"])


def _format1_env(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    return env


def check_format1(src: Path) -> str:
    """Path of the medustore package a child with the format-1 environment imports (it must
    be the checkout's: an installed medustore must not shadow it)."""
    code = ("import json, medustore, zarr; print(json.dumps({'file': medustore.__file__, "
            "'archive_format': getattr(medustore, 'FORMAT_VERSION', 1)}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, env=_format1_env(src),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"--format1: importing medustore from {src} failed:\n"
                         f"{proc.stderr[-2000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    file = Path(info["file"]).resolve()
    if src not in file.parents:
        raise SystemExit(f"--format1: a child with PYTHONPATH={src} imports medustore from "
                         f"{file}, not from the checkout")
    if info["archive_format"] != 1:
        raise SystemExit(f"--format1: {src} writes format {info['archive_format']}, not 1")
    return str(file)


def run_format1(src: Path, cfg: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    """Run the format-1 checkout's own bench_store.py on the same run; its results."""
    medustore_file = check_format1(src)
    out = a.out / f"format1-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "format1.json", out / "format1.md"
    args = ["--params", str(cfg["params"]), "--rounds", str(cfg["rounds"]),
            "--users", str(cfg["users"]), "--per-round", str(cfg["per_round"]),
            "--scale-users", str(cfg["scale_users"]), "--repeats", str(cfg["repeats"]),
            "--no-peers", "--out", str(out), "--json", str(js), "--markdown", str(md)]
    if a.quick:
        args.insert(0, "--quick")  # same sweeps as this run's --quick; sizes given anyway
    if a.no_profile:
        args.append("--no-profile")
    if a.keep:
        args.append("--keep")
    load_before = load()
    log(f"format 1: running {src / 'benchmarks' / 'bench_store.py'} (medustore from "
        f"{medustore_file})")
    cmd = [sys.executable, str(src / "benchmarks" / "bench_store.py"), *args]
    proc = subprocess.Popen(cmd, cwd=src, env=_format1_env(src), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    tail: list[str] = []
    for line in proc.stderr:
        print(f"[format 1] {line}", end="", file=sys.stderr, flush=True)
        tail = [*tail[-40:], line]
    if proc.wait() != 0:
        raise RuntimeError(f"the format-1 benchmark failed ({proc.returncode}):\n"
                           + "".join(tail))
    try:
        results = json.loads(js.read_text())
        text = md.read_text()
    finally:
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
    return {"src": str(src), "cwd": str(src), "pythonpath": _format1_env(src)["PYTHONPATH"],
            "medustore_file": medustore_file,
            "command": "python benchmarks/bench_store.py " + " ".join(args),
            "load_before": load_before, "markdown": text, "results": results}


def _bench(cfg: dict, a: argparse.Namespace, root: Path, res: dict[str, Any]) -> None:
    peers = not a.no_peers
    run = Run(cfg["params"], cfg["rounds"], cfg["users"], cfg["per_round"])
    focus = run.participation(MALICIOUS)
    if not focus:
        raise SystemExit("the malicious user never takes part: change --rounds or --users")
    res["participations"] = run.participations
    res["focus_participations"] = len(focus)
    names = list(policies())
    res["policies"] = {n: policies()[n][0].describe() + (" + exact accumulators"
                                                         if policies()[n][1] else "")
                       for n in names}
    log(f"recording {cfg['rounds']} rounds into {', '.join(names)}"
        + (" and the peers' folder" if peers else ""))
    res["append"] = record_run(run, root, names, peers)
    res["sizes"] = sizes(run, root, names, res["append"].pop("final"))
    log("sizes done")

    # Unlearning the malicious user, every archive, fresh process per case.
    rep = str(cfg["repeats"])
    cases = []
    if peers:  # torch's intra-op threads: 1, and its default (one per core)
        for threads in (1, 0):
            cases.append((f"peers: load every file, replay FedAvg "
                           f"(torch {'1 thread' if threads else 'default threads'})",
                           ["peers", str(root / "peers"), str(MALICIOUS),
                            "--threads", str(threads)]))
    for name in names:
        path = str(archive(root, name))
        if name == "medu+acc":
            cases.append(("medu+acc: exact accumulator",
                          ["store", path, str(MALICIOUS), "--exact-accumulator"]))
        else:
            cases.append((f"{name}: replay", ["store", path, str(MALICIOUS)]))
    ref = "peers" if peers else "full: replay"
    unl = unlearn_cases(run, root, cases, int(rep), ref)
    for r in unl:
        name = r["label"].split(":")[0]
        r["bound"] = None
        if name in policies() and "accumulator" not in r["label"] and r.get("removed_norm"):
            budget = budget_of(archive(root, name), MALICIOUS)
            r["bound"] = budget["bound_3sigma"] / r["removed_norm"]
    res["unlearn"] = unl
    res["replay_profile"] = {"name": "lattice-4b",
                             **replay_profile(run, root, "lattice-4b", MALICIOUS)}

    # Time against participation count: users with the fewest / median / most rounds.
    counts = sorted((len(run.participation(u)), u) for u in range(run.users)
                    if u != MALICIOUS and run.participation(u))
    picks = sorted({counts[0], counts[len(counts) // 2], counts[-1], (len(focus), MALICIOUS)})
    bp = []
    for n, u in picks:
        for name in (("lattice-4b",) if a.quick else ("full", "lattice-4b")):
            r = run_child(["store", str(archive(root, name)), str(u)], int(rep))
            r.update(label=f"{name} / user {u}", participations=n)
            bp.append(r)
    res["by_participation"] = bp
    log("participation sweep done")

    if not a.no_profile:
        res["profile"] = profile_round(run, root, names, rounds=1 if a.quick else 3)

    # Scaling: the same user, many more users. Keep the two archives it compares, free the
    # rest of the first run's disk, record the big run, then measure both alternately.
    keep = ("lattice-4b", "medu+acc")
    small_dir = root / f"users-{run.users}"
    small_dir.mkdir()
    for name in keep:
        archive(root, name).rename(archive(small_dir, name))
    for child in root.iterdir():
        if child.is_dir() and child != small_dir:
            shutil.rmtree(child)
    if not cfg["scale_users"]:
        return
    big = Run(cfg["params"], cfg["rounds"], cfg["scale_users"], cfg["per_round"],
              focus_rounds=focus)
    assert big.participation(MALICIOUS) == focus
    big.weights[MALICIOUS] = run.weights[MALICIOUS]
    big_dir = root / f"users-{big.users}"
    big_dir.mkdir()
    log(f"scaling run: {cfg['scale_users']} users")
    record_run(big, big_dir, list(keep), peers=False)
    os.sync()
    cases = []
    for name in keep:
        for acc in ((False, True) if name == "medu+acc" else (False,)):
            for r_, d in ((run, small_dir), (big, big_dir)):
                args = ["store", str(archive(d, name)), str(MALICIOUS)]
                label = f"{name}: {'exact accumulator' if acc else 'replay'}"
                cases.append(({"label": label, "users": r_.users},
                              [*args, "--exact-accumulator"] if acc else args))
    best: dict[int, dict[str, Any]] = {}
    for _ in range(int(rep)):  # alternate the cases: both sizes see the same machine load
        for i, (info, args) in enumerate(cases):
            r = run_child(args, 1)
            if i not in best or r["wall_s"] < best[i]["wall_s"]:
                best[i] = {**r, **info}
    res["scale"] = [best[i] for i in range(len(cases))]


if __name__ == "__main__":
    main()
