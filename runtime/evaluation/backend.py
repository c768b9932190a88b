"""Where an evaluation runs, as the question logic sees it: the `Backend` protocol, and `LocalBackend`.

`LocalBackend` is one ensemble in this process (`--local`); the Ray job's
replicas (`consort.deploy.jobs.eval.RayBackend`) expose the same calls, so the
question runners (`evaluation.questions`) and calibration do not know which one
they talk to:

* `member_logliks`: a member alone, by the fast echo path (two member steps per batch);
* `ensemble_logliks`: teacher-forced scoring under the ensemble, several option sets at once;
* `generate`: complete prompts (members alone, token-level strategies, votes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from consort.runtime.config import EnsembleConfig
from consort.runtime.evaluation import batches, logliks
from consort.runtime.evaluation.batches import GenerationRequest
from consort.runtime.evaluation.logliks import Loglik, LoglikRequest
from consort.runtime.loop import EnsembleLoop
from consort.runtime.types import Completion, RequestOptions
from consort.runtime.vocab import TokenTable


class Backend(Protocol):
    """One ensemble replica, as the evaluation sees it."""

    config: EnsembleConfig

    @property
    def tables(self) -> dict[str, TokenTable]:
        """Each member's vocabulary (text-level scoring cuts the text where any member's tokens end)."""
        ...

    async def member_logliks(
        self,
        member: str,
        requests: Sequence[LoglikRequest],
        prefixes: Sequence[list[tuple[int, bytes]]] | None = None,
    ) -> list[Loglik]: ...

    async def ensemble_logliks(
        self, requests: Sequence[LoglikRequest], options: Sequence[RequestOptions]
    ) -> list[list[Loglik]]: ...

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]: ...

    def close(self) -> None: ...


class LocalBackend:
    """The ensemble in this process: the core is stepped directly, so its batches are this job's batches."""

    # Generation requests with `chat` are rendered per member (GenerationRequest.as_prompt); a
    # backend without this flag would send them as raw text, so the job refuses chat tasks on it.
    chat_prompts = True

    def __init__(self, loop: EnsembleLoop) -> None:
        self.loop = loop
        self.core = loop.core
        self.config = loop.config

    @classmethod
    def start(cls, config: EnsembleConfig) -> LocalBackend:
        return cls(EnsembleLoop.from_config(config))

    @property
    def tables(self) -> dict[str, TokenTable]:
        return dict(self.core.ctx.tables)

    async def member_logliks(
        self,
        member: str,
        requests: Sequence[LoglikRequest],
        prefixes: Sequence[list[tuple[int, bytes]]] | None = None,
    ) -> list[Loglik]:
        return await logliks.member_logliks(
            self.core.executor,
            self.core.members[member],
            requests,
            max_batch=self.config.max_batch,
            prefixes=prefixes,
        )

    async def ensemble_logliks(
        self, requests: Sequence[LoglikRequest], options: Sequence[RequestOptions]
    ) -> list[list[Loglik]]:
        return await logliks.ensemble_logliks(self.core, requests, options)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        return await batches.generate(self.core, requests)

    def close(self) -> None:
        """Nothing to release: the models go with the process."""
