"""Typed object-store calls (task outputs, executed notebooks): values stream from and to
files, so outputs of hundreds of MB never sit in memory whole. Errors are nbflow's."""
from __future__ import annotations

import base64
import os

from nbflow.errors import NotFound
from nbflow.nats.calls import NO_RETRY, Retrying, call


class Objects:
    def __init__(self, js, bucket: str, role: str = "", retrying: Retrying = NO_RETRY):
        self.js, self.bucket, self.role, self.retrying = js, bucket, role, retrying
        self._store = None

    async def store(self):
        if self._store is None:
            async def _open():
                return await call("obj.open", self.bucket, self.role, self.js.object_store,
                                  self.bucket)
            self._store = await self.retrying.run(_open, f"open object store {self.bucket}")
        return self._store

    async def _do(self, op: str, name: str, fn) -> object:
        what = f"{self.bucket}/{name}"

        async def once():
            st = await self.store()
            return await call(op, what, self.role, fn, st)
        return await self.retrying.run(once, f"{op} {what}")

    async def put_file(self, name: str, path: str) -> None:
        async def put(st):
            with open(path, "rb") as f:
                await st.put(name, f)
        await self._do("obj.put", name, put)

    async def put_bytes(self, name: str, data: bytes) -> None:
        await self._do("obj.put", name, lambda st: st.put(name, data))

    async def get_file(self, name: str, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

        async def get(st):
            with open(path, "wb") as f:          # a retry rewrites the file from the start
                await st.get(name, writeinto=f)
        await self._do("obj.get", name, get)

    async def get_bytes(self, name: str) -> bytes:
        res = await self._do("obj.get", name, lambda st: st.get(name))
        return res.data or b""

    async def info(self, name: str):
        """The object's info, or None when it does not exist (or was deleted)."""
        try:
            info = await self._do("obj.info", name, lambda st: st.get_info(name))
        except NotFound:
            return None
        return None if getattr(info, "deleted", False) else info

    async def exists(self, name: str) -> bool:
        return await self.info(name) is not None

    async def list(self) -> list:
        """Infos of every live object; [] when the store is empty."""
        try:
            infos = await self._do("obj.info", "*", lambda st: st.list(ignore_deletes=True))
        except NotFound:
            return []
        return [i for i in infos or [] if not getattr(i, "deleted", False)]

    def _meta_subject(self, name: str) -> str:
        return f"$O.{self.bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"

    async def stored_at(self, name: str) -> float | None:
        """When the object's metadata was last written (put or :meth:`touch`), as a Unix time
        from the server's clock; None when it does not exist."""
        try:
            msg = await self._do("obj.info", name, lambda st: self.js.get_last_msg(
                f"OBJ_{self.bucket}", self._meta_subject(name)))
        except NotFound:
            return None
        t = getattr(msg, "time", None)
        return t.timestamp() if t is not None else None

    async def touch(self, name: str) -> bool:
        """Rewrite the object's metadata unchanged, so :meth:`stored_at` says now (a reuse of
        a stored object renews its grace period against `nbflow gc`). False if it is gone."""
        from nats.js.api import ObjectMeta

        info = await self.info(name)
        if info is None:
            return False
        meta = ObjectMeta(name=name, description=info.description, headers=info.headers)
        try:
            await self._do("obj.put", name, lambda st: st.update_meta(name, meta))
        except NotFound:
            return False
        return True

    async def delete(self, name: str) -> None:
        try:
            await self._do("obj.put", name, lambda st: st.delete(name))
        except NotFound:
            pass
