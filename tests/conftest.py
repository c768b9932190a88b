"""Hypothesis runs derandomized by default so CI is reproducible; explore locally with
HYPOTHESIS_PROFILE=explore (random examples, more of them)."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
