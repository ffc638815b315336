from __future__ import annotations

import pytest

from batchd.config import Settings
from batchd.durations import parse_duration


@pytest.mark.parametrize(("text", "seconds"), [("24h", 86400), ("90s", 90), ("1h30m", 5400), ("2d", 172800)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "10", "10x", "-5s", "0s", "1h 30m", "5s10"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHD_COMPLETION_WINDOWS", "24h, 1h,90s")
    monkeypatch.setenv("BATCHD_UPSTREAM_URL", "http://up:9/v1/")
    s = Settings()
    assert s.window_seconds == {"24h": 86400, "1h": 3600, "90s": 90}
    assert s.upstream_url == "http://up:9/v1"
    assert s.resolved_database_url.startswith("sqlite+aiosqlite:///")


def test_bad_window_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHD_COMPLETION_WINDOWS", "24h,forever")
    with pytest.raises(ValueError):
        Settings()
