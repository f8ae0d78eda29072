"""The web app (Starlette): the page and a small JSON API over the judgement store.

``GET /`` the page; ``GET /app.js``, ``/app.css`` its script and style; ``GET /api/item
?annotator=NAME`` the annotator's next item (or ``waiting`` while it is sampled, ``done`` at
the end) with their progress; ``POST /api/rank {annotator, item, ranks, note}``,
``POST /api/skip {annotator, item, note}``, ``POST /api/undo {annotator}``; ``GET /api/health``.
Each POST answers only after its row is on disk (fsync).

Security: served on 127.0.0.1 by default, where only ``Host: 127.0.0.1`` / ``localhost`` is
accepted (a web page elsewhere cannot reach the app through DNS rebinding). With a ``token``
every request but the static script and style must carry it (``?token=`` or the
``X-Trustrl-Token`` header); the command line requires one whenever the app is bound to any
other address. Every response carries a Content Security Policy that allows only the app's
own script and style: no inline script, no event handler attributes, no other origin.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from trustrl.label.candidates import prompt_as_text
from trustrl.label.page import CSS, HTML, JS
from trustrl.label.store import JudgementStore

__all__ = ["create_app", "LOOPBACK_HOSTS"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_app(store: JudgementStore, candidates: Any, *, token: str | None = None, loopback: bool = True) -> Starlette:
    """The app over ``store`` and ``candidates`` (:class:`~trustrl.label.candidates.FileCandidates`
    or :class:`~trustrl.label.candidates.SampledCandidates`)."""
    item_ids: list[str] = list(candidates.item_ids)
    index_of = {item: i for i, item in enumerate(item_ids)}

    def check_token(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("x-trustrl-token") or request.query_params.get("token") or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise _Refused(401, "a valid token is required (open the URL printed by `trustrl label`)")

    def who(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _Refused(400, "an annotator name is required")
        if len(value) > 100:
            raise _Refused(400, "annotator names are at most 100 characters")
        return value.strip()

    def ready_item(item_id: Any):
        if item_id not in index_of:
            raise _Refused(404, f"no item {item_id!r}")
        item = candidates.get(index_of[item_id])
        if item.responses is None:
            raise _Refused(409, f"item {item_id!r} is not sampled yet")
        return item

    def endpoint(fn):
        async def run(request: Request) -> Response:
            try:
                check_token(request)
                body = await request.json() if request.method == "POST" else None
                if request.method == "POST" and not isinstance(body, dict):
                    raise _Refused(400, "expected a JSON object")
                result = await run_in_threadpool(fn, request, body)
                return JSONResponse(result, headers=SECURITY_HEADERS)
            except _Refused as err:
                return JSONResponse({"error": str(err)}, status_code=err.status, headers=SECURITY_HEADERS)
            except ValueError as err:  # bad JSON, bad ranks: the message names the problem
                return JSONResponse({"error": str(err)}, status_code=400, headers=SECURITY_HEADERS)
        return run

    def next_item(request: Request, body: Any) -> dict[str, Any]:
        annotator = who(request.query_params.get("annotator"))
        progress = store.progress(annotator, item_ids)
        index = store.next_item(annotator, item_ids)
        if index is None:
            return {"done": True, "progress": progress}
        item = candidates.get(index)
        if item.responses is None:
            return {"waiting": True, "index": index, "progress": progress}
        return {"index": index, "progress": progress,
                "item": {"id": item.id, "prompt": prompt_as_text(item.prompt), "responses": item.responses}}

    def rank(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        annotator = who(body.get("annotator"))
        item = ready_item(body.get("item"))
        note = body.get("note") or ""
        if not isinstance(note, str):
            raise _Refused(400, "note must be text")
        row = store.rank(item.id, annotator, item.prompt, item.responses, body.get("ranks"), note)
        return {"saved": row["id"]}

    def skip(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        annotator = who(body.get("annotator"))
        item = ready_item(body.get("item"))
        row = store.skip(item.id, annotator, str(body.get("note") or ""))
        return {"saved": row["id"]}

    def undo(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        row = store.undo(who(body.get("annotator")))
        if row is None:
            return {"undone": None}
        return {"undone": {"item": str(row["item"]), "action": row.get("action", "rank"),
                           "ranks": row.get("ranks"), "note": row.get("note", "")}}

    def health(request: Request, body: Any) -> dict[str, Any]:
        return {"ok": True, "items": len(item_ids)}

    async def page(request: Request) -> Response:
        try:
            check_token(request)
        except _Refused as err:
            return HTMLResponse(f"<!doctype html><p>{err.status}: a valid token is required.</p>", status_code=err.status,
                                headers=SECURITY_HEADERS)
        return HTMLResponse(HTML, headers=SECURITY_HEADERS)

    async def script(request: Request) -> Response:
        return Response(JS, media_type="text/javascript; charset=utf-8", headers=SECURITY_HEADERS)

    async def style(request: Request) -> Response:
        return Response(CSS, media_type="text/css; charset=utf-8", headers=SECURITY_HEADERS)

    routes = [
        Route("/", page), Route("/app.js", script), Route("/app.css", style),
        Route("/api/item", endpoint(next_item)), Route("/api/health", endpoint(health)),
        Route("/api/rank", endpoint(rank), methods=["POST"]), Route("/api/skip", endpoint(skip), methods=["POST"]),
        Route("/api/undo", endpoint(undo), methods=["POST"]),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS))] if loopback else []
    return Starlette(routes=routes, middleware=middleware)
