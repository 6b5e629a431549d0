"""Task inputs/outputs and executed notebooks in the object store ``nbflow_artifacts``.

Values are streamed from and to files (the object store chunks them), so outputs of hundreds
of MB never sit in the worker's memory whole.
"""
from __future__ import annotations

import os


def output_key(run: str, key: str, attempt: int, name: str) -> str:
    return f"{run}/{key}/{attempt}/out/{name}.pkl"


def notebook_key(run: str, key: str, attempt: int) -> str:
    return f"{run}/{key}/{attempt}/notebook.ipynb"


class Artifacts:
    def __init__(self, js, bucket: str):
        self.js, self.bucket = js, bucket
        self._store = None

    async def store(self):
        if self._store is None:
            self._store = await self.js.object_store(self.bucket)
        return self._store

    async def put_file(self, name: str, path: str) -> None:
        st = await self.store()
        with open(path, "rb") as f:
            await st.put(name, f)

    async def put_bytes(self, name: str, data: bytes) -> None:
        st = await self.store()
        await st.put(name, data)

    async def get_file(self, name: str, path: str) -> None:
        st = await self.store()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as f:
            await st.get(name, writeinto=f)

    async def get_bytes(self, name: str) -> bytes:
        st = await self.store()
        res = await st.get(name)
        return res.data or b""

    async def exists(self, name: str) -> bool:
        st = await self.store()
        try:
            info = await st.get_info(name)
        except Exception:  # noqa: BLE001 - nats-py: ObjectNotFoundError / NotFoundError
            return False
        return not getattr(info, "deleted", False)
