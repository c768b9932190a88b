"""Issue 15 item 0: the text-level scoring of `mean`/`deepen` on the issue's hand cases, real members.

Prints each continuation's log-likelihood per member alone and per strategy, before the fix's
semantics can be compared by rerunning at an older commit. Run: `python -m bench.text_scoring`.
"""

from __future__ import annotations

import asyncio
import json

from consort.runtime.config import EnsembleConfig, MemberConfig
from consort.runtime.evaluation.batches import member_alone
from consort.runtime.evaluation.logliks import LoglikRequest, ensemble_logliks
from consort.runtime.loop import EnsembleLoop
from consort.runtime.types import RequestOptions

QUESTION = "Question: Which appliance keeps food cold?\nAnswer:"
CASES = [
    LoglikRequest("The answer is in the following list", ":"),
    LoglikRequest("Note", ": the meeting starts at noon."),
    LoglikRequest(QUESTION, " refrigerator"),
    LoglikRequest(QUESTION, " television"),
    LoglikRequest(QUESTION, " airplane"),
]


def main() -> None:
    config = EnsembleConfig(
        members=[MemberConfig(name="smollm2", model="smollm2-135m-instruct"), MemberConfig(name="gemma3", model="gemma3-270m")],
        strategy="mean",
        main="smollm2",
    )
    loop = EnsembleLoop.from_config(config)
    names = loop.core.ctx.names
    options = {
        "smollm2 alone": member_alone(names, "smollm2"),
        "gemma3 alone": member_alone(names, "gemma3"),
        "mean": RequestOptions(strategy="mean"),
        "deepen": RequestOptions(strategy="deepen"),
    }
    scored = asyncio.run(ensemble_logliks(loop.core, CASES, list(options.values())))
    rows = []
    for label, per_request in zip(options, scored, strict=True):
        for request, loglik in zip(CASES, per_request, strict=True):
            rows.append({"scorer": label, "continuation": request.continuation, "logprob": round(loglik.logprob, 4),
                         "pieces": loglik.tokens})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
