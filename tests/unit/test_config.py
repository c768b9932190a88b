from pathlib import Path

import pytest

from consort.runtime.config import default_config, load_config, members_config, pair_config, parse_config
from consort.runtime.errors import ConfigError

MEMBERS = [{"name": "a", "model": "tiny:smollm2-135m-instruct"}, {"name": "b", "model": "tiny:gemma3-270m"}]


def test_default_config_is_the_chat_pair_of_ensemble_yaml() -> None:
    config = default_config()
    assert [m.model for m in config.members] == ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]
    assert config.main_member == "qwen"
    repository = load_config("ensemble.yaml")
    assert (repository.members, repository.strategy, repository.main_member) == (
        config.members,
        config.strategy,
        config.main_member,
    )


def test_the_small_pair_has_two_vocabularies() -> None:
    config = pair_config()
    assert [m.model for m in config.members] == ["smollm2-135m-instruct", "gemma3-270m"]
    assert config.main_member == "smollm2"


def test_repository_ensemble_yaml_is_valid() -> None:
    assert load_config("ensemble.yaml").strategy == "deepen"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strategy": "median"}, "strategy"),
        ({"main": "c"}, "main 'c' is not a member"),
        ({"members": [{**MEMBERS[0], "weight": 0}, {**MEMBERS[1], "weight": 0}]}, "all member weights are zero"),
        ({"members": [MEMBERS[0], MEMBERS[0]]}, "unique"),
        ({"strategy": "me", "gate": {"threshold": 0.9}}, "gate applies"),
        ({"members": [{**MEMBERS[0], "weight": -1}]}, "weight"),
        ({"placement": "everywhere"}, "placement"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_configs_fail_before_any_model_loads(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"members": MEMBERS, **change})


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_members_config_names_duplicates_uniquely() -> None:
    config = members_config(["tiny:gemma3-270m", "tiny:gemma3-270m"], "mean")
    assert len({m.name for m in config.members}) == 2
    with pytest.raises(ConfigError, match="2 weights"):
        members_config(["a", "b", "c"], "mean", [1.0, 2.0])


_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted(_ROOT.joinpath("examples").glob("*.yaml")))
def test_every_example_ensemble_loads(path: Path) -> None:
    config = load_config(path)
    assert len(config.members) >= 2 and config.main_member in [m.name for m in config.members]


@pytest.mark.parametrize("path", sorted(_ROOT.joinpath("bench", "runs").glob("*configs*/*.yaml")), ids=str)
def test_every_benchmark_config_loads(path: Path) -> None:
    """The hours-long runs read these configs only when they start: a broken one should fail here."""
    config = load_config(path)
    assert config.main_member in [m.name for m in config.members]
