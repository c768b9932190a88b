"""The Serve application: one deployment whose replica embeds a coordinator and owns its members.

`build_app(args)` is a Serve application builder, so the same import path
(`consort.deploy.app:build_app`) works for `serve run deploy/serve_config.yaml`,
`serve deploy`, a KubeRay RayService's serveConfigV2 and `consort serve`.

One replica = one ensemble: the deployment declares a placement group of
`[{"CPU": 1}]` (the replica) + one bundle per member, and the replica's
coordinator starts the members in bundles 1..N. Autoscaling therefore adds and
removes whole ensembles. The FastAPI ingress sits on the same deployment, so a
request takes one hop (proxy → replica) before reaching the coordinator.
"""

# No `from __future__ import annotations` here: Serve's class-based view rebuilds the route signatures
# outside this module, where string annotations would not resolve (bodies would become query params).
import asyncio
import logging
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import ActorDiedError, RayActorError

from consort.deploy import errors
from consort.deploy.auth import ApiKeyMiddleware
from consort.deploy.errors import Unavailable
from consort.deploy.feedback import FeedbackRequest, FeedbackResponse, FeedbackService
from consort.deploy.metrics import CONTENT_TYPE, MetricsMirror
from consort.deploy.openai_api import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthResponse,
    ModelList,
    event_stream,
    served_document,
    with_components,
    without_422,
)
from consort.deploy.service import OpenAIService
from consort.deploy.tokenize_api import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    TokenizerService,
)
from consort.runtime import fusion
from consort.runtime.config import EnsembleConfig, default_config, load_config, parse_config
from consort.runtime.errors import ConfigError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = REPO_ROOT / "ensemble.yaml"
DEPLOYMENT_NAME = "ConsortEnsemble"
REPLICA_BUNDLE = {"CPU": 1.0}
HEALTH_TIMEOUT_S = 10.0
HEALTH_RETRY_S = 2.0
PLACEMENT_STRATEGY = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}
OVERFLOW_HEADROOM = 32  # requests a full replica still takes in, to refuse with 429 or to answer probes


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of a Serve config application)."""

    model_config = ConfigDict(extra="forbid")

    config_path: str | None = Field(
        default=None,
        description="Ensemble YAML; relative paths are tried from the working directory, then the repo.",
    )
    config: dict[str, Any] | None = Field(
        default=None, description="The ensemble config inline (as in the YAML)."
    )
    autoscaling_overrides: dict[str, Any] | None = Field(
        default=None,
        description="Extra Ray Serve autoscaling_config fields merged over the ensemble's "
        "(e.g. look_back_period_s, metrics_interval_s for fast-reacting tests).",
    )


def _resolve(path: str) -> Path:
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    # A Serve controller builds the app in a worker whose working directory need not be the repo's.
    return REPO_ROOT / candidate


def resolve_config(args: AppArgs) -> EnsembleConfig:
    if args.config_path and args.config:
        raise ConfigError("give config_path or config, not both")
    if args.config is not None:
        return parse_config(args.config)
    if args.config_path:
        return load_config(_resolve(args.config_path))
    return load_config(DEFAULT_CONFIG_FILE) if DEFAULT_CONFIG_FILE.is_file() else default_config()


# -- the ingress ----------------------------------------------------------------------------------
class ConsortAPI(FastAPI):
    """FastAPI whose document shows the server: the 400 its validation errors become (not FastAPI's
    422), and the chat stream's chunk schema (no route's response model, so FastAPI would omit it)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = with_components(without_422(super().openapi()), ChatCompletionChunk)
        return self.openapi_schema


def _error(description: str, retry: bool = False) -> dict[str, Any]:
    """An error response's documentation: an ErrorResponse body (and Retry-After for 429/503)."""
    doc: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if retry:
        doc["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "required": True,
                "schema": {"type": "integer"},
            }
        }
    return doc


