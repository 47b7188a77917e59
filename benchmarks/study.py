#!/usr/bin/env python
"""Memory versus utility: medustore's policies on the federated demo, unlearning measured.

For each setting (the demo's IID split, and a Dirichlet(0.5) label-skew split) the demo's
backdoored FedAvg run is trained ONCE and every round is written into many archives at
once (one ``on_round`` callback writes every store): the lossless ``full`` reference, the
presets, and one-factor sweeps of the policy around the ``medu`` preset (bits and lattice,
users kept per round, record threshold ``kappa``, coordinate threshold, aggregates), plus
an archive with only the exact per-user accumulators. The model is retrained from scratch
once without the malicious user, and once without a benign user. Then, from each archive:

* the malicious user is unlearned: clean accuracy and backdoor success, L2 distance to the
  unlearning from ``full`` (the best any compression can do under the closed form) and to
  retraining, the error budget the archive predicted (``bound(3)``), and the same model
  after ``--recovery-rounds`` more FedAvg rounds of the remaining users;
* a benign user is unlearned (the right-to-be-forgotten case): how many of its records the
  policy kept, the budget, whether the store warned, the distance to the exact answer.

Every seed is fixed: data split, poisoning, initialisation, participants, batches, and the
lattice dither (the policy's ``seed``, the key of its content-derived dither seeds).

    python benchmarks/study.py --quick                      # smoke test, < 2 minutes
    python benchmarks/study.py --markdown docs/results.md --plot docs/results.png \\
        --json /tmp/study.json                              # the published study

``--markdown`` replaces the text between the ``<!-- study:begin -->`` and
``<!-- study:end -->`` lines of an existing file, or writes the tables alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import medustore
from medustore import PRESETS, MeduPolicy
from medustore.demo.data import load_digits_dataset
from medustore.demo.federated import fedavg
from medustore.demo.model import make_model
from medustore.demo.run import (
    DemoConfig,
    evaluate,
    exact_round,
    make_users,
    recover,
    seed_everything,
)
from medustore.recover import RecoveryWarning
from medustore.recover import recover as recover_from_archive

BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"

#: The ``medu`` preset before this study (kept as a row for comparison).
PREVIOUS_MEDU = MeduPolicy(keep_fraction=0.25, coord_threshold=0.5, lattice="E8", bits=2.0,
                           aggregate_bits=6.0, name="medu (previous)")
#: No records, no aggregates: what the exact per-user accumulators cost on their own.
ACC_ONLY = MeduPolicy(kappa=1e300, keep_aggregates=False, name="accumulators only")


@dataclass(frozen=True)
class Point:
    """One row of the study: a policy in a sweep."""

    group: str
    label: str
    policy: MeduPolicy
    accumulators: bool = False

    @property
    def key(self) -> str:
        """Rows with the same archive share it (the medu baseline recurs in every sweep)."""
        data = self.policy.to_json()
        data.pop("name")
        return json.dumps([data, self.accumulators], sort_keys=True)


def _users(policy: MeduPolicy, **change: Any) -> MeduPolicy:
    return policy.evolve(**{"keep_top": None, "keep_fraction": None, **change})


def grid(quick: bool) -> list[Point]:
    """The policies of the study, one sweep (group) at a time."""
    medu = PRESETS["medu"]
    base = [Point("reference", "full (lossless)", PRESETS["full"]),
            Point("preset", "medu", medu),
            Point("preset", "lattice", PRESETS["lattice"]),
            Point("preset", "medu (previous default)", PREVIOUS_MEDU)]
    acc = Point("accumulators", "accumulators only (exact, one user)", ACC_ONLY,
                accumulators=True)
    if quick:
        return [*base[:3], RECOVER_100X,
                Point("bits", "all users, Z 2 bits", MeduPolicy(lattice="Z", bits=2.0,
                                                                 keep_aggregates=False)),
                Point("users", "top-2", _users(medu, keep_top=2)), acc]
    points = list(base)
    # Record coding alone: every record kept, no thresholds, no aggregates.
    for lattice in ("Z", "A2", "E8"):
        for bits in (1.0, 2.0, 3.0, 4.0, 6.0):
            points.append(Point("bits", f"all users, {lattice} {bits:g} bits",
                                MeduPolicy(lattice=lattice, bits=bits, keep_aggregates=False)))
    # The preset at other resolutions.
    for bits in (1.0, 2.0, 2.5):
        points.append(Point("bits", f"medu at {bits:g} bits", medu.evolve(bits=bits)))
    points.append(Point("bits", f"medu ({medu.bits:g} bits)", medu))
    # Users kept per round, medu's coding otherwise.
    for label, change in [("all users", {}), ("top-1", {"keep_top": 1}),
                          ("top-2", {"keep_top": 2}), ("top-5", {"keep_top": 5}),
                          ("top 10%", {"keep_fraction": 0.10}),
                          ("top 25%", {"keep_fraction": 0.25}),
                          ("top 50%", {"keep_fraction": 0.50})]:
        points.append(Point("users", label, _users(medu, **change)))
    points.append(Point("users", "medu (top 5% = top-1 of 20)", medu))
    # Record threshold alone as the user filter (all users otherwise).
    for kappa in (0.5, 1.0, 1.5, 2.0):
        points.append(Point("kappa", f"all users, kappa {kappa:g}", _users(medu, kappa=kappa)))
    points.append(Point("kappa", "medu (kappa 0)", medu))
    # Coordinate threshold.
    for tau in (None, 0.1, 0.25, 0.5, 1.0):
        label = "no coordinate threshold" if tau is None else f"coord tau {tau:g} rms"
        points.append(Point("coord", label, medu.evolve(coord_threshold=tau)))
    points.append(Point("coord", f"medu (coord tau {medu.coord_threshold:g}: exact zeros)", medu))
    # Aggregates.
    points.append(Point("aggregates", "aggregates not kept",
                        medu.evolve(keep_aggregates=False)))
    for bits in (0.25, 1.0, 2.0, 4.0, None):
        label = "aggregates lossless" if bits is None else f"aggregates {bits:g} bits"
        points.append(Point("aggregates", label, medu.evolve(aggregate_bits=bits)))
    points.append(Point("aggregates", f"medu (aggregates {medu.aggregate_bits:g} bits)", medu))
    # Outside what the preset may be (its tests pin aggregates, a coordinate threshold and
    # user sparsification): what the archive could be without those constraints.
    points += alternatives()
    points.append(acc)
    return points


def alternatives() -> list[Point]:
    """Policies the ``medu`` preset cannot be (no aggregates, no coordinate stage)."""
    return [
        Point("alternative", "top 10%, exact zeros, Z 1 bit, no aggregates",
              MeduPolicy(keep_fraction=0.1, coord_threshold=0.0, lattice="Z", bits=1.0,
                         keep_aggregates=False)),
        Point("alternative", "top-2, Z 1.5 bits, no aggregates",
              MeduPolicy(keep_top=2, lattice="Z", bits=1.5, keep_aggregates=False)),
        Point("alternative", "top-1, Z 2 bits, no aggregates",
              MeduPolicy(keep_top=1, lattice="Z", bits=2.0, keep_aggregates=False)),
    ]


def headline(quick: bool) -> list[Point]:
    """The rows repeated on other seeds."""
    medu = PRESETS["medu"]
    rows = [Point("reference", "full (lossless)", PRESETS["full"]),
            Point("preset", "medu", medu),
            Point("users", "top-2", _users(medu, keep_top=2)),
            Point("preset", "medu (previous default)", PREVIOUS_MEDU),
            alternatives()[0]][: 2 if quick else 5]
    return rows + [RECOVER_100X]


#: The >= 100x archive recovery is measured on besides full and medu: the preset with
#: 1-bit aggregates (recovery reads every aggregate; 0.5 bit leaves them mostly noise).
RECOVER_100X = Point("aggregates", "aggregates 1 bits",
                     PRESETS["medu"].evolve(aggregate_bits=1.0))
#: Archives recovery is measured on (by row label) and the client rounds it may spend
#: (final rounds trained by the remaining users; 0: none).
RECOVER_FROM = ("full (lossless)", "medu", "aggregates 1 bits")
RECOVER_CLIENT = (0, 1, 2, 3)


def seeded(policy: MeduPolicy, seed: int) -> MeduPolicy:
    """``policy`` with its dither key set: the same run gives the same bytes."""
    return policy.evolve(seed=seed, name=policy.name)


# ---------------------------------------------------------------------- one setting

def _flat(state: dict[str, torch.Tensor]) -> np.ndarray:
    return torch.cat([v.reshape(-1).double() for v in state.values()]).numpy()


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_setting(name: str, config: DemoConfig, points: list[Point], benign: int,
                root: Path, log: Any, sweep: tuple[int, ...] = ()) -> dict[str, Any]:
    """Train once, record into every archive, retrain, unlearn from each archive."""
    t_start = time.perf_counter()
    seed_everything(config.seed)
    train, test = load_digits_dataset(seed=config.seed)
    users = make_users(config, train)
    malicious = list(range(config.malicious))
    if benign in malicious or benign not in users:
        raise SystemExit(f"--benign-user must be an honest user id, got {benign}")
    model = make_model(config.seed)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = sum(v.numel() for v in w0.values())
    shapes = {k: v.shape for k, v in w0.items()}

    archives: dict[str, Point] = {}
    for p in points:
        archives.setdefault(p.key, p)
    paths = {key: root / f"{name}-{i:02d}.zarr" for i, key in enumerate(archives)}
    record_s = dict.fromkeys(archives, 0.0)
    records = 0

    with contextlib.ExitStack() as stack:
        stores = {key: stack.enter_context(medustore.open(
            paths[key], "w", model=w0, policy=seeded(p.policy, config.seed),
            accumulators=p.accumulators)) for key, p in archives.items()}

        def on_round(t: int, updates: dict, weights: dict) -> None:
            nonlocal records
            records += len(updates)
            plain = {u: {k: v.numpy() for k, v in h.items()} for u, h in updates.items()}
            for key, store in stores.items():
                t0 = time.perf_counter()
                store.record_round(t, plain, weights=weights)
                record_s[key] += time.perf_counter() - t0

        t0 = time.perf_counter()
        w_poisoned = fedavg(model, users, config.fed(), on_round, progress=False)
        train_s = time.perf_counter() - t0 - sum(record_s.values())
        for store in stores.values():
            # The study is the archives' only user: no reader holds a replaced version, so
            # every one can go before the sizes are measured (as `medustore demo` does).
            store.compact(grace=0)
    print(f"[{name}] trained ({train_s:.1f} s) and recorded {len(archives)} archives "
          f"({sum(record_s.values()):.1f} s)", file=log, flush=True)

    t0 = time.perf_counter()
    w_retrain = fedavg(model, users, config.fed(), exclude=malicious, progress=False)
    retrain_s = time.perf_counter() - t0
    w_retrain_benign = fedavg(model, users, config.fed(), exclude=[benign], progress=False)
    k = config.recovery_rounds
    reference = {
        "poisoned": evaluate(model, w_poisoned, test, config.target),
        "retrain": evaluate(model, w_retrain, test, config.target),
        "retrain_without_benign": evaluate(model, w_retrain_benign, test, config.target),
    }
    if k:
        reference["retrain_recovered"] = evaluate(
            model, recover(model, w_retrain, users, config, malicious), test, config.target)
        reference["poisoned_recovered"] = evaluate(
            model, recover(model, w_poisoned, users, config, malicious), test, config.target)

    def state(flat: np.ndarray) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for key, shape in shapes.items():
            n = math.prod(shape)
            out[key] = torch.from_numpy(flat[i:i + n].reshape(shape).astype(np.float32))
            i += n
        return out

    def unlearn(store: medustore.UpdateStore, who: list[int]) -> tuple[np.ndarray, bool]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", medustore.IncompleteUnlearningWarning)
            w = store.unlearn(who, out="flat", progress=False)
        warned = any(issubclass(c.category, medustore.IncompleteUnlearningWarning)
                     for c in caught)
        return np.asarray(w, dtype=np.float64), warned

    full_key = Point("reference", "", PRESETS["full"]).key
    if full_key not in archives:
        raise SystemExit("the grid must contain the full policy (the reference)")
    with medustore.open(paths[full_key], "r") as full:
        ref_mal, _ = unlearn(full, malicious)
        ref_ben, _ = unlearn(full, [benign])
        participations = len(full.participation(benign))
        mid = full.rounds[len(full.rounds) // 2]
        w_mid = np.asarray(full.reconstruct(mid, out="flat"), dtype=np.float64)
        w_start = np.asarray(full.initial("flat"), dtype=np.float64)
    retrain_flat, retrain_benign_flat = _flat(w_retrain), _flat(w_retrain_benign)
    # How many recovery rounds close the gap: the full unlearning, retraining and the
    # poisoned model, each given K more rounds of the remaining users.
    recovery_sweep = {}
    for rounds in sweep:
        c = dataclasses.replace(config, recovery_rounds=rounds)
        recovery_sweep[str(rounds)] = {
            label: evaluate(model, recover(model, w, users, c, malicious), test, config.target)
            for label, w in (("unlearned_full", state(ref_mal)), ("retrain", w_retrain),
                             ("poisoned", w_poisoned))}
    peers = records * n_params * 4

    results: dict[str, dict[str, Any]] = {}
    for key, p in archives.items():
        path = paths[key]
        with medustore.open(path, "r") as store:
            nbytes = store.nbytes_stored()
            stored = int(store.side("stored").sum())
            record_bytes = int(store.side("nbytes").sum())
            w_mal, warned_mal = unlearn(store, malicious)
            b_mal = store.error_budget(malicious)
            w_ben, warned_ben = unlearn(store, [benign])
            b_ben = store.error_budget([benign])
            recon = (float(np.linalg.norm(np.asarray(store.reconstruct(mid, out="flat"),
                                                     dtype=np.float64) - w_mid))
                     if p.policy.keep_aggregates else None)
        row: dict[str, Any] = {
            "policy": p.policy.describe(),
            "policy_json": p.policy.to_json(),
            "accumulators": p.accumulators,
            "bytes": nbytes,
            "ratio": peers / nbytes,
            "bits_per_param": 8.0 * nbytes / (records * n_params),
            "records_stored": stored,
            "record_bytes": record_bytes,
            "bits_per_stored_value": 8.0 * record_bytes / (stored * n_params) if stored else None,
            "aggregate_bytes": _dir_bytes(path / "aggregate"),
            "record_seconds": record_s[key],
            "reconstruct_l2": recon,
            "malicious": {
                **evaluate(model, state(w_mal), test, config.target),
                "l2_to_full": float(np.linalg.norm(w_mal - ref_mal)),
                "l2_to_retrain": float(np.linalg.norm(w_mal - retrain_flat)),
                "budget": b_mal.to_json(),
                "warned": warned_mal,
            },
            "benign": {
                **evaluate(model, state(w_ben), test, config.target),
                "participations": participations,
                "l2_to_full": float(np.linalg.norm(w_ben - ref_ben)),
                "l2_to_retrain": float(np.linalg.norm(w_ben - retrain_benign_flat)),
                "budget": b_ben.to_json(),
                "warned": warned_ben,
            },
        }
        if k:
            row["malicious"]["recovered"] = evaluate(
                model, recover(model, state(w_mal), users, config, malicious), test,
                config.target)
        results[key] = row
    recovered = recover_rows(points, paths, model, users, config, malicious, test,
                             retrain_s, log, name)
    for key in results:
        shutil.rmtree(paths[key], ignore_errors=True)
    seconds = time.perf_counter() - t_start
    print(f"[{name}] done in {seconds:.1f} s", file=log, flush=True)
    return {
        "name": name,
        "config": dataclasses.asdict(config),
        "parameters": n_params,
        "records": records,
        "peers_float32_bytes": peers,
        "malicious_users": malicious,
        "benign_user": benign,
        "reference": reference,
        "full_vs_retrain_l2": float(np.linalg.norm(ref_mal - retrain_flat)),
        "poisoned_vs_retrain_l2": float(np.linalg.norm(_flat(w_poisoned) - retrain_flat)),
        "benign_full_vs_retrain_l2": float(np.linalg.norm(ref_ben - retrain_benign_flat)),
        "recovery_sweep": recovery_sweep,
        "recover": recovered,
        "reconstruct_round": int(mid),
        "mid_vs_initial_l2": float(np.linalg.norm(w_mid - w_start)),
        "train_seconds": train_s,
        "retrain_seconds": retrain_s,
        "seconds": seconds,
        "rows": [{"group": p.group, "label": p.label, "archive": key} for p in points
                 for key in [p.key]],
        "archives": results,
    }


def recover_rows(points: list[Point], paths: dict[str, Path], model: Any, users: dict,
                 config: DemoConfig, malicious: list[int], test: Any, retrain_s: float,
                 log: Any, name: str) -> dict[str, Any]:
    """``method="recover"`` from the archives of `RECOVER_FROM`, with each number of client
    rounds of `RECOVER_CLIENT` (the last rounds trained by the remaining users)."""
    out: dict[str, Any] = {}
    callback = exact_round(model, users, config)
    for label in RECOVER_FROM:
        p = next((q for q in points if q.label == label), None)
        if p is None:
            continue
        runs = {}
        with medustore.open(paths[p.key], "r") as store:
            nbytes = store.nbytes_stored()
            for k in RECOVER_CLIENT:
                if k > config.rounds:
                    continue
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    done = recover_from_archive(store, malicious, out="state_dict",
                                                progress=False,
                                                exact_round=callback if k else None, final=k)
                rep = done.report
                runs[str(k)] = {
                    **evaluate(model, done.model, test, config.target),
                    "client_rounds": rep.client_rounds,
                    "retrain_client_rounds": rep.retrain_client_rounds,
                    "seconds": rep.seconds,
                    "retrain_seconds": retrain_s,
                    "report": rep.to_json(),
                    "warned": any(issubclass(c.category, RecoveryWarning) for c in caught),
                }
        out[label] = {"archive": p.key, "bytes": nbytes, "runs": runs}
    print(f"[{name}] recovery measured on {len(out)} archives", file=log, flush=True)
    return out


# ---------------------------------------------------------------------- report

def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return str(n)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def meets_target(a: dict[str, Any], ref: dict[str, Any], recovered: bool) -> bool:
    """The issue's target: archive >= 100x smaller than the peers' float32 history, unlearned
    model at most 1 point below retraining on clean accuracy and at most 2 points above it
    on backdoor success (after recovery rounds: against retraining plus the same rounds)."""
    m = a["malicious"]["recovered"] if recovered else a["malicious"]
    r = ref["retrain_recovered"] if recovered else ref["retrain"]
    return (a["ratio"] >= 100.0
            and r["clean_accuracy"] - m["clean_accuracy"] <= 0.01 + 1e-9
            and m["backdoor_success"] - r["backdoor_success"] <= 0.02 + 1e-9)


def recover_target(run: dict[str, Any], ref: dict[str, Any], ratio: float | None) -> str:
    """Issue 11's targets: 0 client rounds: clean within 2 points of retraining, backdoor at
    most 2 above (from full, and from a >= 100x archive); with client rounds: within 1
    point, spending at most 10% of retraining's client rounds."""
    gap = ref["retrain"]["clean_accuracy"] - run["clean_accuracy"]
    bd = run["backdoor_success"] - ref["retrain"]["backdoor_success"]
    if run["client_rounds"] == 0:
        ok = gap <= 0.02 + 1e-9 and bd <= 0.02 + 1e-9
        if ratio is not None and ratio < 100.0:
            return ("yes" if ok else "no") + " (archive < 100x)"
    else:
        ok = (gap <= 0.01 + 1e-9 and bd <= 0.02 + 1e-9
              and run["client_rounds"] <= 0.1 * run["retrain_client_rounds"])
    return "yes" if ok else "no"


