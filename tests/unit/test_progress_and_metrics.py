"""Pure parts of the extensions: the rate/ETA rule, route templates, lane counters."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from batchd.api.metrics import route_template
from batchd.api.progress import rate_and_eta
from batchd.metrics import LaneMetrics

NOW = 1_000_000.0


def row(**kw: Any) -> dict[str, Any]:
    base = {"status": "in_progress", "in_progress_at": NOW - 600, "paused_at": None}
    return {**base, "total": 1000, "completed": 400, "failed": 0, **kw}


def test_rate_is_over_the_recent_window() -> None:
    assert rate_and_eta(row(), 600, NOW) == (10.0, int(NOW + 60))  # 600 lines in 60 s, 600 left
    assert rate_and_eta(row(in_progress_at=NOW - 20), 100, NOW) == (5.0, int(NOW + 120))
    assert rate_and_eta(row(in_progress_at=NOW), 3, NOW) == (3.0, int(NOW + 200))  # >= 1 s span
    assert rate_and_eta(row(), 0, NOW) == (0.0, None)
    assert rate_and_eta(row(completed=990, failed=10), 50, NOW)[1] == int(NOW)


def test_rate_is_null_unless_running_and_zero_while_paused() -> None:
    assert rate_and_eta(row(paused_at=int(NOW) - 5), 600, NOW) == (0.0, None)
    for status in ("validating", "finalizing", "completed", "expired", "cancelling"):
        assert rate_and_eta(row(status=status), 600, NOW) == (None, None)


def test_route_template_puts_parameters_back() -> None:
    scope = {
        "path": "/v1/batches/batch_1/results",
        "route": object(),
        "path_params": {"batch_id": "batch_1"},
    }
    assert route_template(scope) == "/v1/batches/{batch_id}/results"
    assert route_template({"path": "/v1/files", "route": object(), "path_params": {}}) == "/v1/files"
    assert route_template({"path": "/wp-admin/x.php"}) == "<unmatched>"


def test_lane_metrics_count_by_status() -> None:
    lane = LaneMetrics("unit-up", "unit-model")

    def got(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"upstream": "unit-up", "model": "unit-model", **labels}) or 0

    for status, timed_out in ((200, False), (200, False), (429, False), (None, True), (None, False)):
        lane.attempt(status, timed_out)
    lane.retry("429")
    assert got("batchd_upstream_requests_total", status="200") == 2
    assert got("batchd_upstream_requests_total", status="timeout") == 1
    assert got("batchd_upstream_requests_total", status="error") == 1
    assert got("batchd_upstream_rate_limited_total") == 1
    assert got("batchd_upstream_retries_total", reason="429") == 1
