"""Running the app under uvicorn with batchd's signal contract.

The first SIGTERM/SIGINT stops taking requests, lets the worker drain in-flight upstream calls
within ``shutdown_grace``, checkpoints and exits 0. A second signal exits at once: checkpoints
make that safe too, at the price of repeating the calls that were in flight.
"""

from __future__ import annotations

import os
from types import FrameType

import uvicorn

from batchd.api.app import create_app
from batchd.config import Settings


class GracefulServer(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            os._exit(128 + sig)
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after shutdown; a clean drain is a clean exit (status 0).
        self._captured_signals.clear()


def run_server(settings: Settings, log_level: str) -> None:
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace),
    )
    GracefulServer(config).run()
