"""Structured outputs on the ensemble's choice: a grammar over the emitted TEXT (bytes), applied to
whatever the ensemble samples from (a fused distribution, a drawn member's, each vote sample's).

`spec` says what the request asks for (JSON object, JSON schema, regex, choice), `engine` keeps the
grammar's state over the emitted bytes (llguidance) and masks a member's vocabulary when none of a
step's candidates fit, `apply` turns a strategy's decision into the constrained one, and `tools`
renders, constrains and parses tool calls. No Ray, no HTTP.
"""

from consort.runtime.constraints.spec import Constraint, ConstraintKind

__all__ = ["Constraint", "ConstraintKind"]
