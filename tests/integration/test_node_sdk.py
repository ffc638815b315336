"""The Batch API lifecycle through the official ``openai`` Node SDK (tests/node/lifecycle.mjs).

The script drives a real ``batchd serve``; it prints one JSON object with every object it
received, and every HTTP exchange it made, and this side checks them against OpenAI's schema.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
from typing import Any

import pytest

from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.support import ROOT, Server, _operation_schema, assert_schema

pytestmark = [pytest.mark.node, pytest.mark.backends("sqlite")]  # the SDK is the point

NODE_DIR = ROOT / "tests" / "node"
SCRIPT = NODE_DIR / "lifecycle.mjs"
ORDER = ["validating", "in_progress", "finalizing", "completed"]


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("the Node SDK test needs `node` and `npm` on PATH")
    return node, npm


def _installed_version() -> str | None:
    pkg = NODE_DIR / "node_modules" / "openai" / "package.json"
    return json.loads(pkg.read_text())["version"] if pkg.exists() else None


def _ensure_node_modules(npm: str) -> None:
    """``npm ci`` when node_modules is missing, or holds another openai than the lock file."""
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    wanted = lock["packages"]["node_modules/openai"]["version"]
    if _installed_version() == wanted:
        return
    proc = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"npm ci failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert _installed_version() == wanted, "npm ci did not install the locked openai"


def _run_lifecycle(node: str, server: Server) -> dict[str, Any]:
    env = {**os.environ, "BATCHD_BASE_URL": server.base_url, "LIFECYCLE_WAIT_MS": "60000"}
    try:
        proc = subprocess.run(
            [node, str(SCRIPT)], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=180
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        raise AssertionError(f"lifecycle.mjs timed out:\n{stderr}\nserver log:\n{server.log()}") from exc
    assert proc.returncode == 0, (
        f"lifecycle.mjs exited {proc.returncode}:\n{proc.stderr}\n{proc.stdout[-2000:]}"
        f"\nserver log:\n{server.log()}"
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {len(lines)}:\n{proc.stdout[:2000]}"
    return dict(json.loads(lines[0]))


def _is_subsequence(seen: list[str], order: list[str]) -> bool:
    it = iter(order)
    return all(status in it for status in seen)


def _check_exchanges_match_the_contract(result: dict[str, Any]) -> None:
    exchanges = result["exchanges"]
    assert len(exchanges) > 20
    for ex in exchanges:
        where = f"{ex['method']} {ex['path']}{ex['query']} -> {ex['status']}"
        assert ex["request_id"], f"no x-request-id on {where}"
        assert ex["status"] < 500 and ex["status"] != 429, f"the SDK had to retry: {where}"
        if ex["status"] >= 400:
            assert ex["json"] is not None, f"error without a JSON body: {where}"
            assert_schema("ErrorResponse", ex["json"])
        elif ex["path"].endswith("/content"):
            assert ex["json"] is None
        else:
            name = _operation_schema(ex["method"], ex["path"])
            assert name, f"no spec operation for {where}"
            assert ex["json"] is not None, f"non-JSON answer for {where}: {ex['content_type']}"
            assert_schema(name, ex["json"])
    assert sorted(ex["status"] for ex in exchanges if ex["status"] >= 400) == [404, 404, 404]


def _check_small_batch_completes_with_4xx_in_error_file(result: dict[str, Any]) -> None:
    lines = result["lines"]
    bad = {x["custom_id"] for x in lines if x["body"].get("fake_status") == 400}
    good = {x["custom_id"] for x in lines} - bad
    assert len(lines) == 10 and len(bad) == 4

    f = result["input_file"]
    for obj in (f, result["input_file_retrieved"]):
        assert_schema("OpenAIFile", obj)
    assert f["object"] == "file" and f["purpose"] == "batch" and f["status"] == "processed"
    assert f["filename"] == "lifecycle.jsonl" and f["id"].startswith("file-")
    assert f["bytes"] == len("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))
    assert result["input_file_retrieved"] == f

    created, done, retrieved = result["created"], result["done"], result["retrieved"]
    for obj in (created, done, retrieved):
        assert_schema("Batch", obj)
    assert created["object"] == "batch" and created["id"].startswith("batch_")
    assert created["status"] == "validating" and created["endpoint"] == "/v1/chat/completions"
    assert created["input_file_id"] == f["id"] and created["completion_window"] == "24h"
    assert created["metadata"] == {"job": "node-sdk", "run": "1"}
    assert created["expires_at"] == created["created_at"] + 86400
    assert created["request_counts"] == {"total": 0, "completed": 0, "failed": 0}

    assert result["statuses_seen"][-1] == "completed"
    assert _is_subsequence(result["statuses_seen"], ORDER), result["statuses_seen"]
    assert done == retrieved
    assert done["status"] == "completed" and done["metadata"] == created["metadata"]
    assert done["request_counts"] == {"total": 10, "completed": 6, "failed": 4}
    assert done["model"] == "fake-model" and done["errors"] is None
    for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
        assert done[stamp] is not None, stamp
    for stamp in ("failed_at", "cancelled_at", "cancelling_at", "expired_at"):
        assert done[stamp] is None, stamp

    out, err = result["output_lines"], result["error_lines"]
    for line in out + err:
        assert_schema("BatchRequestOutput", line)
        assert line["id"].startswith("batch_req_")
    ids = Counter(x["custom_id"] for x in out + err)
    assert set(ids) == good | bad and max(ids.values()) == 1
    assert {x["custom_id"] for x in out} == good and {x["custom_id"] for x in err} == bad
    for o in out:
        assert o["error"] is None and o["response"]["status_code"] == 200
        assert o["response"]["request_id"]
        assert o["response"]["body"]["choices"][0]["message"]["content"]
    for e in err:
        assert e["error"] is None, e
        assert e["response"]["status_code"] == 400
        assert set(e["response"]["body"]["error"]) >= {"message", "type", "code"}

    for key, file_id, nbytes in (
        ("output_file", done["output_file_id"], result["output_bytes"]),
        ("error_file", done["error_file_id"], result["error_bytes"]),
    ):
        obj = result[key]
        assert_schema("OpenAIFile", obj)
        assert obj["id"] == file_id and obj["purpose"] == "batch_output"
        assert obj["status"] == "processed" and obj["bytes"] == nbytes


def _check_cancel_mid_run(result: dict[str, Any]) -> None:
    big, running = result["big_created"], result["big_running"]
    cancelling, cancelled, again = result["cancelling"], result["cancelled"], result["cancel_again"]
    assert_schema("OpenAIFile", result["big_input_file"])
    for obj in (big, running, cancelling, cancelled, again):
        assert_schema("Batch", obj)
    assert running["status"] == "in_progress" and running["request_counts"]["completed"] >= 10
    assert cancelling["status"] in ("cancelling", "cancelled") and cancelling["cancelling_at"] is not None
    assert result["cancel_statuses_seen"][-1] == "cancelled"
    assert set(result["cancel_statuses_seen"]) <= {"cancelling", "cancelled"}
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_at"] is not None
    assert cancelled["cancelling_at"] is not None and cancelled["completed_at"] is None
    assert again["status"] == "cancelled" and again["id"] == big["id"]

    out, err = result["big_output_lines"], result["big_error_lines"]
    for line in out + err:
        assert_schema("BatchRequestOutput", line)
    ids = Counter(x["custom_id"] for x in out + err)
    assert set(ids) == set(result["big_line_ids"]) and max(ids.values()) == 1
    counts = cancelled["request_counts"]
    assert counts["total"] == 200
    assert len(out) == counts["completed"] >= 10 and len(out) < 200
    assert all(o["error"] is None and o["response"]["status_code"] == 200 for o in out)
    assert err and all(e["response"] is None and e["error"]["code"] == "batch_cancelled" for e in err)


def _check_pages(listing: dict[str, Any], schema: str, expected: list[str] | set[str]) -> None:
    pages = listing["pages"]
    for page in [*pages, listing["full"], listing["after_last"]]:
        assert_schema(schema, page)
        assert page["object"] == "list"
    assert len(pages) == len(expected)
    for i, page in enumerate(pages):
        assert len(page["data"]) == 1
        assert page["has_more"] is (i < len(pages) - 1)
        assert page["first_id"] == page["last_id"] == page["data"][0]["id"]
    ids = listing["ids"]
    if isinstance(expected, set):
        assert set(ids) == expected
    else:
        assert ids == expected
    assert listing["auto_ids"] == ids
    assert [x["id"] for x in listing["full"]["data"]] == ids and listing["full"]["has_more"] is False
    created = [x["created_at"] for p in pages for x in p["data"]]
    assert created == sorted(created, reverse=True)
    assert listing["after_last"]["data"] == [] and listing["after_last"]["has_more"] is False


def _check_pagination(result: dict[str, Any]) -> None:
    done, cancelled = result["done"], result["cancelled"]
    file_ids = {
        result["input_file"]["id"],
        done["output_file_id"],
        done["error_file_id"],
        result["big_input_file"]["id"],
        cancelled["output_file_id"],
        cancelled["error_file_id"],
    }
    assert None not in file_ids and len(file_ids) == 6
    _check_pages(result["files_list"], "ListFilesResponse", file_ids)
    ids = result["files_list"]["ids"]
    assert ids[-1] == result["input_file"]["id"]
    assert ids.index(result["big_input_file"]["id"]) < ids.index(done["output_file_id"])
    _check_pages(result["batches_list"], "ListBatchesResponse", [result["big_created"]["id"], done["id"]])


def _check_delete_then_404(result: dict[str, Any]) -> None:
    file_id = result["input_file"]["id"]
    assert_schema("DeleteFileResponse", result["deleted"])
    assert result["deleted"] == {"id": file_id, "object": "file", "deleted": True}
    for key in ("retrieve_deleted", "content_deleted", "retrieve_unknown_batch"):
        info = result[key]
        assert info["is_not_found"] and info["class"] == "NotFoundError" and info["status"] == 404, info
        assert info["request_id"], info
        assert info["type"] == "invalid_request_error", info
        assert_schema("Error", info["error"])
    assert file_id in result["retrieve_deleted"]["message"]
    assert result["retrieve_unknown_batch"]["code"] == "batch_not_found"
    after = result["files_after_delete"]
    assert_schema("ListFilesResponse", after)
    assert file_id not in {x["id"] for x in after["data"]} and len(after["data"]) == 5


def test_node_sdk_lifecycle(make_server: Any, fake_upstream: FakeUpstreamHandle) -> None:
    node, npm = _tools()
    _ensure_node_modules(npm)
    fake_upstream.configure(latency=0.05)  # slow enough for the cancel to catch batch 2 mid-run
    server = make_server(fake_upstream.base_url, batchd_upstream_concurrency="4", batchd_chunk_lines="10")
    result = _run_lifecycle(node, server)
    assert result["sdk_version"].split(".")[0] == "6"
    _check_exchanges_match_the_contract(result)
    _check_small_batch_completes_with_4xx_in_error_file(result)
    _check_cancel_mid_run(result)
    _check_pagination(result)
    _check_delete_then_404(result)
