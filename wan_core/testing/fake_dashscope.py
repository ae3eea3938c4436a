"""A stand-in for DashScope's HTTP API on 127.0.0.1, and a catch-all log recorder.

`FakeDashScope` records every request (path, headers, JSON body) and answers with scripted
replies: good answers, errors, malformed bodies, slow answers. Point the SDK at it with
DASH_API_URL=`server.url`, as users of the international service point it at theirs.

`all_log_output()` records every log line any logger emits, at DEBUG, with tracebacks, for
checks that a secret never reaches a log.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, Union

TEXT_PATH = "/api/v1/services/aigc/text-generation/generation"
IMAGE_PATH = "/api/v1/services/aigc/multimodal-generation/generation"


@dataclass
class Reply:
    status: int = 200
    body: Union[dict, bytes, None] = None  # dict → JSON; bytes → sent as they are
    headers: dict = field(default_factory=dict)  # Content-Type is application/json unless set
    delay_s: float = 0.0                   # wait this long before answering


def answer(content: Union[str, list]) -> Reply:
    """A successful reply in DashScope's "message" result format with `content` as the text
    (a string for text models, a list of {"text": …} parts for multimodal ones)."""
    return Reply(body={"request_id": "req-1", "usage": {"input_tokens": 1, "output_tokens": 1},
                       "output": {"choices": [{"finish_reason": "stop", "message": {
                           "role": "assistant", "content": content}}]}})


@dataclass
class Request:
    path: str
    headers: dict
    body: Union[dict, bytes]  # parsed JSON, or the raw bytes when it was not JSON


class FakeDashScope:
    """Scripted replies in order (HTTP 500 "NoScript" once they run out); every request is kept.

    Use as a context manager, or call `close()`.
    """

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/api/v1"

    def script(self, *replies: Reply) -> None:
        """Forget earlier requests and answer the next ones with `replies`."""
        with self._lock:
            self.replies = list(replies)
            self.requests = []

    def _next(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
            return self.replies.pop(0) if self.replies else Reply(500, {"code": "NoScript"})

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                reply = fake._next(Request(self.path, dict(self.headers), body))
                time.sleep(reply.delay_s)
                data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    headers = {"Content-Type": "application/json", **reply.headers,
                               "Content-Length": str(len(data))}
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped waiting (a timeout)

            def log_message(self, *args):
                pass  # the server's access log is not the client's logging under test

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeDashScope":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Collector(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(logging.DEBUG)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))  # the message, its arguments and any traceback


@contextmanager
def all_log_output() -> Iterator[list[str]]:
    """Every logger set to DEBUG for the duration, every record appended (formatted, with its
    traceback) to the yielded list; Python warnings are routed into logging too.

    Loggers that do not propagate (and so never reach the root) get the collector themselves.
    Levels, handlers and `logging.disable` are restored afterwards.
    """
    lines: list[str] = []
    collector = _Collector(lines)
    manager = logging.root.manager
    loggers = [logging.root] + [lg for lg in list(manager.loggerDict.values())
                                if isinstance(lg, logging.Logger)]
    saved = [(lg, lg.level, lg.disabled) for lg in loggers]
    disabled_below = manager.disable
    holders = [logging.root] + [lg for lg in loggers[1:] if not lg.propagate]
    warnings_were_captured = logging._warnings_showwarning is not None
    logging.disable(logging.NOTSET)
    logging.captureWarnings(True)
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
    for lg in holders:
        lg.addHandler(collector)
    try:
        yield lines
    finally:
        for lg in holders:
            lg.removeHandler(collector)
        for lg, level, disabled in saved:
            lg.setLevel(level)
            lg.disabled = disabled
        logging.captureWarnings(warnings_were_captured)
        logging.disable(disabled_below)
