"""A small OpenAI-compatible HTTP server on 127.0.0.1 for fault injection (tests only).

It answers ``GET /v1/models`` and ``POST /v1/chat/completions`` like vLLM does, with a
caption made from the image it was sent, and can be told, per image (by the SHA-1 of the
image bytes it receives), to answer the next requests with a fault instead:

    srv = FakeOpenAI().start()
    srv.script(digest, "malformed", "ok")          # first a 200 that is not JSON, then a caption
    srv.script(digest, ("status", 429, "1"))       # a 429 with Retry-After: 1
    srv.down = True                                # every request: connection closed, no reply

It records every request (image digest, time, what it answered). Its loop is bounded
(``max_requests``) and it listens on 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WORDS = (
    "red green blue yellow square circle triangle large small bright dark striped dotted wooden metal glass "
    "river mountain forest window door table chair lamp shadow light corner edge center pattern texture"
).split()


def digest(image: bytes) -> str:
    return hashlib.sha1(image).hexdigest()


def caption_for(d: str, n_words: int = 24) -> str:
    """A deterministic, well-formed caption that differs between images (passes the default filters)."""
    h = bytes.fromhex(d) * 4
    return "The picture shows " + " ".join(WORDS[b % len(WORDS)] for b in h[:n_words]) + "."


class FakeOpenAI:
    def __init__(
        self,
        *,
        model: str = "fake-vlm",
        api_key: str | None = None,
        delay: float = 0.0,
        text_fn: Callable[[str], str] | None = None,
        max_requests: int = 100_000,
    ):
        self.model = model
        self.api_key = api_key  # when set, requests without "Authorization: Bearer <key>" get 401
        self.delay = delay  # seconds each chat request takes (a slow server)
        self.text_fn = text_fn or caption_for
        self.max_requests = max_requests
        self.down = False
        #: when set to an Event, chat requests wait (at most 120 s) until it is set: a stuck server
        self.hold: threading.Event | None = None
        self.log: list[dict[str, Any]] = []
        self.auth_seen: list[str] = []
        self._scripts: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.httpd: ThreadingHTTPServer | None = None

    # ---- control -----------------------------------------------------------------------
    def script(self, image_digest: str, *faults: Any) -> None:
        """Queue what the next requests for this image get: 'ok', 'malformed', 'no_choices',
        'empty_choices', 'drop' (close without reply), or ('status', code, retry_after or None)."""
        with self._lock:
            self._scripts[image_digest].extend(faults)

    def requests_for(self, image_digest: str) -> list[dict[str, Any]]:
        return [r for r in self.log if r["digest"] == image_digest]

    def counts(self) -> Counter:
        return Counter(r["digest"] for r in self.log if r["answer"] == "ok")

    @property
    def base_url(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> FakeOpenAI:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.httpd.timeout = 0.1
        self._thread = threading.Thread(target=self._serve, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self.httpd is not None
        for _ in range(self.max_requests * 50):  # bounded: at most this many accept timeouts + requests
            if self._stop.is_set() or len(self.log) >= self.max_requests:
                break
            self.httpd.handle_request()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.httpd is not None:
            self.httpd.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- answers -----------------------------------------------------------------------
    def next_answer(self, d: str) -> Any:
        with self._lock:
            q = self._scripts.get(d)
            return q.popleft() if q else "ok"


def _handler(srv: FakeOpenAI):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self) -> bool:
            got = self.headers.get("Authorization", "")
            srv.auth_seen.append(got)
            if srv.api_key is not None and got != f"Bearer {srv.api_key}":
                self._send(401, json.dumps({"error": {"message": "invalid api key"}}).encode())
                return False
            return True

        def do_GET(self) -> None:
            if srv.down:
                self.close_connection = True
                return
            if not self._authorised():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, json.dumps({"object": "list", "data": [{"id": srv.model, "object": "model"}]}).encode())
            elif self.path == "/health":
                self._send(200, b"{}")
            else:
                self._send(404, b'{"error": "not found"}')

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            if srv.down:
                self.close_connection = True
                return
            if not self._authorised():
                return
            try:
                body = json.loads(raw)
                url = next(
                    p["image_url"]["url"]
                    for m in body["messages"]
                    if isinstance(m.get("content"), list)
                    for p in m["content"]
                    if p.get("type") == "image_url"
                )
                d = digest(base64.b64decode(url.split(",", 1)[1]))
            except (ValueError, KeyError, StopIteration, TypeError):
                self._send(400, b'{"error": "bad request"}')
                return
            answer = srv.next_answer(d)
            srv.log.append(
                {
                    "digest": d,
                    "t": time.time(),
                    "answer": answer if isinstance(answer, str) else list(answer),
                    "body": {k: v for k, v in body.items() if k != "messages"},
                }
            )
            if srv.delay:
                time.sleep(srv.delay)
            if srv.hold is not None:
                srv.hold.wait(timeout=120)
            if answer == "drop":
                self.close_connection = True
                return
            if answer == "malformed":
                self._send(200, b'{"id": "cmpl-1", "choices": [{"message": {"content": "trunc')
            elif answer == "no_choices":
                self._send(200, json.dumps({"id": "cmpl-1", "object": "chat.completion", "usage": {}}).encode())
            elif answer == "empty_choices":
                self._send(200, json.dumps({"id": "cmpl-1", "object": "chat.completion", "choices": []}).encode())
            elif isinstance(answer, (tuple, list)) and answer[0] == "status":
                _, code, retry_after = answer
                self._send(
                    code,
                    json.dumps({"error": {"message": f"fault {code}"}}).encode(),
                    {"Retry-After": str(retry_after)} if retry_after is not None else None,
                )
            else:
                text = srv.text_fn(d)
                self._send(
                    200,
                    json.dumps(
                        {
                            "id": "cmpl-1",
                            "object": "chat.completion",
                            "model": srv.model,
                            "choices": [
                                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                            ],
                            "usage": {"prompt_tokens": 20, "completion_tokens": len(text.split())},
                        }
                    ).encode(),
                )

    return Handler