def recover_section(study: dict[str, Any]) -> list[str]:
    """The recovery table (``method="recover"``)."""
    body = []
    for s in study["settings"]:
        ref = s["reference"]
        for label, r in s.get("recover", {}).items():
            ratio = s["peers_float32_bytes"] / r["bytes"]
            for run in r["runs"].values():
                rep = run["report"]
                body.append([
                    s["name"], label, f"{ratio:.1f}x",
                    f"{run['client_rounds']} / {run['retrain_client_rounds']}",
                    _pct(run["clean_accuracy"]), _pct(run["backdoor_success"]),
                    f"{100 * (run['clean_accuracy'] - ref['retrain']['clean_accuracy']):+.1f}",
                    f"{rep['l2_to_closed_form']:.3f}",
                    "yes" if run["warned"] else "no",
                    f"{run['seconds']:.2f} / {run['retrain_seconds']:.1f}",
                    recover_target(run, ref, None if label == "full (lossless)" else ratio)])
    if not body:
        return []
    return [
        "Recovery (`unlearn(..., method=\"recover\")`): training replayed from w_0 without the "
        "malicious user, the remaining users' updates estimated from the archive; K client "
        "rounds: the last K rounds trained by the remaining users for real. Targets: with 0 "
        "client rounds, clean within 2 points of retraining and backdoor at most 2 points "
        "above it; with client rounds, within 1 point using at most 10% of retraining's "
        "client rounds. Seconds: recovery (client rounds included) / retraining.",
        "",
        _table(["setting", "archive", "ratio", "client rounds / retrain", "clean %",
                "backdoor %", "vs retrain", "L2 to closed form", "safeguard", "seconds",
                "target"], body),
        ""]


