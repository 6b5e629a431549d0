"""The engine's decide service: approvals, signals and cancels, with an identity nobody can
forge.

A person asks on ``<root>.decide.<user>.approve`` (or ``.signal``, ``.cancel``); nats-server
lets each user publish only under its own name (the stack's and the template's permissions),
so the decider is the ``<user>`` token of the subject — never a field of the payload. The
engine then checks the approval record's single-use token, records the decision in the
approvals bucket with compare-and-set, and publishes ``ApprovalDecided`` with a message id
that carries a fresh decision id. Only the engine may publish these kinds to history, under
message ids keyed with its secret (Engine.msg_id): a forged event can neither decide nor
occupy the genuine one's id.
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any

from nbflow.core.events import approval_msg_id, cancel_msg_id, make, signal_msg_id
from nbflow.errors import NotFound
from nbflow.nats.layout import MSG_ID, SIGNAL_NAME_RE

log = logging.getLogger("nbflow.engine")


class DecideService:
    def __init__(self, engine):
        self.e = engine
        self.L = engine.L

    async def start(self) -> None:
        self.sub = await self.e.nc.subscribe(self.L.decide_subject("*", ">"),
                                             queue="nbflow-engine", cb=self._on_request)

    async def _on_request(self, msg) -> None:
        prefix = self.L.decide_subject("", "").rstrip(".")
        rest = msg.subject[len(prefix):].lstrip(".").split(".")
        try:
            user, what = rest[0], rest[1]
            req = json.loads(msg.data or b"{}")
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except (IndexError, ValueError) as e:
            return await self._reply(msg, {"error": f"malformed decide request: {e}",
                                           "kind": "bad_request"})
        try:
            if what == "approve":
                out = await self.approve(user, req)
            elif what == "signal":
                out = await self.signal(user, req)
            elif what == "cancel":
                out = await self.cancel(user, req)
            else:
                out = {"error": f"unknown decide request {what!r}", "kind": "bad_request"}
        except Exception as e:  # noqa: BLE001 - the requester gets the reason, not a timeout
            log.exception("decide %s by %s failed", what, user)
            out = {"error": f"{type(e).__name__}: {e}", "kind": "failed"}
        await self._reply(msg, out)

    async def _reply(self, msg, out: dict) -> None:
        if msg.reply:
            await self.e.nc.publish(msg.reply, json.dumps(out).encode())

    # --- approvals ----------------------------------------------------------------------------
    async def approve(self, user: str, req: dict) -> dict[str, Any]:
        run, node = str(req.get("run", "")), str(req.get("node", ""))
        key = f"{run}.{node}"
        kv = self.e.approvals_kv
        for _ in range(5):
            try:
                entry = await kv.get(key)
            except Exception:  # noqa: BLE001 - never requested
                return {"error": f"task {node!r} of run {run} has no approval request",
                        "kind": "not_pending"}
            rec = json.loads(entry.value)
            if rec.get("state") != "pending":
                if rec.get("decision"):          # finish a decision whose event may be missing
                    await self._publish(run, node, rec)
                return {"error": "already decided", "kind": "already_decided", "decision": rec}
            token = str(req.get("token", ""))
            if not token or not secrets.compare_digest(token, str(rec.get("token", ""))):
                return {"error": f"the approval token for {node!r} of run {run} does not match "
                                 f"the pending request (it was re-requested or is forged)",
                        "kind": "bad_token"}
            approved = bool(req.get("approved"))
            decision = {**rec, "state": "approved" if approved else "rejected", "by": user,
                        "comment": str(req.get("comment") or ""), "at": time.time(),
                        "decision": secrets.token_hex(8)}
            decision.pop("token", None)      # single use
            try:
                await kv.update(key, json.dumps(decision).encode(), last=entry.revision)
            except Exception:  # noqa: BLE001 - another decision won the CAS: look again
                continue
            await self._publish(run, node, decision)
            return {"ok": True, "decision": decision}
        return {"error": "the approval record kept changing", "kind": "failed"}

    async def _publish(self, run: str, node: str, rec: dict) -> None:
        ev = make("ApprovalDecided", run, node=node, approved=rec["state"] == "approved",
                  by=rec["by"], comment=rec.get("comment") or None, decision=rec["decision"])
        await self.e.js.publish(self.L.history_subject(run, ev.type), ev.encode(), headers={
            MSG_ID: self.e.msg_id(approval_msg_id(run, node, rec["decision"]))})

    # --- signals ------------------------------------------------------------------------------
    async def signal(self, user: str, req: dict) -> dict[str, Any]:
        run, name = str(req.get("run", "")), str(req.get("name", ""))
        if not SIGNAL_NAME_RE.match(name):
            return {"error": f"signal name {name!r} is invalid", "kind": "bad_request"}
        if not run:
            return {"error": "no run named", "kind": "bad_request"}
        # no snapshot check: a run just submitted may not have one yet (the client checked the
        # run exists; a signal for no run is dead-lettered as an event before RunStarted)
        value = req.get("value")
        if not hasattr(self, "signals_kv"):
            self.signals_kv = await self.e.js.key_value(self.L.signals_bucket)
        await self.signals_kv.put(f"{run}.{name}", json.dumps(
            {"value": value, "by": user, "at": time.time()}).encode())
        ev = make("SignalSent", run, name=name, value=value, by=user)
        await self.e.js.publish(self.L.history_subject(run, ev.type), ev.encode(),
                                headers={MSG_ID: self.e.msg_id(signal_msg_id(run, name))})
        return {"ok": True}

    # --- cancel -------------------------------------------------------------------------------
    async def cancel(self, user: str, req: dict) -> dict[str, Any]:
        """Record ``CancelRequested`` by the authenticated user. Only the engine may publish
        that kind to history (nats-server permissions), under a message id nobody else can
        occupy, so a forged cancel neither cancels nor blocks this one."""
        run = str(req.get("run", ""))
        if not run:
            return {"error": "no run named", "kind": "bad_request"}
        st, _ = await self.e.load_snapshot(run)
        if st is None:             # just submitted (no snapshot yet): its start is recorded
            try:
                await self.e.defs_kv.get(f"start.{run}")
            except NotFound:
                return {"error": f"no run {run!r}", "kind": "not_found"}
        elif st.is_final:
            return {"error": f"run {run} is already {st.state}", "kind": "final",
                    "state": st.state}
        reason = req.get("reason")
        ev = make("CancelRequested", run, by=user,
                  reason=str(reason) if reason else None)
        await self.e.js.publish(self.L.history_subject(run, ev.type), ev.encode(),
                                headers={MSG_ID: self.e.msg_id(cancel_msg_id(run))})
        return {"ok": True}


def decision_is_genuine(ev, rec: dict) -> bool:
    """An ApprovalDecided counts only when it matches the decision recorded by the decide
    service: same outcome, same decider and the same fresh decision id."""
    want = "approved" if ev["approved"] else "rejected"
    return (rec.get("state") == want and rec.get("by") == ev["by"]
            and bool(rec.get("decision")) and rec.get("decision") == ev.get("decision"))