_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _error("No valid API key (only when the server has keys configured)."),
}
_GENERATION_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error(
        "The request is invalid: a field out of range or unsupported; or beyond what JSON Schema can say, "
        "a prompt over a member's context (code context_length_exceeded) or more sequences than the "
        "admission queue holds (prompts × n × vote_samples, code queue_capacity_exceeded)."
    ),
    **_AUTH_ERRORS,
    404: _error("The model id names neither the ensemble nor one of its members."),
    429: _error("The ensemble's admission queue is full.", retry=True),
    503: _error("A member is lost or restarting.", retry=True),
}


def _completion_ok(model: type[BaseModel], chunk: str) -> dict[int | str, dict[str, Any]]:
    """200: the JSON body, or with `stream: true` server-sent events of `chunk` objects ending in [DONE]."""
    return {
        200: {
            "description": f"A {model.__name__}; with stream=true, server-sent events: one `data: <{chunk}>` "
            "line per chunk, an error object in-band if the stream fails after it began, then `data: [DONE]`.",
            "content": {"text/event-stream": {"schema": event_stream(chunk)}},
        },
        **_GENERATION_ERRORS,
    }


# The document is the served one (`/openapi.json` of each replica, narrowed to its ensemble).
api = ConsortAPI(
    title="Consort",
    description="Several language models answering as one, over the OpenAI API.",
    openapi_url=None,
    docs_url=None,
    redoc_url=None,
)
errors.install(api)
api.add_middleware(ApiKeyMiddleware)


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _answer(result: BaseModel | Any) -> Response:
    if isinstance(result, BaseModel):
        return _json(result)
    # No proxy buffering of the event stream (nginx and friends honour this header).
    return StreamingResponse(result, media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class EnsembleServer:
    """A replica: the coordinator, its members (in this replica's placement group) and the OpenAI routes."""

    async def __init__(self, config: dict[str, Any]) -> None:
        from consort.actors.coordinator import Coordinator

        self.config = parse_config(config)
        context = serve.get_replica_context()
        self.mirror = MetricsMirror(replica=context.replica_id.unique_id)
        # Loading members blocks on ray.get; a thread keeps this replica's event loop free meanwhile.
        self.coordinator = await asyncio.to_thread(Coordinator, self.config, in_serve_replica=True)
        self.mirror.mirror(self.coordinator.metrics)
        self.service = OpenAIService(self.coordinator, self.config)
        self.feedback = FeedbackService(self.config)
        self.tokenizers = TokenizerService(self.coordinator, self.config)
        self._document: dict[str, Any] | None = None
        log.info("ensemble %s ready: %s", self.config.name, ", ".join(m.name for m in self.config.members))

    @api.get("/v1/models", response_model=ModelList, responses=_AUTH_ERRORS)
    async def models(self) -> Response:
        return _json(self.service.models())

    @api.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses=_completion_ok(CompletionResponse, "CompletionResponse"),
    )
    async def completions(self, body: CompletionRequest) -> Response:
        return _answer(await self.service.completions(body))

    @api.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=_completion_ok(ChatCompletionResponse, "ChatCompletionChunk"),
    )
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        return _answer(await self.service.chat(body))

    # Not in the OpenAPI document: whether a schema-valid body is accepted depends on the server's state
    # (a request id it routed, a configured store), which the document cannot state, and the document
    # promises that what it admits is served (tests/integration/test_openapi_fuzz.py). README documents it.
    @api.post(
        "/v1/feedback",
        include_in_schema=False,
        response_model=FeedbackResponse,
        responses={
            400: _error("The body is malformed or names an unknown member; nothing was stored."),
            **_AUTH_ERRORS,
            404: _error("No routed request has this id."),
        },
    )
    async def feedback(self, body: FeedbackRequest) -> Response:
        """A preference or a score for a routed request: every replica's router reads it before its next decision."""
        # SQLite blocks for the length of one short write: off the replica's event loop.
        return _json(await asyncio.to_thread(self.feedback.submit, body))

    # vLLM's tokenizer routes, at its paths (outside /v1, so not behind API keys: a tokenizer is no secret).
    # Not in the OpenAPI document, like /v1/feedback: which model ids and token ids are valid depends on the
    # ensemble, and the document promises that what it admits is served; README documents them.
    @api.post("/tokenize", include_in_schema=False, response_model=TokenizeResponse)
    async def tokenize(self, body: TokenizeRequest) -> Response:
        """A prompt or a conversation in the tokens of the model named (the ensemble: its main member)."""
        return _json(await asyncio.to_thread(self.tokenizers.tokenize, body))

    @api.post("/detokenize", include_in_schema=False, response_model=DetokenizeResponse)
    async def detokenize(self, body: DetokenizeRequest) -> Response:
        """The text of token ids of the model named."""
        return _json(self.tokenizers.detokenize(body))

    @api.get("/tokenizer_info", include_in_schema=False, response_model=TokenizerInfo)
    async def tokenizer_info(self, model: str | None = None) -> Response:
        """vLLM's tokenizer description (lm-eval's remote tokenizer reads it); `model` as in /tokenize."""
        return _json(self.tokenizers.info(model))

    # The same routes scoped to one model id. lm-eval's remote tokenizer calls <base>/tokenize and
    # <base>/tokenizer_info with no model in the body, <base> being its completions URL without
    # /v1/completions; under /models/{model}/ those calls speak for that model, so a member with its own
    # vocabulary can be evaluated with tokenized requests and no tokenizer files on the client.
    @api.post("/models/{model}/tokenize", include_in_schema=False, response_model=TokenizeResponse)
    async def model_tokenize(self, model: str, body: TokenizeRequest) -> Response:
        return _json(await asyncio.to_thread(self.tokenizers.tokenize, body, model))

    @api.post("/models/{model}/detokenize", include_in_schema=False, response_model=DetokenizeResponse)
    async def model_detokenize(self, model: str, body: DetokenizeRequest) -> Response:
        return _json(self.tokenizers.detokenize(body, model))

    @api.get("/models/{model}/tokenizer_info", include_in_schema=False, response_model=TokenizerInfo)
    async def model_tokenizer_info(self, model: str) -> Response:
        return _json(self.tokenizers.info(scope=model))

    @api.post("/models/{model}/v1/completions", include_in_schema=False, response_model=CompletionResponse)
    async def model_completions(self, model: str, body: CompletionRequest) -> Response:
        """/v1/completions for the model of the route (the body's model must be the same one)."""
        self.tokenizers.model_id(body.model, model)
        return _answer(await self.service.completions(body))

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Response:
        """This ensemble's OpenAPI document (model ids, strategies, weights and limits included)."""
        if self._document is None:
            self._document = served_document(
                api.openapi(),
                ensemble=self.config.name,
                members=[m.name for m in self.config.members],
                strategies=fusion.names(),
                gated=fusion.gated_names(),
                default_strategy=self.config.strategy,
                vote_kind=self.config.vote.kind,
                max_tokens_limit=self.config.max_tokens_limit,
                max_queue=self.config.max_queue,
                vocab_sizes=self._vocab_sizes(),
            )
        root = request.scope.get("root_path", "").rstrip("/")
        return JSONResponse({**self._document, "servers": [{"url": root or "/"}]})

    def _vocab_sizes(self) -> dict[str, int]:
        """Each model id's vocabulary size: what its token-id prompts may hold (the ensemble: its main member's)."""
        sizes = {m.name: len(self.coordinator.tokenizer(m.name)[0]) for m in self.config.members}
        return {self.config.name: sizes[self.config.main_member], **sizes}

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{api.title} - Swagger UI")

    @api.get(
        "/health",
        response_model=HealthResponse,
        responses={503: _error("The ensemble's members do not answer, or are restarting.", retry=True)},
    )
    async def health(self) -> Response:
        try:
            status = await asyncio.wait_for(self.coordinator.health(), HEALTH_TIMEOUT_S)
        except (RayActorError, TimeoutError) as error:
            raise Unavailable(
                f"the ensemble's members do not answer ({type(error).__name__}); retry shortly"
            ) from error
        if not status["ready"]:
            down = {name: m["state"] for name, m in status["members"].items() if m["state"] != "ALIVE"}
            raise Unavailable(f"members restarting or down: {down or status['recovering']}; retry shortly")
        return JSONResponse(
            {"status": "ok", "ensemble": self.config.name, "strategy": self.config.strategy, **status}
        )

    @api.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text exposition format: this replica's consort_* series."}},
    )
    async def metrics(self) -> Response:
        return Response(self.mirror.render(), media_type=CONTENT_TYPE)

    async def member_actors(self) -> dict[str, Any]:
        """The member actor handles, for operators and tests on the cluster (a Serve handle call, no HTTP route)."""
        return {m.name: self.coordinator.member_actor(m.name) for m in self.config.members}

    async def check_health(self) -> None:
        """Serve's periodic probe: replace this replica only when a member is gone for good.

        A member that Ray is restarting (ActorUnavailableError) is left to the
        coordinator's recovery; one that exhausted its restarts (ActorDiedError)
        cannot come back, so a fresh replica with fresh members must.
        """
        for attempt in range(2):
            try:
                await asyncio.wait_for(self.coordinator.member_stats(), HEALTH_TIMEOUT_S)
                return
            except ActorDiedError as error:
                # A call in flight when a member crashes fails this way even if Ray restarts it: ask again.
                if attempt == 1:
                    raise RuntimeError(
                        f"a member of ensemble {self.config.name!r} died for good: {error}"
                    ) from error
                await asyncio.sleep(HEALTH_RETRY_S)
            except (RayActorError, TimeoutError) as error:
                log.warning("health probe: members busy or restarting (%s)", type(error).__name__)
                return

    def __del__(self) -> None:
        coordinator = getattr(self, "coordinator", None)
        if coordinator is not None and ray.is_initialized():
            coordinator.shutdown()


