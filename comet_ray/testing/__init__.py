"""Helpers for tests and benchmarks (a local S3-compatible server); not used by runs themselves."""
