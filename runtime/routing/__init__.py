"""Routing before inference: routers (query -> score per member), their durable store, and the `route`
strategy. Pure Python and numpy: no Ray, no HTTP (the layering rule of runtime/)."""

from consort.runtime.routing.base import Router
from consort.runtime.routing.config import RouteConfig
from consort.runtime.routing.cost import CostModel
from consort.runtime.routing.store import FeedbackEvent, RoutingStore

__all__ = ["CostModel", "FeedbackEvent", "RouteConfig", "Router", "RoutingStore"]
