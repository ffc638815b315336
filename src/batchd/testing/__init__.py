"""Test and benchmark helpers for batchd (not used by the server at runtime)."""

from batchd.testing.fake_upstream import (
    FAKE_PREFIX,
    FakeUpstream,
    FakeUpstreamHandle,
    body_digest,
    estimate_tokens,
    expected_content,
    fake_embedding,
    run_fake_upstream,
)

__all__ = [
    "FAKE_PREFIX",
    "FakeUpstream",
    "FakeUpstreamHandle",
    "body_digest",
    "estimate_tokens",
    "expected_content",
    "fake_embedding",
    "run_fake_upstream",
]
