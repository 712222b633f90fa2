"""The dashboard's own pages: signed in (sets the cookie), signed out, refused."""

from __future__ import annotations

import time
from html import escape

from starlette.responses import HTMLResponse, Response

from backjobs.dashboard.tokens import COOKIE_NAME, SIGN_IN_PATH


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
