"""How well meters attribute prompts: formula v1 and v2 against two plain baselines.

Run from the repository root::

    .venv/bin/python -m benchmarks.metering_quality [--json OUT] [--data FILE]

The labelled set (``benchmarks/data/metering_eval.json``: capabilities with write and update
prompts, generic prompts that belong to none, benign filler sentences) is embedded with the
example workload's numpy all-MiniLM-L6-v2 (``examples/minilm``): the activation of a prompt is
the hidden state after the last layer (what ``CAPTURE_LAYERS=6`` writes), ``T x 384`` float32,
[CLS] and [SEP] included. Embeddings are cached in memory only.

Everything is fit on the WRITE half and measured on the UPDATE half:

- v1 (``embassy-cosine-margin-v1``, score.py): one positive signature per write prompt (its
  mean-pooled activation, as the daemon stores it) and every generic write prompt as a
  negative signature of EVERY capability (v1 only compares a capability with its own
  negatives, so this gives it all the negatives v2 gets).
- v2 (``embassy-centroid-window-v2``, formula_v2.py): one sample per write prompt
  (``pool_windows`` rows) and one negative sample per generic write prompt, written under the
  capabilities in turn (v2 uses negatives as one group, whatever they were written under).
- nearest-centroid: the mean of the unit mean-pooled write embeddings of each capability;
  a prompt goes to the capability of highest cosine. 1-NN: to the capability of the write
  prompt of highest cosine. Same mean-pooled embeddings (v1's ``pool``). Baselines have no
  "nothing": every prompt, generic ones included, goes to some capability.

Figures: top-1 (the right meter strictly highest and above 0 / all update prompts); mean
margin (right minus best wrong: micro-units for the formulas, cosine for the baselines);
the share of generic update prompts that move any meter (at k = 0 and with 4 benign
sentences before them); wrong-meter movement (the mean best wrong meter as a share of the
mean right one); and top-1 with k = 0..4 benign sentences prepended ("before") or split
around the prompt ("around": ceil(k/2) before, the rest after). The k sentences of prompt i
are the first k of a permutation of the benign sentences seeded by i, so the k sentences are
a subset of the k+1 ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from embassy.metering.formula_v2 import (
    FORMULA_V2,
    CentroidModel,
    Sample,
    fit,
    pool_windows,
    score_v2,
)
from embassy.metering.instruction import Polarity
from embassy.metering.score import FORMULA, SignatureSet, pool, score
from examples.minilm.model import MiniLM

DATA = Path(__file__).resolve().parent / "data" / "metering_eval.json"
SEED = 15
KS = (0, 1, 2, 3, 4)
RAISE = (0, 25_000, 50_000, 100_000)  # micro-units added to every v2 threshold
F32 = npt.NDArray[np.float32]
Scores = dict[str, float]


class Embedder:
    """The captured hidden states of a text, computed once."""

    def __init__(self) -> None:
        self.model = MiniLM.load()
        self.cache: dict[str, F32] = {}

    def __call__(self, text: str) -> F32:
        if text not in self.cache:
            self.cache[text] = self.model.forward(self.model.encode(text))
        return self.cache[text]


def dilute(prompt: str, filler: Sequence[str], k: int, mode: str) -> str:
    before = filler[: (k + 1) // 2] if mode == "around" else filler[:k]
    after = filler[len(before) : k]
    return " ".join([*before, prompt, *after])


@dataclass(frozen=True)
class Method:
    name: str
    unit: str  # "micro" or "cosine"
    can_abstain: bool
    scores: Callable[[F32], Scores]


def _unit(v: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    w = np.asarray(v, dtype=np.float64)
    return w / np.linalg.norm(w)


def methods(data: dict[str, Any], embed: Embedder) -> tuple[list[Method], CentroidModel]:
    caps = sorted(data["capabilities"])
    write = [(c, p) for c in caps for p in data["capabilities"][c]["write"]]
    generic = list(data["generic"]["write"])

    rows = [(c, Polarity.POSITIVE, pool(embed(p))) for c, p in write]
    rows += [(c, Polarity.NEGATIVE, pool(embed(p))) for p in generic for c in caps]
    sigs = SignatureSet.build(rows)

    samples = [Sample(c, Polarity.POSITIVE, pool_windows(embed(p))) for c, p in write]
    samples += [
        Sample(caps[i % len(caps)], Polarity.NEGATIVE, pool_windows(embed(p)))
        for i, p in enumerate(generic)
    ]
    model = fit(samples)

    vecs = {c: np.stack([_unit(pool(embed(p))) for cc, p in write if cc == c]) for c in caps}
    centroids = {c: _unit(v.mean(axis=0)) for c, v in vecs.items()}

    def v1(h: F32) -> Scores:
        return {c: float(v) for c, v in score(sigs, pool(h)).items()}

    def v2(h: F32) -> Scores:
        return {c: float(v) for c, v in score_v2(model, pool_windows(h)).items()}

    def centroid(h: F32) -> Scores:
        u = _unit(pool(h))
        return {c: float(u @ centroids[c]) for c in caps}

    def nn(h: F32) -> Scores:
        u = _unit(pool(h))
        return {c: float((vecs[c] @ u).max()) for c in caps}

    return [
        Method(f"v1 {FORMULA}", "micro", True, v1),
        Method(f"v2 {FORMULA_V2}", "micro", True, v2),
        Method("nearest-centroid", "cosine", False, centroid),
        Method("1-NN", "cosine", False, nn),
    ], model


def _top1(s: Scores, label: str) -> bool:
    right = s[label]
    return right > 0 and all(v < right for c, v in s.items() if c != label)


def evaluate(method: Method, data: dict[str, Any], embed: Embedder) -> dict[str, Any]:
    caps = sorted(data["capabilities"])
    update = [(c, p) for c in caps for p in data["capabilities"][c]["update"]]
    benign = list(data["benign_sentences"])
    fillers = [
        [benign[j] for j in np.random.default_rng([SEED, i]).permutation(len(benign))]
        for i in range(max(len(update), len(data["generic"]["update"])))
    ]
    base = [method.scores(embed(p)) for _, p in update]
    right = [s[c] for (c, _), s in zip(update, base, strict=True)]
    wrong = [
        max(v for cc, v in s.items() if cc != c) for (c, _), s in zip(update, base, strict=True)
    ]
    generic = [method.scores(embed(p)) for p in data["generic"]["update"]]
    generic4 = [
        method.scores(embed(dilute(p, fillers[i], 4, "before")))
        for i, p in enumerate(data["generic"]["update"])
    ]
    curves: dict[str, list[float]] = {}
    for mode in ("before", "around"):
        curve = []
        for k in KS:
            hits = sum(
                _top1(method.scores(embed(dilute(p, fillers[i], k, mode))), c)
                for i, (c, p) in enumerate(update)
            )
            curve.append(hits / len(update))
        curves[mode] = curve

    def moved(s: Scores) -> bool:
        return any(v > 0 for v in s.values()) if method.can_abstain else True

    return {
        "method": method.name,
        "unit": method.unit,
        "n_update": len(update),
        "n_generic": len(generic),
        "top1": sum(_top1(s, c) for (c, _), s in zip(update, base, strict=True)) / len(update),
        "margin": float(np.mean(np.subtract(right, wrong))),
        "generic_moved": sum(map(moved, generic)) / len(generic),
        "generic_moved_k4": sum(map(moved, generic4)) / len(generic4),
        "wrong_share": float(np.mean(wrong) / np.mean(right)) if np.mean(right) > 0 else None,
        "dilution": curves,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def report(results: list[dict[str, Any]]) -> str:
    out = [
        f"{'formula / baseline':<34} {'top-1':>6} {'margin':>16} {'generic moved':>14} "
        f"{'@k=4':>6} {'wrong/right':>11}"
    ]
    for r in results:
        margin = f"{r['margin']:,.0f} micro" if r["unit"] == "micro" else f"{r['margin']:.4f} cos"
        always = "" if r["method"].startswith("v") else "*"
        out.append(
            f"{r['method']:<34} {_pct(r['top1']):>6} {margin:>16} "
            f"{_pct(r['generic_moved']) + always:>14} {_pct(r['generic_moved_k4']):>6} "
            f"{_pct(r['wrong_share']):>11}"
        )
    out.append("* a baseline always attributes: every prompt moves some capability")
    out.append("")
    head = " ".join(f"{'k=' + str(k):>6}" for k in KS)
    out.append(f"top-1 with k benign sentences   {'before: ' + head:<44}  around: {head}")
    for r in results:
        b = " ".join(f"{_pct(x):>6}" for x in r["dilution"]["before"])
        a = " ".join(f"{_pct(x):>6}" for x in r["dilution"]["around"])
        out.append(f"{r['method']:<34}{b}          {a}")
    return "\n".join(out)


def tradeoff(model: CentroidModel, data: dict[str, Any], embed: Embedder) -> list[dict[str, Any]]:
    """v2 with every threshold raised by delta micro-units: what a stricter calibration costs."""
    out = []
    for delta in RAISE:
        raised = replace(model, thresholds=tuple(t + delta for t in model.thresholds))

        def scores(h: F32, m: CentroidModel = raised) -> Scores:
            return {c: float(v) for c, v in score_v2(m, pool_windows(h)).items()}

        r = evaluate(Method(f"v2, t_k + {delta:,}", "micro", True, scores), data, embed)
        out.append(r)
    return out


def report_tradeoff(rows: list[dict[str, Any]]) -> str:
    out = [f"{'stricter calibration':<34} {'top-1':>6} {'generic moved':>14} {'k=4 before':>11}"]
    for r in rows:
        out.append(
            f"{r['method']:<34} {_pct(r['top1']):>6} {_pct(r['generic_moved']):>14} "
            f"{_pct(r['dilution']['before'][-1]):>11}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metering_quality")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every figure here")
    parser.add_argument("--data", type=Path, default=DATA, help="the labelled set")
    args = parser.parse_args(argv)
    started = time.monotonic()
    data = json.loads(args.data.read_text(encoding="utf-8"))
    caps = sorted(data["capabilities"])
    counts = {
        c: (len(data["capabilities"][c]["write"]), len(data["capabilities"][c]["update"]))
        for c in caps
    }
    print(f"data: {args.data.name}: {data['provenance']}")
    print(
        "  "
        + ", ".join(
            f"{c} ({data['capabilities'][c]['kind']}) {w}+{u}" for c, (w, u) in counts.items()
        )
        + f"; generic {len(data['generic']['write'])}+{len(data['generic']['update'])}"
        + f"; {len(data['benign_sentences'])} benign sentences (write+update)"
    )
    embed = Embedder()
    ms, model = methods(data, embed)
    print(f"v2 calibration (micro-units): {model.calibration()}")
    results = [evaluate(m, data, embed) for m in ms]
    print()
    print(report(results))
    strict = tradeoff(model, data, embed)
    print()
    print(report_tradeoff(strict))
    elapsed = time.monotonic() - started
    print(f"\n({len(embed.cache)} texts embedded, {os.cpu_count()} CPUs, total {elapsed:.1f} s)")
    if args.json:
        out = {
            "meta": {
                "data": str(args.data),
                "provenance": data["provenance"],
                "elapsed_s": elapsed,
            },
            "v2_model": model.to_json(),
            "results": results,
            "v2_stricter_calibration": strict,
        }
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