SUMMARY = ("full (lossless)", "medu", "medu (previous default)", "top-2",
           "top 10%, exact zeros, Z 1 bit, no aggregates",
           "accumulators only (exact, one user)")


def summary_table(study: dict[str, Any]) -> str:
    """The headline rows of every setting in one table."""
    k = study["recovery_rounds"]
    header = ["setting", "model / archive", "ratio", "clean %", "backdoor %"]
    if k:
        header += [f"clean +{k}", f"bd +{k}"]
    header += ["L2 to full", "target"]
    body = []
    for s in study["settings"]:
        ref = s["reference"]
        name = s["name"]
        line = [name, "retrain from scratch", "", _pct(ref["retrain"]["clean_accuracy"]),
                _pct(ref["retrain"]["backdoor_success"])]
        if k:
            line += [_pct(ref["retrain_recovered"]["clean_accuracy"]),
                     _pct(ref["retrain_recovered"]["backdoor_success"])]
        body.append(line + [f"({s['full_vs_retrain_l2']:.3f} from full)", ""])
        shown = set()
        for r in s["rows"]:
            if r["label"] not in SUMMARY or r["label"] in shown:
                continue
            shown.add(r["label"])
            a = s["archives"][r["archive"]]
            m = a["malicious"]
            line = [name, r["label"], f"{a['ratio']:.1f}x", _pct(m["clean_accuracy"]),
                    _pct(m["backdoor_success"])]
            verdict = "yes" if meets_target(a, ref, False) else "no"
            if k:
                line += [_pct(m["recovered"]["clean_accuracy"]),
                         _pct(m["recovered"]["backdoor_success"])]
                verdict += " / " + ("yes" if meets_target(a, ref, True) else "no")
            body.append(line + [f"{m['l2_to_full']:.3f}", verdict])
    return _table(header, body)


