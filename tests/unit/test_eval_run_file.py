"""A restarted evaluation continues its run only if nothing that changes answers has changed."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest

from consort.runtime.config import parse_config
from consort.runtime.evaluation.errors import ResultsError
from consort.runtime.evaluation.job import _fingerprint, check_run_file, same_run

ARGS = argparse.Namespace(seed=0, mc_vote="loglik", calibrate=False, split="eval")


def fingerprint(split: str = "eval", **member: object) -> dict:
    config = parse_config({"members": [{"name": "a", "model": "tiny:smollm2-135m-instruct", **member}]})
    return _fingerprint(config, argparse.Namespace(**{**vars(ARGS), "split": split}))


def test_the_same_configuration_is_the_same_run() -> None:
    assert same_run(fingerprint(), fingerprint())
    assert not same_run(None, fingerprint())


def test_a_field_added_since_the_run_started_at_its_default_is_the_same_run() -> None:
    older = copy.deepcopy(fingerprint())
    del older["config"]["members"][0]["threads"]  # as a release without the field wrote it
    del older["config"]["top_k"]
    assert older != fingerprint()
    assert same_run(older, fingerprint())


def test_a_field_added_since_then_but_set_otherwise_is_another_run() -> None:
    older = copy.deepcopy(fingerprint())
    del older["config"]["members"][0]["threads"]
    assert not same_run(older, fingerprint(threads=2))


def test_any_other_difference_is_another_run() -> None:
    assert not same_run(fingerprint(), fingerprint(threads=2))
    assert not same_run({**fingerprint(), "seed": 1}, fingerprint())
    broken = copy.deepcopy(fingerprint())
    broken["config"]["members"][0]["no_such_field"] = 1
    assert not same_run(broken, fingerprint())
    assert not same_run({"config": "not a config"}, fingerprint())


def test_the_run_file_refuses_another_configuration(tmp_path: Path) -> None:
    check_run_file(tmp_path, fingerprint())
    check_run_file(tmp_path, fingerprint())
    stored = json.loads((tmp_path / "run.json").read_text())
    del stored["fingerprint"]["config"]["top_k"]
    (tmp_path / "run.json").write_text(json.dumps(stored))
    check_run_file(tmp_path, fingerprint())
    with pytest.raises(ResultsError, match="different configuration"):
        check_run_file(tmp_path, fingerprint(threads=3))


def test_a_run_from_before_the_split_option_answered_the_eval_split(tmp_path: Path) -> None:
    older = copy.deepcopy(fingerprint())
    del older["split"]
    assert same_run(older, fingerprint())
    assert not same_run(older, fingerprint(split="dev"))
    check_run_file(tmp_path, fingerprint(split="dev"))
    with pytest.raises(ResultsError, match="different configuration"):
        check_run_file(tmp_path, fingerprint())  # dev answers never mix with a test slice's
