"""Local HTTP servers that speak the Graph (Messenger), Telegram Bot and X API v2 formats."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web


@dataclass
class Recorded:
    """One request a platform server received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        """The body as form fields, or as a JSON object when it was sent as JSON."""
        if self.headers.get("content-type", "").startswith("application/json"):
            return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.json().items()}
        return {k: v[0] for k, v in parse_qs(self.body.decode()).items()}


@dataclass
class Fault:
    """A scripted failure for the next `count` matching requests."""

    kind: str  # "rate_limit" | "server_error" | "permanent"
    count: int
    path_contains: str = ""
    retry_after: int = 7


@dataclass
class PlatformServer:
    """An aiohttp app on a free loopback port that records requests and plays scripted faults."""

    requests: list[Recorded] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def fault_response(self, fault: Fault) -> web.Response:
        raise NotImplementedError

    def fail_next(
        self, count: int, kind: str, *, path_contains: str = "", retry_after: int = 7
    ) -> None:
        """Answer the next `count` requests whose path contains `path_contains` with a failure."""
        self.faults.append(Fault(kind, count, path_contains, retry_after))

    def calls(self, path_contains: str) -> list[Recorded]:
        return [r for r in self.requests if path_contains in r.path]

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Recorded(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
            )
        )
        for fault in self.faults:
            if fault.count > 0 and fault.path_contains in request.path:
                fault.count -= 1
                return self.fault_response(fault)
        return await handler(request)

    async def start(self) -> PlatformServer:
        app = web.Application(middlewares=[self._record])
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@dataclass
class GraphServer(PlatformServer):
    """Graph API Send API (`/{version}/me/messages`, `/{version}/{page_id}/messages`) and a CDN."""

    page_token: str = "page-token"
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)  # /cdn-redirect/{name} -> Location
    streams: dict[str, int] = field(default_factory=dict)  # /cdn-stream/{name} -> size, chunked
    streamed: dict[str, int] = field(default_factory=dict)  # bytes sent before the client left
    permanent_code: int = 100
    _next_mid: int = 1

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/{version}/{node}/messages", self._send)
        app.router.add_get("/cdn/{name}", self._cdn)
        app.router.add_get("/cdn-redirect/{name}", self._cdn_redirect)
        app.router.add_get("/cdn-stream/{name}", self._cdn_stream)

    def _token(self, request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth.removeprefix("Bearer ")
        return request.query.get("access_token", "")

    async def _send(self, request: web.Request) -> web.Response:
        if self._token(request) != self.page_token:
            return self._error(400, 190, "Invalid OAuth access token - Cannot parse access token")
        message = await request.json()
        if not message.get("recipient", {}).get("id") or "message" not in message:
            return self._error(400, 100, "(#100) param recipient must be non-empty.")
        mid = f"m_{self._next_mid:06d}"
        self._next_mid += 1
        return web.json_response({"recipient_id": message["recipient"]["id"], "message_id": mid})

    async def _cdn(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.files:
            return web.Response(status=404)
        data, content_type = self.files[name]
        return web.Response(body=data, content_type=content_type)

    async def _cdn_redirect(self, request: web.Request) -> web.Response:
        return web.Response(
            status=302, headers={"Location": self.redirects[request.match_info["name"]]}
        )

    async def _cdn_stream(self, request: web.Request) -> web.StreamResponse:
        """`streams[name]` bytes without a Content-Length, counting what was sent."""
        name = request.match_info["name"]
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b"\0" * (256 * 1024)
        self.streamed[name] = 0
        try:
            while self.streamed[name] < self.streams[name]:
                await response.write(chunk)
                self.streamed[name] += len(chunk)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading: what was sent so far is the measure
        return response

    @staticmethod
    def _error(
        status: int,
        code: int,
        message: str,
        subcode: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        error: dict[str, Any] = {
            "message": message,
            "type": "OAuthException",
            "code": code,
            "fbtrace_id": "AbCdEfGhIjK",
        }
        if subcode is not None:
            error["error_subcode"] = subcode
        return web.json_response({"error": error}, status=status, headers=headers)

    def fault_response(self, fault: Fault) -> web.Response:
        if fault.kind == "rate_limit":
            # Messenger throttling: code 613 plus the business-use-case usage header that
            # estimates, in minutes, when calls will be accepted again.
            usage = {
                "1234": [
                    {
                        "type": "messenger",
                        "call_count": 100,
                        "total_cputime": 10,
                        "total_time": 10,
                        "estimated_time_to_regain_access": fault.retry_after,
                    }
                ]
            }
            return self._error(
                400,
                613,
                "(#613) Calls to this api have exceeded the rate limit.",
                headers={"X-Business-Use-Case-Usage": json.dumps(usage)},
            )
        if fault.kind == "server_error":
            return self._error(500, 2, "An unexpected error has occurred. Please retry.")
        if self.permanent_code == 190:
            return self._error(400, 190, "Error validating access token: Session has expired", 463)
        return self._error(400, 100, "No matching user found", 2018001)


@dataclass
class TelegramServer(PlatformServer):
    """Bot API: `POST /bot{token}/{method}` and file downloads at `/file/bot{token}/{path}`."""

    token: str = "123456:TEST-token"
    bot_id: int = 123456
    updates: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # file_id -> (path, bytes)
    _next_message_id: int = 1000

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/bot{token}/{method}", self._method)
        app.router.add_get("/file/bot{token}/{path:.+}", self._file)

    @staticmethod
    def _ok(result: Any) -> web.Response:
        return web.json_response({"ok": True, "result": result})

    @staticmethod
    def _fail(status: int, description: str, **parameters: Any) -> web.Response:
        answer: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
        if parameters:
            answer["parameters"] = parameters
        return web.json_response(answer, status=status)

    async def _params(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            return dict(await request.json())
        return dict(await request.post())

    async def _method(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return self._fail(401, "Unauthorized")
        method = request.match_info["method"]
        params = await self._params(request)
        if method == "getMe":
            return self._ok(
                {"id": self.bot_id, "is_bot": True, "first_name": "Loket", "username": "loket_bot"}
            )
        if method == "sendMessage":
            self._next_message_id += 1
            chat_id = int(params["chat_id"])
            return self._ok(
                {
                    "message_id": self._next_message_id,
                    "from": {"id": self.bot_id, "is_bot": True, "first_name": "Loket"},
                    "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "group"},
                    "date": int(time.time()),
                    "text": params.get("text", ""),
                }
            )
        if method == "getUpdates":
            offset = int(params.get("offset") or 0)
            limit = int(params.get("limit") or 100)
            pending = [u for u in self.updates if u["update_id"] >= offset]
            # As the Bot API does, an offset confirms (forgets) every earlier update.
            self.updates = pending
            return self._ok(pending[:limit])
        if method == "getFile":
            file_id = str(params["file_id"])
            if file_id not in self.files:
                return self._fail(400, "Bad Request: invalid file_id")
            path, data = self.files[file_id]
            return self._ok(
                {
                    "file_id": file_id,
                    "file_unique_id": f"u{file_id}",
                    "file_size": len(data),
                    "file_path": path,
                }
            )
        return self._fail(404, "Not Found")

    async def _file(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        wanted = request.match_info["path"]
        for path, data in self.files.values():
            if path == wanted:
                return web.Response(body=data, content_type="application/octet-stream")
        return web.Response(status=404)

    def fault_response(self, fault: Fault) -> web.Response:
        if fault.kind == "rate_limit":
            return self._fail(
                429,
                f"Too Many Requests: retry after {fault.retry_after}",
                retry_after=fault.retry_after,
            )
        if fault.kind == "server_error":
            return self._fail(500, "Internal Server Error")
        return self._fail(403, "Forbidden: bot was blocked by the user")


@dataclass
class XServer(PlatformServer):
    """X API v2: users/me, DM send and lookup, tweets and mentions."""

    user_id: str = "9001"
    username: str = "loket_help"
    dm_events: list[dict[str, Any]] = field(default_factory=list)  # newest first, as the API
    mentions: list[dict[str, Any]] = field(default_factory=list)  # newest first
    page_size: int = 2
    _next_id: int = 1_800_000_000_000_000_000

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/2/users/me", self._me)
        app.router.add_post("/2/dm_conversations/with/{participant}/messages", self._send_dm)
        app.router.add_get("/2/dm_events", self._dm_events)
        app.router.add_post("/2/tweets", self._tweet)
        app.router.add_get("/2/users/{id}/mentions", self._mentions)

    def _new_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    async def _me(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"data": {"id": self.user_id, "name": "Loket Help", "username": self.username}}
        )

    async def _send_dm(self, request: web.Request) -> web.Response:
        participant = request.match_info["participant"]
        low, high = sorted((participant, self.user_id), key=int)
        return web.json_response(
            {"data": {"dm_conversation_id": f"{low}-{high}", "dm_event_id": self._new_id()}},
            status=201,
        )

    async def _tweet(self, request: web.Request) -> web.Response:
        tweet = await request.json()
        return web.json_response(
            {"data": {"id": self._new_id(), "text": tweet.get("text", "")}}, status=201
        )

    def _page(self, items: list[dict[str, Any]], request: web.Request) -> web.Response:
        start = int(request.query.get("pagination_token") or 0)
        limit = min(int(request.query.get("max_results") or self.page_size), self.page_size)
        page = items[start : start + limit]
        meta: dict[str, Any] = {"result_count": len(page)}
        if page:
            meta["newest_id"] = page[0]["id"]
            meta["oldest_id"] = page[-1]["id"]
        if start + limit < len(items):
            meta["next_token"] = str(start + limit)
        answer: dict[str, Any] = {"meta": meta}
        if page:
            answer["data"] = page
        return web.json_response(answer)

    async def _dm_events(self, request: web.Request) -> web.Response:
        return self._page(self.dm_events, request)

    async def _mentions(self, request: web.Request) -> web.Response:
        if request.match_info["id"] != self.user_id:
            return web.json_response(
                {"title": "Not Found Error", "detail": "Could not find user", "status": 404},
                status=404,
            )
        since = int(request.query.get("since_id") or 0)
        return self._page([t for t in self.mentions if int(t["id"]) > since], request)

    def fault_response(self, fault: Fault) -> web.Response:
        if fault.kind == "rate_limit":
            reset = int(time.time()) + fault.retry_after
            return web.json_response(
                {
                    "title": "Too Many Requests",
                    "detail": "Too Many Requests",
                    "type": "about:blank",
                    "status": 429,
                },
                status=429,
                headers={
                    "x-rate-limit-limit": "15",
                    "x-rate-limit-remaining": "0",
                    "x-rate-limit-reset": str(reset),
                },
            )
        if fault.kind == "server_error":
            return web.json_response(
                {"title": "Service Unavailable", "detail": "Service Unavailable", "status": 503},
                status=503,
            )
        return web.json_response(
            {
                "errors": [
                    {
                        "code": 349,
                        "message": "You cannot send messages to this user.",
                    }
                ],
                "title": "Forbidden",
                "detail": "You cannot send messages to this user.",
                "status": 403,
            },
            status=403,
        )
