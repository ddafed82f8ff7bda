"""The admin view: server-rendered pages (Jinja2, no JavaScript) over the node's database.

Pages: runs (filters: state, outcome, accession, study UID, id prefix), one
run (stage timeline, series selection with reasons, QC, notes used, model,
deliveries with their attempts), the association log, dead letters (replay:
POST, admin only) and the configuration page: the readiness checks, the last
C-ECHO of each destination and the effective configuration with secrets masked.

Without ``http.admin_token`` every page is read-only and shows no patient ID.
With one, an administrator logs in with it (a cookie holding an HMAC of the
token, ``HttpOnly; SameSite=Strict``) or sends ``Authorization: Bearer
<token>``; then patient IDs are shown and dead letters can be replayed (the form
carries a CSRF value derived from the token).  The database holds no patient
names, so none is ever shown.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from core.errors import NodeError
from dicom_node.db.models import RunState
from dicom_node.ops import queries
from dicom_node.outbox.delivery import retry_deliveries

if TYPE_CHECKING:
    from dicom_node.ops.context import OpsContext
    from dicom_node.settings import Settings

TEMPLATES = Path(__file__).resolve().parent / "templates"
COOKIE = "dicom_node_admin"
SECRET_KEYS = {("http", "admin_token")}
URL_KEYS = {("database", "url"), ("database", "effective_url"), ("notes", "url"), ("processing", "broker_url")}


def _mac(token: str, purpose: str) -> str:
    return hmac.new(token.encode(), f"dicom-node admin {purpose}".encode(), hashlib.sha256).hexdigest()


def is_admin(request: Request, token: str) -> bool:
    """True when *request* carries the admin token (bearer header or the login cookie)."""
    if not token:
        return False
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer ") and hmac.compare_digest(header[7:].strip(), token):
        return True
    return hmac.compare_digest(request.cookies.get(COOKIE, ""), _mac(token, "session"))


def effective_config(settings: Settings) -> list[tuple[str, str]]:
    """Every setting as (dotted key, value), secrets masked."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: tuple[str, ...], value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk((*prefix, str(key)), child)
            return
        if prefix[:2] in SECRET_KEYS or prefix[-1] in ("password", "secret"):
            shown = "*** (set)" if value else "(not set)"
        elif prefix[:2] in URL_KEYS and isinstance(value, str):
            shown = queries.masked_url(value) if value else ""
        else:
            shown = str(value)
        rows.append((".".join(prefix), shown))

    dumped = settings.model_dump(mode="json")
    dumped["database"]["effective_url"] = settings.database_url
    for section, value in dumped.items():
        if isinstance(value, list):
            for index, item in enumerate(value):
                walk((section, str(index)), item)
        else:
            walk((section,), value)
    return rows


def add_views(app: FastAPI, ctx: OpsContext) -> None:
    """Register the admin pages on *app*."""
    templates = Jinja2Templates(directory=str(TEMPLATES))
    token = ctx.settings.http.admin_token

    def page(request: Request, name: str, status_code: int = 200, **values: Any) -> HTMLResponse:
        admin = is_admin(request, token)
        values.update(admin=admin, token_configured=bool(token), node=ctx.settings.network.ae_title,
                      csrf=_mac(token, "csrf") if admin else "")
        return templates.TemplateResponse(request, name, values, status_code=status_code)

    @app.get("/runs", response_class=HTMLResponse)
    def runs(request: Request, state: str = "", outcome: str = "", accession: str = "", study: str = "",
             id: str = "", limit: int = 50) -> HTMLResponse:
        filters = queries.RunFilter(state or None, outcome or None, accession.strip() or None,
                                    study.strip() or None, id.strip() or None, min(max(limit, 1), 1000))
        rows = queries.list_runs(ctx.sessions, filters, with_patient=is_admin(request, token))
        return page(request, "runs.html", rows=rows, filters=filters, states=[s.value for s in RunState])

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run(request: Request, run_id: str) -> Response:
        try:
            full = queries.resolve_run_id(ctx.sessions, run_id)
        except NodeError as exc:
            return page(request, "error.html", status_code=404, message=str(exc))
        if full != run_id:
            return RedirectResponse(f"/runs/{full}", status_code=303)
        detail = queries.run_detail(ctx.sessions, full, with_patient=is_admin(request, token))
        return page(request, "run.html", run=detail)

    @app.get("/associations", response_class=HTMLResponse)
    def associations(request: Request, limit: int = 100) -> HTMLResponse:
        return page(request, "associations.html", rows=queries.associations(ctx.sessions, min(max(limit, 1), 1000)))

    @app.get("/dead-letters", response_class=HTMLResponse)
    def dead_letters(request: Request, replayed: str = "") -> HTMLResponse:
        return page(request, "dead_letters.html", rows=queries.dead_letters(ctx.sessions), replayed=replayed)

    @app.post("/dead-letters/{delivery_id}/retry")
    async def retry(request: Request, delivery_id: int) -> RedirectResponse:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        if not is_admin(request, token):
            raise HTTPException(403, "replaying a delivery needs the admin token (http.admin_token)")
        if not hmac.compare_digest(form.get("csrf", [""])[0], _mac(token, "csrf")) \
                and not request.headers.get("authorization"):
            raise HTTPException(403, "stale or missing form token: reload the page")
        replayable, sent, unknown = queries.replayable_ids(ctx.sessions, [delivery_id])
        if unknown:
            raise HTTPException(404, f"no delivery {delivery_id}")
        if sent:
            raise HTTPException(409, f"delivery {delivery_id} was sent already")
        count = (ctx.retry or (lambda ids: retry_deliveries(ctx.sessions, ids)))(replayable)
        return RedirectResponse("/dead-letters?" + urlencode({"replayed": f"{delivery_id}:{count}"}),
                                status_code=303)

    @app.get("/config", response_class=HTMLResponse)
    def config(request: Request) -> HTMLResponse:
        ready, checks = ctx.readiness.run()
        echoes = ctx.echo.results() if ctx.echo is not None else {}
        return page(request, "config.html", rows=effective_config(ctx.settings), ready=ready, checks=checks,
                    destinations=ctx.settings.destinations, echoes=echoes,
                    echo_interval=ctx.settings.http.echo_interval_s)

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, failed: str = "") -> HTMLResponse:
        return page(request, "login.html", failed=bool(failed))

    @app.post("/login")
    async def login(request: Request) -> RedirectResponse:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        given = form.get("token", [""])[0].strip()
        if not token or not hmac.compare_digest(given, token):
            return RedirectResponse("/login?failed=1", status_code=303)
        response = RedirectResponse("/runs", status_code=303)
        response.set_cookie(COOKIE, _mac(token, "session"), httponly=True, samesite="strict")
        return response

    @app.post("/logout")
    def logout() -> RedirectResponse:
        response = RedirectResponse("/runs", status_code=303)
        response.delete_cookie(COOKIE)
        return response
