"""`nbflow ui`: the console without Jupyter. A tornado server on loopback; the token in the URL
(like `jupyter lab`) signs the browser in with a cookie. The user is whoever started it
(NBFLOW_USER / JUPYTERHUB_USER / the OS user)."""
from __future__ import annotations

import asyncio
import hmac
import secrets

from tornado import web

from nbflow.client import whoami
from nbflow.console.handlers import handlers, settings
from nbflow.console.index import Console

COOKIE = "nbflow-console"


class TokenHandler(web.RequestHandler):
    """Signed in by ``?token=`` (then a cookie), or ``Authorization: token T`` (scrapers)."""

    def get_current_user(self):
        token = self.settings["nbflow_token"]
        user = self.settings["nbflow_user"]
        auth = self.request.headers.get("Authorization", "")
        if auth.lower().startswith(("token ", "bearer ")):
            if hmac.compare_digest(auth.split(None, 1)[1].strip(), token):
                return user
        given = self.get_query_argument("token", "")
        if given and hmac.compare_digest(given, token):
            self.set_signed_cookie(COOKIE, user, httponly=True, samesite="Strict")
            return user
        c = self.get_signed_cookie(COOKIE)
        return c.decode() if c else None

    def check_xsrf_cookie(self):
        if self.request.headers.get("Authorization"):
            return                        # token-authenticated API call, not a browser form
        super().check_xsrf_cookie()

    def get_login_url(self):
        return self.settings["nbflow_root"] + "login"


class LoginHandler(web.RequestHandler):
    def get(self):
        self.set_status(403)
        self.finish("<!doctype html><title>nbflow console</title><h1>Sign in</h1><p>Open the "
                    "URL that <code>nbflow ui</code> printed: it carries the token "
                    "(<code>?token=…</code>).</p>")


def make_app(console: Console, token: str, user: str | None = None) -> web.Application:
    root = "/nbflow/"
    app = web.Application(
        handlers("/nbflow", TokenHandler) + [(r"/nbflow/login", LoginHandler),
                                              (r"/", web.RedirectHandler, {"url": root})],
        cookie_secret=secrets.token_bytes(32), xsrf_cookies=True,
        nbflow_token=token, nbflow_user=user or whoami(),
        **settings(console, root, standalone=True))
    return app


async def serve(port: int = 0, ip: str = "127.0.0.1", token: str | None = None,
                nats_url: str | None = None, namespace: str | None = None,
                approvers=None, user: str | None = None, on_ready=None) -> None:
    from nbflow.stack import free_port

    token = token or secrets.token_hex(24)
    console = Console(nats_url, namespace, approvers)
    app = make_app(console, token, user)
    port = port or free_port()
    server = app.listen(port, ip)
    url = f"http://{ip}:{port}/nbflow/?token={token}"
    if on_ready:
        on_ready(url)
    try:
        await console.connect()
        await asyncio.Event().wait()
    finally:
        server.stop()
        await console.close()
