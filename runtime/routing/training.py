"""`consort route train`: fit the learned router on the dev questions of `consort eval` records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from consort.runtime.errors import ConfigError
from consort.runtime.routing.config import EmbedderKind
from consort.runtime.routing.embed import make_embedder
from consort.runtime.routing.learned import DEFAULT_SHARPNESS, train
from consort.runtime.routing.records import (
    Split,
    complete_for,
    find_predictions,
    member_folder,
    read_predictions,
)


def train_from_records(
    records_root: Path,
    cheap: str,
    strong: str,
    out: Path,
    *,
    group: str | None = None,
    embedder: EmbedderKind = "minilm",
    test_share: float = 0.5,
    sharpness: float = DEFAULT_SHARPNESS,
) -> dict[str, Any]:
    """Train on the dev split of every question both members answered; returns a summary."""
    paths = find_predictions(records_root, group)
    if not paths:
        raise ConfigError(f"no predictions.jsonl under {records_root}/<member>/{group or '<group>'}/")
    both = complete_for(read_predictions(paths, owner_of=member_folder), [cheap, strong])
    if not both:
        raise ConfigError(f"no question in {records_root} has answers from both {cheap!r} and {strong!r}")
    split = Split(test_share=test_share)
    dev = split.dev(both)
    model = train(dev, cheap, strong, make_embedder(embedder), embedder, split, sharpness)
    model.save(out)
    return {
        "path": str(out),
        "cheap": cheap,
        "strong": strong,
        "embedder": embedder,
        "dev_questions": len(model.keys),
        "test_questions_held_out": len(both) - len(dev),
        "strong_only_right": int((model.outcomes == 1.0).sum()),
        "cheap_only_right": int((model.outcomes == 0.0).sum()),
        "ties": int((model.outcomes == 0.5).sum()),
    }
