"""Routers measured on `consort eval` records: the cost–quality curve, APGR and CPT, per RouteLLM.

    python -m bench.routing --records results/part3 --group mc --cheap qwen05 --strong qwen15 \
        --out docs/routing

Reads <records>/<member>/<group>/predictions.jsonl (whatever exists: members with no records are
left out and said so; each file gives only the answers of the member its folder names, so a folder
may link to a pair's run), keeps the questions every chosen member answered, splits them dev/test by a
hash of the question id (runtime/routing/records.py), fits every router on dev only and measures on
test only:

- between a cheap and a strong member: the learned router (RouteLLM's similarity-weighted ranking)
  and Eagle's ELO, each swept over its threshold: accuracy against the share of strong-member calls,
  with APGR (the area under the performance-gap-recovered curve) and CPT(50 %) / CPT(80 %) (the
  share of strong calls needed to recover that much of the gap); random routing is the diagonal.
  And each router's disagreement AUC: on the test questions only one of the two gets right (the only
  ones routing can win or lose), how well its score tells which one (0.5: no signal).
- over all members: accuracy and mean cost of each single member, the oracle, the random router,
  Eagle before feedback and after the dev feedback, and the bandit after the dev feedback.

Writes <out>/routing.json and <out>/routing.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from consort.runtime.routing.bandit import BanditRouter
from consort.runtime.routing.config import BanditConfig, EloConfig
from consort.runtime.routing.cost import CostModel
from consort.runtime.routing.elo import EloRouter
from consort.runtime.routing.embed import make_embedder
from consort.runtime.routing.learned import DEFAULT_SHARPNESS, train
from consort.runtime.routing.records import (
    QuestionRecord,
    Split,
    complete_for,
    find_predictions,
    member_folder,
    read_predictions,
)
from consort.runtime.routing.store import FeedbackEvent

# Parameter counts in billions: the default cost per generated token of the four members.
DEFAULT_COSTS = {"smollm2": 0.135, "gemma3": 0.27, "qwen05": 0.5, "qwen15": 1.5}


@dataclass
class Curve:
    """Accuracy at each share of strong-member calls, from 0 to 1, for one router."""

    share: list[float]
    accuracy: list[float]


def threshold_curve(strong_score: np.ndarray, cheap_right: np.ndarray, strong_right: np.ndarray) -> Curve:
    """Send the questions with the highest strong scores to the strong member, 0..n of them."""
    order = np.argsort(-strong_score, kind="stable")
    n = len(order)
    use_strong = np.zeros(n, dtype=bool)
    shares, accuracies = [0.0], [float(cheap_right.mean())]
    for k, index in enumerate(order, 1):
        use_strong[index] = True
        right = np.where(use_strong, strong_right, cheap_right)
        shares.append(k / n)
        accuracies.append(float(right.mean()))
    return Curve(shares, accuracies)


def disagreement_auc(
    strong_score: np.ndarray, cheap_right: np.ndarray, strong_right: np.ndarray
) -> float | None:
    """How well a router's scores tell, where the two members disagree, which one is right.

    The probability that a question only the strong member gets right scores higher for the strong
    member than a question only the cheap member gets right (ties count half): 0.5 is no signal, and
    only these questions can move a router's accuracy away from the straight line between the two
    members. None when either kind of question is missing.
    """
    strong_only = strong_score[(strong_right > cheap_right)]
    cheap_only = strong_score[(cheap_right > strong_right)]
    if not len(strong_only) or not len(cheap_only):
        return None
    greater = (strong_only[:, None] > cheap_only[None, :]).mean()
    ties = (strong_only[:, None] == cheap_only[None, :]).mean()
    return float(greater + 0.5 * ties)


def pgr(accuracy: float, cheap: float, strong: float) -> float:
    """Performance gap recovered: 0 at the cheap member's accuracy, 1 at the strong member's."""
    return (accuracy - cheap) / (strong - cheap)


def apgr(curve: Curve, cheap: float, strong: float) -> float | None:
    """Average PGR over the share of strong calls (the area under the PGR curve); None without a gap."""
    if strong <= cheap:
        return None
    values = [pgr(a, cheap, strong) for a in curve.accuracy]
    return float(np.trapezoid(values, curve.share))


def cpt(curve: Curve, cheap: float, strong: float, target: float) -> float | None:
    """The least share of strong calls whose accuracy recovers `target` of the gap; None without a gap."""
    if strong <= cheap:
        return None
    for share, accuracy in zip(curve.share, curve.accuracy, strict=True):
        if pgr(accuracy, cheap, strong) >= target - 1e-12:
            return share
    return 1.0


# Eagle's ratings both ways (runtime/routing/elo.py): the fit of all feedback, and Eagle's online updates.
ELO_FITS: dict[str, Literal["bradley_terry", "online"]] = {
    "elo (Eagle, Bradley-Terry fit)": "bradley_terry",
    "elo (Eagle, online K=32)": "online",
}


def arrival_order(dev: Sequence[QuestionRecord], seed: int) -> list[QuestionRecord]:
    """The dev questions in the order their feedback arrives: shuffled, as a deployment's requests come,
    not sorted by task (online ELO would otherwise be decided by the last task's feedback)."""
    order = np.random.default_rng(seed).permutation(len(dev))
    return [dev[i] for i in order]


def dev_feedback(
    dev: Sequence[QuestionRecord], members: Sequence[str], embed: dict[str, np.ndarray]
) -> list[FeedbackEvent]:
    """Each dev question as feedback, in the given order: a preference for every pair of members (a tie when
    both were right or both wrong)."""
    events: list[FeedbackEvent] = []
    for record in dev:
        embedding = embed[record.key]
        for a, b in itertools.combinations(members, 2):
            ra, rb = record.correct[a], record.correct[b]
            winner, loser = (a, b) if ra >= rb else (b, a)
            events.append(
                FeedbackEvent(
                    len(events) + 1, record.key, embedding, winner=winner, loser=loser, tie=ra == rb
                )
            )
    return events


def score_events(
    dev: Sequence[QuestionRecord], members: Sequence[str], embed: dict[str, np.ndarray]
) -> list[FeedbackEvent]:
    """Each dev question as feedback, in the given order: a score per member (1 right, 0 wrong)."""
    events: list[FeedbackEvent] = []
    for record in dev:
        embedding = embed[record.key]
        for m in members:
            events.append(
                FeedbackEvent(
                    len(events) + 1, record.key, embedding, member=m, score=float(record.correct[m])
                )
            )
    return events


def _picks_accuracy(picks: Sequence[str], test: Sequence[QuestionRecord], costs: CostModel) -> dict[str, Any]:
    right = [r.correct[m] for r, m in zip(test, picks, strict=True)]
    return {
        "accuracy": float(np.mean(right)),
        "mean_cost": float(np.mean([costs.per_token(m) for m in picks])),
        "share": {m: list(picks).count(m) / len(picks) for m in sorted(set(picks))},
    }


def pair_report(
    dev: Sequence[QuestionRecord],
    test: Sequence[QuestionRecord],
    cheap: str,
    strong: str,
    embed: dict[str, np.ndarray],
    embedder: Any,
    embedder_name: str,
    split: Split,
    elo_config: EloConfig,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Curve]]:
    cheap_right = np.array([r.correct[cheap] for r in test], dtype=float)
    strong_right = np.array([r.correct[strong] for r in test], dtype=float)
    acc_cheap, acc_strong = float(cheap_right.mean()), float(strong_right.mean())
    test_embeddings = np.stack([embed[r.key] for r in test])
    model = train(dev, cheap, strong, embedder, embedder_name, split, DEFAULT_SHARPNESS)
    learned_scores = np.array([model.win_probability(e) for e in test_embeddings])
    scores = {"learned (RouteLLM SW ranking)": learned_scores}
    feedback = dev_feedback(arrival_order(dev, seed), [cheap, strong], embed)
    for label, fit in ELO_FITS.items():
        elo = EloRouter([cheap, strong], elo_config.model_copy(update={"fit": fit}))
        elo.observe(feedback)
        scores[label] = np.array([elo.scores(e)[strong] for e in test_embeddings])
    curves = {name: threshold_curve(s, cheap_right, strong_right) for name, s in scores.items()}
    curves["random"] = Curve([0.0, 1.0], [acc_cheap, acc_strong])
    routers = {}
    for name, curve in curves.items():
        routers[name] = {
            "apgr": apgr(curve, acc_cheap, acc_strong),
            "cpt50": cpt(curve, acc_cheap, acc_strong, 0.5),
            "cpt80": cpt(curve, acc_cheap, acc_strong, 0.8),
            "best_accuracy": max(curve.accuracy),
            "disagreement_auc": disagreement_auc(scores[name], cheap_right, strong_right)
            if name in scores
            else 0.5,
            # The cheapest point at least as accurate as the strong member alone (None: none is).
            "strong_accuracy_at_share": next(
                (
                    share
                    for share, accuracy in zip(curve.share, curve.accuracy, strict=True)
                    if accuracy >= acc_strong
                ),
                None,
            ),
        }
    report = {
        "cheap": cheap,
        "strong": strong,
        "dev_questions": len(model.keys),
        "test_questions": len(test),
        "accuracy_cheap": acc_cheap,
        "accuracy_strong": acc_strong,
        # The only questions a router can win or lose on: where exactly one of the two is right.
        "only_strong_right": int((strong_right > cheap_right).sum()),
        "only_cheap_right": int((cheap_right > strong_right).sum()),
        "routers": routers,
    }
    return report, curves