def deployment_options(
    config: EnsembleConfig, autoscaling_overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The Serve options that make one replica one whole ensemble."""
    from consort.actors.placement import member_bundles

    scaling = config.serving.autoscaling
    autoscaling = {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "initial_replicas": max(scaling.min_replicas, 1),
        "target_ongoing_requests": scaling.target_ongoing_requests,
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
        **(autoscaling_overrides or {}),
    }
    return {
        "placement_group_bundles": [dict(REPLICA_BUNDLE), *member_bundles(config)],
        "placement_group_strategy": PLACEMENT_STRATEGY[config.placement],
        "ray_actor_options": {"num_cpus": REPLICA_BUNDLE["CPU"]},
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": max_ongoing_requests(config),
    }


def max_ongoing_requests(config: EnsembleConfig) -> int:
    """How many requests Serve lets into one replica at once: never fewer than the coordinator can hold.

    Overload must meet the coordinator's bounded queue, which answers 429 with Retry-After at once.
    If Serve's own cap were lower than what the coordinator runs (max_batch) and queues (max_queue),
    the surplus would wait, unbounded and silent, in Serve's queue in front of the replica, and no
    client would ever see a 429. Past that, OVERFLOW_HEADROOM more requests get in to be refused
    quickly, and health probes and /metrics are not stuck behind a full replica.
    """
    return max(config.serving.max_ongoing_requests, config.max_batch + config.max_queue + OVERFLOW_HEADROOM)


def ensemble_app(
    config: EnsembleConfig,
    autoscaling_overrides: dict[str, Any] | None = None,
    ray_actor_options: dict[str, Any] | None = None,
) -> serve.Application:
    """The application for `config` (extra ray_actor_options, e.g. a runtime_env, are merged in)."""
    if not ray.is_initialized():
        # Placement needs the cluster (GPUs or not); `serve run <import path>` builds before it connects.
        from consort.actors.client import connect

        connect(None)
    options = deployment_options(config, autoscaling_overrides)
    options["ray_actor_options"] = {**options["ray_actor_options"], **(ray_actor_options or {})}
    return EnsembleServer.options(**options).bind(config.model_dump(mode="json"))


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder: {"config_path": ...} or {"config": {...}}, default the packaged ensemble."""
    try:
        parsed = AppArgs.model_validate(args or {})
    except ValidationError as error:
        raise ConfigError(f"invalid build_app args: {error}") from error
    return ensemble_app(resolve_config(parsed), parsed.autoscaling_overrides)
