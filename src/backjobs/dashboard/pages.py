"""The dashboard's own pages (signed in, signing out, refused) and the UI's
Content-Security-Policy."""

from __future__ import annotations

import time
from html import escape

from starlette.datastructures import Headers
from starlette.responses import HTMLResponse, JSONResponse, Response

from backjobs.dashboard.asgi import Message, Scope, Send
from backjobs.dashboard.tokens import COOKIE_NAME, SIGN_IN_PATH, SIGN_OUT_PATH

# Sent with every page of the UI (everything outside /api/): the UI may load scripts,
# styles, images and fonts, and call, only the dashboard itself ('self' covers its
# ws:/wss: too). It stops the analytics host Prefect's UI calls on every page even with
# PREFECT_SERVER_ANALYTICS_ENABLED=false. Inline styles stay allowed (the UI's
# components set style attributes; they load nothing); data: and blob: images and fonts
# are made in the page, not fetched from elsewhere.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "connect-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "manifest-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)


def with_csp(send: Send) -> Send:
    """``send`` that adds the UI's Content-Security-Policy to a response's headers."""

    async def send_with_csp(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [
                (k, v) for k, v in message.get("headers", []) if k != b"content-security-policy"
            ]
            headers.append((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()))
            message = {**message, "headers": headers}
        await send(message)

    return send_with_csp


def refusal_response(
    scope: Scope, status: int, problem: str = "", *, login_url: str | None, html: bool = False
) -> Response:
    """401, 403 or 503: JSON for the API, a page saying how to sign in for a browser."""
    wants_html = "text/html" in Headers(scope=scope).get("accept", "")
    if not (html or (wants_html and not scope["path"].startswith("/api/"))):
        message = {401: "Unauthorized", 403: "Forbidden"}.get(status, "Unavailable")
        if status == 403 and problem:
            message = f"Forbidden: {problem}"
        return JSONResponse({"exception_message": message}, status_code=status)
    response = HTMLResponse(refusal_page(status, problem, login_url), status_code=status)
    response.headers["content-security-policy"] = CONTENT_SECURITY_POLICY
    return response


def sign_in_form_response(token: str) -> Response:
    # The link's GET only shows this button: a scanner that fetches links in mail (and
    # does not submit forms) leaves the one-time link usable for the admin.
    response = HTMLResponse(
        page(
            "Sign in to the dashboard",
            f'<form method="post" action="{SIGN_IN_PATH}">'
            f'<input type="hidden" name="token" value="{escape(token)}">'
            '<button type="submit">Sign in</button></form>'
            "<p>This link works once and only for an admin.</p>",
        )
    )
    response.headers["cache-control"] = "no-store"
    # Not "no-referrer": with it, browsers post the form with ``Origin: null`` and the
    # gate's same-origin check refuses it. The link's URL still never leaves the site.
    response.headers["referrer-policy"] = "same-origin"
    return response


def signed_in_response(token: str, exp: int, secure: bool) -> Response:
    # A page that moves on by itself rather than a 30x: after a link clicked in another
    # site (a mail, a chat), browsers do not send a SameSite=Strict cookie on the
    # redirect that follows, but do on a navigation started by this page.
    response = HTMLResponse(
        page(
            "Signed in",
            '<meta http-equiv="refresh" content="0; url=/">'
            '<p>Signed in. <a href="/">Open the dashboard</a>.</p>',
        )
    )
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=max(0, exp - int(time.time())),
        path="/",
        httponly=True,
        samesite="strict",
        secure=secure,
    )
    response.headers["cache-control"] = "no-store"
    response.headers["referrer-policy"] = "no-referrer"
    return response


def sign_out_form_response() -> Response:
    # Sign-out changes the browser's state: a POST with the dashboard's Origin, so
    # another site cannot sign an admin out; the GET only shows the button.
    return HTMLResponse(
        page(
            "Sign out of the dashboard",
            f'<form method="post" action="{SIGN_OUT_PATH}">'
            '<button type="submit">Sign out</button></form>',
        )
    )


def signed_out_response(secure: bool) -> Response:
    response = HTMLResponse(page("Signed out", "<p>Signed out of the dashboard.</p>"))
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict", secure=secure)
    return response


def refusal_page(status: int, problem: str, login_url: str | None) -> str:
    if status == 403:
        text = "<p>Your account is not an admin: the dashboard is for admins only.</p>"
    elif status == 503:
        text = "<p>The dashboard cannot check who you are right now; try again shortly.</p>"
    else:
        text = f"<p>{escape(problem or 'Sign in to see the dashboard.')}</p>"
    if login_url:
        text += f'<p><a href="{escape(login_url)}">Sign in with the application</a>.</p>'
    text += (
        "<p>On the server, an admin can get a one-time sign-in link with "
        "<code>backjobs dashboard-token &lt;admin email&gt; --url</code>.</p>"
    )
    return page("Sign in to the dashboard", text)


def page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"</head><body><h1>{title}</h1>{body}</body></html>"
    )
