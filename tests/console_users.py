"""Two Jupyter users for the console's tests: a token per person (``?token=`` signs the browser
in with a cookie; ``Authorization: token T`` for scripts). Loaded by jupyter server through
``--ServerApp.identity_provider_class=console_users.TwoUsers``."""
from jupyter_server.auth.identity import IdentityProvider, User

TOKENS = {"alice-token": "alice", "bob-token": "bob"}
COOKIE = "console-test-user"


class TwoUsers(IdentityProvider):
    def get_user(self, handler):
        auth = handler.request.headers.get("Authorization", "")
        token = handler.get_argument("token", "") or auth.partition(" ")[2].strip()
        name = TOKENS.get(token)
        if name:
            handler.set_secure_cookie(COOKIE, name)
        else:
            raw = handler.get_secure_cookie(COOKIE)
            name = raw.decode() if raw else None
        return User(username=name, name=name, display_name=name) if name else None
