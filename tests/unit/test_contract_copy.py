"""The tests judge responses by tests/contract/openai-batch-openapi.json, a copy of the
project's reference (shared/reference/ beside the checkout). The copy must not drift."""

from __future__ import annotations

import pytest

from tests.support import ROOT, SPEC_PATH


def test_contract_copy_matches_the_shared_reference() -> None:
    shared = ROOT.parent / "shared" / "reference" / "openai-batch-openapi.json"
    if not shared.exists():
        pytest.skip("no shared/ beside this checkout (a plain clone); CI has it")
    assert SPEC_PATH.read_bytes() == shared.read_bytes()