def markdown(study: dict[str, Any]) -> str:
    """The study's tables."""
    k = study["recovery_rounds"]
    out: list[str] = ["### Summary", ""]
    out.append(
        "Target: archive >= 100x smaller than the peers' float32 history, unlearned model "
        "at most 1 point below retraining on clean accuracy and at most 2 points above it on "
        "backdoor success" + (f"; the target column reads raw / after {k} recovery rounds "
                              f"(compared with retraining + {k} rounds)." if k else "."))
    out += ["", summary_table(study), ""]
    out += recover_section(study)
    sweeps = [s for s in study["settings"] if s.get("recovery_sweep")]
    if sweeps:
        ks = list(sweeps[0]["recovery_sweep"])
        out.append("Recovery rounds: clean accuracy / backdoor success (%) of the unlearning "
                   "from full, of retraining and of the poisoned model, each after K more "
                   "FedAvg rounds of the remaining users (K = 0: as they are).")
        out.append("")
        body = []
        for s in sweeps:
            ref = s["reference"]
            full = s["archives"][next(r["archive"] for r in s["rows"]
                                      if r["group"] == "reference")]["malicious"]
            for label, key, zero in (("unlearned from full", "unlearned_full", full),
                                     ("retrain", "retrain", ref["retrain"]),
                                     ("poisoned", "poisoned", ref["poisoned"])):
                cells = [f"{_pct(zero['clean_accuracy'])} / {_pct(zero['backdoor_success'])}"]
                cells += [f"{_pct(s['recovery_sweep'][kk][key]['clean_accuracy'])} / "
                          f"{_pct(s['recovery_sweep'][kk][key]['backdoor_success'])}"
                          for kk in ks]
                body.append([s["name"], label, *cells])
        out.append(_table(["setting", "model", "K = 0", *[f"K = {kk}" for kk in ks]], body))
        out.append("")
    for s in study["settings"]:
        c, ref = s["config"], s["reference"]
        out.append(f"### {s['name']}: {c['split']} split"
                   + (f" (alpha {c['alpha']:g})" if c["split"] == "dirichlet" else "")
                   + f", seed {c['seed']}")
        out.append("")
        out.append(f"{c['users']} users, {c['rounds']} rounds, {s['parameters']} parameters, "
                   f"{s['records']} records; peers' float32 history "
                   f"{_bytes(s['peers_float32_bytes'])} (100x smaller: "
                   f"{_bytes(s['peers_float32_bytes'] / 100)}). Malicious user "
                   f"{s['malicious_users']}, benign user {s['benign_user']}.")
        out.append("")
        rows = [["poisoned (w_T)", _pct(ref["poisoned"]["clean_accuracy"]),
                 _pct(ref["poisoned"]["backdoor_success"])],
                ["retrain from scratch", _pct(ref["retrain"]["clean_accuracy"]),
                 _pct(ref["retrain"]["backdoor_success"])]]
        if k:
            rows += [[f"retrain + {k} rounds", _pct(ref["retrain_recovered"]["clean_accuracy"]),
                      _pct(ref["retrain_recovered"]["backdoor_success"])],
                     [f"poisoned + {k} rounds (no unlearning)",
                      _pct(ref["poisoned_recovered"]["clean_accuracy"]),
                      _pct(ref["poisoned_recovered"]["backdoor_success"])]]
        out.append(_table(["reference model", "clean %", "backdoor %"], rows))
        out.append("")
        out.append(f"L2 distances: unlearned from full to retrain {s['full_vs_retrain_l2']:.3f}, "
                   f"poisoned to retrain {s['poisoned_vs_retrain_l2']:.3f}. Training "
                   f"{s['train_seconds']:.1f} s, retraining {s['retrain_seconds']:.1f} s.")
        out.append("")
        header = ["policy", "bytes", "ratio", "bits/param", "stored", "clean %", "backdoor %"]
        if k:
            header += [f"clean +{k}", f"bd +{k}"]
        header += ["L2 to full", "bound(3)", "L2 to retrain", "target", "record s"]
        body = []
        for r in s["rows"]:
            a = s["archives"][r["archive"]]
            m = a["malicious"]
            line = [f"{r['group']}: {r['label']}", _bytes(a["bytes"]), f"{a['ratio']:.1f}x",
                    f"{a['bits_per_param']:.2f}", str(a["records_stored"]),
                    _pct(m["clean_accuracy"]), _pct(m["backdoor_success"])]
            verdict = "yes" if meets_target(a, ref, False) else "no"
            if k:
                line += [_pct(m["recovered"]["clean_accuracy"]),
                         _pct(m["recovered"]["backdoor_success"])]
                verdict += " / " + ("yes" if meets_target(a, ref, True) else "no")
            line += [f"{m['l2_to_full']:.3f}", f"{m['budget']['bound_3sigma']:.3f}",
                     f"{m['l2_to_retrain']:.3f}", verdict, f"{a['record_seconds']:.1f}"]
            body.append(line)
        out.append("Unlearning the malicious user:")
        out.append("")
        out.append(_table(header, body))
        out.append("")
        first = s["archives"][s["rows"][0]["archive"]]
        out.append(f"Unlearning benign user {s['benign_user']} "
                   f"({first['benign']['participations']} participations). The exact answer "
                   "is the unlearning from full; its distance to retraining without that user "
                   f"is {s['benign_full_vs_retrain_l2']:.3f}, and it scores "
                   f"{_pct(first['benign']['clean_accuracy'])}% clean (retrained without the "
                   f"user: {_pct(ref['retrain_without_benign']['clean_accuracy'])}%, "
                   f"w_T: {_pct(ref['poisoned']['clean_accuracy'])}%):")
        out.append("")
        body = []
        seen = set()
        for r in s["rows"]:
            if r["archive"] in seen:
                continue
            seen.add(r["archive"])
            a = s["archives"][r["archive"]]
            b = a["benign"]
            bud = b["budget"]
            body.append([f"{r['group']}: {r['label']}", str(bud["records_used"]),
                         str(bud["records_missing"]), f"{bud['deterministic']:.3f}",
                         f"{bud['rms']:.3f}", f"{bud['bound_3sigma']:.3f}",
                         f"{b['l2_to_full']:.3f}", "yes" if b["warned"] else "no",
                         _pct(b["clean_accuracy"])])
        out.append(_table(["policy", "used", "missing", "det", "rms", "bound(3)", "L2 to full",
                           "warned", "clean %"], body))
        out.append("")
        body = []
        seen = set()
        for r in s["rows"]:
            a = s["archives"][r["archive"]]
            if r["archive"] in seen or r["group"] not in ("aggregates", "preset", "reference"):
                continue
            seen.add(r["archive"])
            body.append([f"{r['group']}: {r['label']}", _bytes(a["aggregate_bytes"]),
                         _bytes(a["record_bytes"]),
                         _bytes(a["bytes"] - a["aggregate_bytes"] - a["record_bytes"]),
                         "n/a" if a["reconstruct_l2"] is None else f"{a['reconstruct_l2']:.3f}"])
        if body:
            out.append(f"Where the bytes go, and `reconstruct({s['reconstruct_round']})` "
                       f"against the exact model of that round (which is "
                       f"{s['mid_vs_initial_l2']:.3f} from w_0); 'other' is the two float32 "
                       "model copies (w_0 and w_T), the side arrays and the metadata:")
            out.append("")
            out.append(_table(["policy", "aggregates", "records", "other",
                               "reconstruct L2 error"], body))
            out.append("")
    return "\n".join(out)


