"""Consort's runtime: everything that computes, in one process, with no Ray."""