def members_report(
    dev: Sequence[QuestionRecord],
    test: Sequence[QuestionRecord],
    members: Sequence[str],
    embed: dict[str, np.ndarray],
    costs: CostModel,
    elo_config: EloConfig,
    seed: int,
) -> dict[str, Any]:
    test_embeddings = [embed[r.key] for r in test]
    arriving = arrival_order(dev, seed)
    out: dict[str, Any] = {}
    for m in members:
        out[f"member {m}"] = _picks_accuracy([m] * len(test), test, costs)
    out["oracle (some member right)"] = {
        "accuracy": float(np.mean([any(r.correct[m] for m in members) for r in test])),
    }
    rng = np.random.default_rng(seed)
    out["random"] = _picks_accuracy(
        [members[i] for i in rng.integers(0, len(members), len(test))], test, costs
    )
    eagle = EloRouter(members, elo_config)
    out["elo before feedback"] = _picks_accuracy(
        [eagle.choose(eagle.scores(e))[0] for e in test_embeddings], test, costs
    )
    feedback = dev_feedback(arriving, members, embed)
    for label, fit in ELO_FITS.items():
        eagle = EloRouter(members, elo_config.model_copy(update={"fit": fit}))
        eagle.observe(feedback)
        out[f"{label} after dev feedback"] = _picks_accuracy(
            [eagle.choose(eagle.scores(e))[0] for e in test_embeddings], test, costs
        )
    bandit = BanditRouter(members, BanditConfig(exploration=0.0))
    bandit.observe(score_events(arriving, members, embed))
    out["bandit after dev feedback"] = _picks_accuracy(
        [bandit.choose(bandit.scores(e))[0] for e in test_embeddings], test, costs
    )
    return out


