"""Fixtures for tests and CPU benchmarks that ship with the package so `consort prepare` can build them.

Nothing on the serving path (models.load, the member actors, the Serve deployment)
imports this package: serving only ever reads what it wrote to the model cache.
"""