def plot(study: dict[str, Any], path: Path) -> None:
    """Memory (ratio, log) against clean accuracy, backdoor success and distance to full."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    main = [s for s in study["settings"] if not s.get("extra")]
    k = study["recovery_rounds"]
    fig, axes = plt.subplots(len(main), 4, figsize=(21, 5.0 * len(main)), squeeze=False)
    colors = {"reference": "black", "preset": "tab:red", "bits": "tab:blue",
              "users": "tab:green", "kappa": "tab:olive", "coord": "tab:purple",
              "aggregates": "tab:orange", "alternative": "tab:cyan",
              "accumulators": "tab:brown"}
    floor = 1e-3  # where an exact answer (distance 0) is drawn on the log axis
    for row, s in zip(axes, main, strict=True):
        plot_client_rounds(row[3], s)
        row = row[:3]
        ref = s["reference"]
        full_key = next(r["archive"] for r in s["rows"] if r["group"] == "reference")
        full = s["archives"][full_key]
        medu_key = next(r["archive"] for r in s["rows"] if r["label"] == "medu")
        groups: list[str] = []
        top_backdoor = 0.0
        for r in s["rows"]:
            a = s["archives"][r["archive"]]
            m = a["malicious"]
            g = r["group"]
            if g not in groups:
                groups.append(g)
            x = a["ratio"]
            row[0].scatter(x, 100 * m["clean_accuracy"], color=colors[g], s=26)
            row[1].scatter(x, 100 * m["backdoor_success"], color=colors[g], s=26)
            top_backdoor = max(top_backdoor, m["backdoor_success"])
            if k:
                rec = m["recovered"]
                row[0].scatter(x, 100 * rec["clean_accuracy"], facecolors="none",
                               edgecolors=colors[g], s=26)
                row[1].scatter(x, 100 * rec["backdoor_success"], facecolors="none",
                               edgecolors=colors[g], s=26)
                top_backdoor = max(top_backdoor, rec["backdoor_success"])
            if r["archive"] != full_key:
                row[2].scatter(x, max(m["l2_to_full"], floor), color=colors[g], s=26)
                if not a["accumulators"]:  # the budget API does not see the accumulator
                    row[2].scatter(x, max(m["budget"]["bound_3sigma"], floor), marker="_",
                                   color=colors[g], s=90)
                elif m["l2_to_full"] < floor:
                    row[2].annotate("exact (accumulators)", (x, floor), fontsize=7,
                                    xytext=(4, 4), textcoords="offset points")
        medu = s["archives"][medu_key]["malicious"]
        x_medu = s["archives"][medu_key]["ratio"]
        star = {"marker": "*", "s": 240, "color": "tab:red", "zorder": 5,
                "edgecolors": "black", "linewidths": 0.5}
        row[0].scatter(x_medu, 100 * medu["clean_accuracy"], **star)
        row[1].scatter(x_medu, 100 * medu["backdoor_success"], **star)
        row[2].scatter(x_medu, max(medu["l2_to_full"], floor), **star)
        for ax, metric in ((row[0], "clean_accuracy"), (row[1], "backdoor_success")):
            ax.axhline(100 * ref["retrain"][metric], color="tab:green", ls="-", lw=1.3)
            if k:
                ax.axhline(100 * ref["retrain_recovered"][metric], color="tab:green", ls=":",
                           lw=1.3)
            ax.axhline(100 * full["malicious"][metric], color="black", ls="--", lw=1.2)
        row[0].axhline(100 * ref["poisoned"]["clean_accuracy"], color="gray", ls="-.", lw=1)
        row[1].set_ylim(-1, max(10.0, 100 * top_backdoor + 2))
        row[2].axhline(s["full_vs_retrain_l2"], color="tab:green", ls="-", lw=1.3)
        for ax in row:
            ax.set_xscale("log")
            ax.axvline(100, color="gray", lw=0.8, ls=":")
            ax.set_xlabel("memory: peers' float32 history / archive bytes (log)")
            ax.grid(alpha=0.3)
        row[2].set_yscale("log")
        c = s["config"]
        title = c["split"] + (f" (alpha {c['alpha']:g})" if c["split"] == "dirichlet" else "")
        row[0].set_ylabel("clean accuracy (%)")
        row[1].set_ylabel("backdoor success (%)")
        row[2].set_ylabel("L2 distance to unlearning from full")
        row[0].set_title(f"{title}: clean accuracy after unlearning")
        row[1].set_title(f"{title}: backdoor success (poisoned w_T: "
                         f"{100 * ref['poisoned']['backdoor_success']:.1f}%)")
        row[2].set_title(f"{title}: distance to full unlearning")
        handles = [Line2D([], [], marker="o", ls="", color=colors[g], label=g) for g in groups]
        handles.append(Line2D([], [], marker="*", ls="", ms=13, color="tab:red",
                              markeredgecolor="black", label="medu preset"))
        if k:
            handles.append(Line2D([], [], marker="o", ls="", mfc="none", color="gray",
                                  label=f"hollow: + {k} recovery rounds"))
        handles += [Line2D([], [], color="tab:green", label="retrain from scratch"),
                    *([Line2D([], [], color="tab:green", ls=":",
                              label=f"retrain + {k} rounds")] if k else []),
                    Line2D([], [], color="black", ls="--", label="unlearned from full"),
                    Line2D([], [], color="gray", ls="-.", label="poisoned w_T")]
        row[0].legend(handles=handles, fontsize=7, loc="center left", ncol=2)
        row[2].legend(handles=[
            Line2D([], [], marker="o", ls="", color="gray", label="measured"),
            Line2D([], [], marker="_", ls="", ms=10, color="gray", label="predicted bound(3)"),
            Line2D([], [], color="tab:green", label="full unlearning to retrain")],
            fontsize=7, loc="lower right")
    fig.suptitle("medustore policies on the digits demo: memory against utility after "
                 "unlearning the malicious user (dotted vertical: 100x)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_client_rounds(ax: Any, s: dict[str, Any]) -> None:
    """Clean accuracy against the client rounds spent: recovery (with K final client
    rounds), the closed form plus K recovery rounds, and retraining from scratch."""
    ref = s["reference"]
    c = s["config"]
    styles = {"full (lossless)": ("black", "o"), "medu": ("tab:red", "*"),
              "aggregates 1 bits": ("tab:orange", "s")}
    per_round = None
    for label, r in s.get("recover", {}).items():
        runs = list(r["runs"].values())
        if not runs:
            continue
        per_round = runs[0]["retrain_client_rounds"] / c["rounds"]
        color, marker = styles.get(label, ("gray", "o"))
        ratio = s["peers_float32_bytes"] / r["bytes"]
        ax.plot([x["client_rounds"] for x in runs], [100 * x["clean_accuracy"] for x in runs],
                marker=marker, color=color, label=f"recover from {label} ({ratio:.0f}x)")
    sweep = s.get("recovery_sweep") or {}
    full = next(s["archives"][r["archive"]] for r in s["rows"] if r["group"] == "reference")
    if per_round is not None:
        ks = [0, *map(int, sweep)]
        acc = [full["malicious"]["clean_accuracy"],
               *[sweep[str(k)]["unlearned_full"]["clean_accuracy"] for k in ks[1:]]]
        ax.plot([k * per_round for k in ks], [100 * a for a in acc], ls="--", marker="x",
                color="tab:blue", label="closed form (full) + K recovery rounds")
        total = per_round * c["rounds"]
        ax.scatter([total], [100 * ref["retrain"]["clean_accuracy"]], color="tab:green",
                   marker="D", s=50, zorder=5, label="retrain from scratch")
        ax.axvline(0.1 * total, color="gray", lw=0.8, ls=":")
    ax.axhline(100 * ref["retrain"]["clean_accuracy"], color="tab:green", lw=1.0)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(left=-1)
    ax.set_xlabel("client rounds spent (user-rounds of training; dotted: 10% of retraining)")
    ax.set_ylabel("clean accuracy (%)")
    ax.set_title("clean accuracy against client rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ""
    with contextlib.suppress(OSError):
        load = f", load average at start {os.getloadavg()[0]:.1f}"
    return (f"{cpu}, {os.cpu_count()} logical CPUs{load}; Python {platform.python_version()}, "
            f"torch {torch.__version__} (1 thread), numpy {np.__version__}, medustore "
            f"{medustore.__version__}, {platform.system()} {platform.release()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 4 rounds, 6 archives per setting, no extra seeds")
    ap.add_argument("--settings", default="iid,dirichlet",
                    help="comma-separated: iid (the demo), dirichlet (alpha 0.5)")
    ap.add_argument("--rounds", type=int, default=None, help="FedAvg rounds (default: the demo's)")
    ap.add_argument("--seed", type=int, default=0, help="root seed of the main settings")
    ap.add_argument("--extra-seeds", default="1,2",
                    help="IID seeds on which the headline policies are repeated ('' for none)")
    ap.add_argument("--recovery-rounds", type=int, default=DemoConfig.recovery_rounds,
                    help="FedAvg rounds of the remaining users after unlearning (0: none)")
    ap.add_argument("--recovery-sweep", default="1,2,3,5",
                    help="recovery rounds tried on the full unlearning, retraining and the "
                         "poisoned model ('' for none)")
    ap.add_argument("--benign-user", type=int, default=1, help="honest user unlearned too")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where archives are written (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="write every number here")
    ap.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    ap.add_argument("--plot", type=Path, default=None, help="write the PNG plot here")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    log = sys.stderr
    extra = [int(x) for x in args.extra_seeds.split(",") if x.strip()] if not args.quick else []
    sweep = tuple(int(x) for x in args.recovery_sweep.split(",") if x.strip())
    if args.quick:
        sweep = sweep[:1]
    overrides: dict[str, Any] = {"recovery_rounds": args.recovery_rounds}
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    elif args.quick:
        overrides["rounds"] = 4
    configs = {"iid": DemoConfig(seed=args.seed, **overrides),
               "dirichlet": DemoConfig(split="dirichlet", alpha=0.5, seed=args.seed,
                                       **overrides)}
    wanted = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = set(wanted) - set(configs)
    if unknown:
        ap.error(f"unknown settings {sorted(unknown)}; choose from {', '.join(configs)}")
    if "iid" not in wanted and extra:
        extra = []
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medustore-study-")))
        else:
            root = args.workdir
            root.mkdir(parents=True, exist_ok=True)
        settings = [run_setting(name, configs[name], grid(args.quick), args.benign_user, root,
                                log, sweep) for name in wanted]
        for seed in extra:
            s = run_setting(f"iid-seed{seed}", dataclasses.replace(configs["iid"], seed=seed),
                            headline(args.quick), args.benign_user, root, log, sweep)
            s["extra"] = True
            settings.append(s)
    study = {
        "machine": machine(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else
                                                         sys.argv[1:])]),
        "recovery_rounds": args.recovery_rounds,
        "medu_preset": PRESETS["medu"].describe(),
        "settings": settings,
        "seconds": time.perf_counter() - started,
    }
    text = markdown(study)
    if args.json:
        args.json.write_text(json.dumps(study, indent=1))
    if args.plot:
        plot(study, args.plot)
    if args.markdown:
        block = (f"{BEGIN}\n<!-- generated by benchmarks/study.py; edits here are replaced -->\n\n"
                 f"Machine: {study['machine']}. Study wall time {study['seconds']:.0f} s."
                 f"\n\n{text}\n{END}")
        old = args.markdown.read_text() if args.markdown.exists() else ""
        if BEGIN in old and END in old:
            head, rest = old.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            args.markdown.write_text(head + block + tail)
        else:
            args.markdown.write_text(block + "\n")
    else:
        print(text)
    print(f"study done in {study['seconds']:.0f} s", file=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