def draw(
    path: Path, pair: dict[str, Any] | None, curves: dict[str, Curve], members: dict[str, Any] | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    left, right = axes
    if pair is not None:
        for name, curve in curves.items():
            style = "--" if name == "random" else "-"
            left.plot(curve.share, curve.accuracy, style, label=name)
        left.set_title(f"{pair['cheap']} → {pair['strong']} ({pair['test_questions']} test questions)")
        left.set_xlabel("share of requests sent to the strong member")
        left.set_ylabel("accuracy")
        left.legend()
    else:
        left.text(0.5, 0.5, "no cheap/strong pair with records", ha="center")
    if members is not None:
        for name, row in members.items():
            if "mean_cost" in row:
                marker = "s" if name.startswith("member") else "o"
                right.scatter(row["mean_cost"], row["accuracy"], marker=marker)
                right.annotate(name, (row["mean_cost"], row["accuracy"]), fontsize=8)
        right.set_xlabel("mean cost per token (parameters, billions)")
        right.set_ylabel("accuracy")
        right.set_title("routing over all members (test split)")
    else:
        right.text(0.5, 0.5, "fewer than two members with records", ha="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(
    records: Path,
    out: Path,
    *,
    group: str | None = None,
    members: Sequence[str] | None = None,
    cheap: str | None = None,
    strong: str | None = None,
    embedder_name: str = "minilm",
    test_share: float = 0.5,
    costs: dict[str, float] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    paths = find_predictions(records, group)
    merged = read_predictions(paths, owner_of=member_folder)
    found = sorted({m for r in merged.values() for m in r.correct})
    wanted = list(members) if members else found
    present = [m for m in wanted if m in found]
    report: dict[str, Any] = {
        "records": [str(p) for p in paths],
        "members_with_records": found,
        "members_missing": [m for m in wanted if m not in found],
        "test_share": test_share,
        "embedder": embedder_name,
    }
    split = Split(test_share=test_share)
    embedder = make_embedder(embedder_name)  # type: ignore[arg-type]
    cost_model = CostModel({**DEFAULT_COSTS, **(costs or {})})
    elo_config = EloConfig()

    def embeddings_for(questions: Sequence[QuestionRecord]) -> dict[str, np.ndarray]:
        rows = embedder.embed([q.question for q in questions]) if questions else np.zeros((0, 1))
        return {q.key: row for q, row in zip(questions, rows, strict=True)}

    pair, curves = None, {}
    if cheap and strong and cheap in found and strong in found:
        both = complete_for(merged, [cheap, strong])
        dev, test = split.dev(both), split.test(both)
        if dev and test:
            pair, curves = pair_report(
                dev,
                test,
                cheap,
                strong,
                embeddings_for(both),
                embedder,
                embedder_name,
                split,
                elo_config,
                seed,
            )
    report["pair"] = pair
    multi = None
    if len(present) >= 2:
        every = complete_for(merged, present)
        dev, test = split.dev(every), split.test(every)
        if dev and test:
            multi = members_report(dev, test, present, embeddings_for(every), cost_model, elo_config, seed)
            report["members_questions"] = {"dev": len(dev), "test": len(test)}
    report["members"] = multi
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(report, indent=2) + "\n")
    draw(out / "routing.png", pair, curves, multi)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", required=True, help="folder of <member>/<group>/predictions.jsonl")
    parser.add_argument("--group", help="only this group of records (mc, code, gsm8k_chat)")
    parser.add_argument("--members", help="comma-separated members to route over (default: all with records)")
    parser.add_argument("--cheap", help="the cheap member of the cost–quality curve")
    parser.add_argument("--strong", help="the strong member of the cost–quality curve")
    parser.add_argument("--embedder", choices=["minilm", "hashing"], default="minilm")
    parser.add_argument("--test-share", type=float, default=0.5)
    parser.add_argument("--out", default="docs/routing", help="where routing.json and routing.png go")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = run(
        Path(args.records),
        Path(args.out),
        group=args.group,
        members=args.members.split(",") if args.members else None,
        cheap=args.cheap,
        strong=args.strong,
        embedder_name=args.embedder,
        test_share=args.test_share,
        seed=args.seed,
    )
    print(
        json.dumps(
            {k: report[k] for k in ("members_with_records", "members_missing", "pair", "members")}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
