"""Test support: a real ``batchd serve`` subprocess, and OpenAI's schema as the judge.

Every response the SDK receives in the integration tests passes through ``ContractHook``,
which validates it against ``tests/contract/openai-batch-openapi.json`` (a copy of
``shared/reference/openai-batch-openapi.json``; ``test_contract_copy`` keeps them equal).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
from jsonschema import Draft202012Validator

ROOT = Path(__file__).resolve().parents[1]
SPEC_PATH = ROOT / "tests" / "contract" / "openai-batch-openapi.json"
SPEC = json.loads(SPEC_PATH.read_text())
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def validator(schema_name: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema_name}", "components": SPEC["components"]}
    )


def assert_schema(schema_name: str, instance: Any) -> None:
    errors = sorted(validator(schema_name).iter_errors(instance), key=str)
    assert not errors, f"{schema_name} violates the contract: {errors[0].message} in {instance!r:.500}"


def _operation_schema(method: str, path: str) -> str | None:
    """Name of the 200 response schema of the spec operation matching ``method path``."""
    for template, ops in SPEC["paths"].items():
        pattern = "^/v1" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in ops:
            content = ops[method.lower()]["responses"]["200"]["content"]
            schema = content.get("application/json", {}).get("schema", {})
            ref = schema.get("$ref", "")
            return ref.rsplit("/", 1)[-1] or None
    return None


class ContractHook:
    """An httpx response hook: validate every JSON answer against the spec, and every line
    of every downloaded batch result (``/content``, and the ``/results`` extension) against
    ``BatchRequestOutput``."""

    def __init__(self) -> None:
        self.checked = 0

    def __call__(self, response: Any) -> None:
        response.read()
        assert response.headers.get("x-request-id"), "every response needs x-request-id"
        path = response.request.url.path
        if response.status_code >= 400:
            assert_schema("ErrorResponse", response.json())
        elif path.endswith(("/content", "/results")):
            for line in response.content.splitlines():
                obj = json.loads(line)
                if isinstance(obj, dict) and "response" in obj and "error" in obj:
                    assert_schema("BatchRequestOutput", obj)
        else:
            name = _operation_schema(response.request.method, path)
            if name:
                assert_schema(name, response.json())
        self.checked += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``check`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(interval)


class Server:
    """``batchd serve`` in a subprocess on a free port, with its own data directory."""

    def __init__(
        self, data_dir: Path, upstream_url: str, env: dict[str, str] | None = None, command: str = "serve"
    ):
        self.command = command
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"
        self.env = {
            **os.environ,
            "BATCHD_PORT": str(self.port),
            "BATCHD_DATA_DIR": str(data_dir),
            "BATCHD_UPSTREAM_URL": upstream_url,
            "BATCHD_POLL_INTERVAL": "0.05",
            "BATCHD_CHECKPOINT_INTERVAL": "0.1",
            # Each test server would start a fork server for big files it never gets; the test
            # of that path turns it back on.
            "BATCHD_VALIDATION_PRESTART": "false",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.hook = ContractHook()

    def start(self) -> Server:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        level = "info" if self.command == "worker" else "warning"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchd", self.command, "--log-level", level],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if self.command == "worker":
            wait_until(lambda: self._alive() and "ready" in self.log(), 30, what="batchd worker")
        else:
            wait_until(self._healthy, 30, what="batchd /health")
        return self

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.command} exited {self.proc.returncode}:\n{self.log()}")
        return True

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.base_url[:-3] + "/health", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def client(self, **kw: Any) -> openai.OpenAI:
        http = openai.DefaultHttpxClient(event_hooks={"response": [self.hook]})
        return openai.OpenAI(base_url=self.base_url, api_key="test-key", http_client=http, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def request_line(
    i: int | str, *, url: str = "/v1/chat/completions", model: str = "fake-model", **body: Any
) -> dict[str, Any]:
    if url == "/v1/embeddings":
        payload: dict[str, Any] = {"model": model, "input": f"text {i}"}
    elif url == "/v1/completions":
        payload = {"model": model, "prompt": f"prompt {i}"}
    elif url == "/v1/responses":
        payload = {"model": model, "input": f"input {i}"}
    elif url == "/v1/moderations":
        payload = {"model": model, "input": f"input {i}"}
    else:
        payload = {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}]}
    payload.update(body)
    return {"custom_id": f"req-{i}", "method": "POST", "url": url, "body": payload}


def jsonl(lines: list[Any]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def wait_terminal(client: openai.OpenAI, batch_id: str, timeout: float = 60) -> Any:
    def done() -> Any:
        b = client.batches.retrieve(batch_id)
        return b if b.status in TERMINAL else None

    return wait_until(done, timeout, interval=0.1, what=f"batch {batch_id} to end")


def read_results(client: openai.OpenAI, batch: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out = client.files.content(batch.output_file_id).text.splitlines() if batch.output_file_id else []
    err = client.files.content(batch.error_file_id).text.splitlines() if batch.error_file_id else []
    return [json.loads(x) for x in out], [json.loads(x) for x in err]
