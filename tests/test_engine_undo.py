"""The engine publishes a batch's commands and writes its snapshot at once, with one wait for
both. When a command is refused after the snapshot was written, the snapshot is put back, so the
redelivered events are applied and their commands sent again (nothing is lost). An in-process
engine on a real nats-server; the refusal is injected by dropping the first batch's dispatch."""
from __future__ import annotations

import asyncio

from nbflow.core.ir import Edge, Node, Workflow
from nbflow.engine import engine as engine_mod
from nbflow.nats import infra
from nbflow.nats.layout import Layout


def test_a_dispatch_refused_after_the_snapshot_was_written_is_sent_again(nats_server):
    from nbflow.client import Client

    ns = "undo"
    wf = Workflow("undo", nodes=[Node("start", "start"), Node("t", "task", code="pass"),
                                 Node("end", "end")],
                  edges=[Edge("start", "t"), Edge("t", "end")]).validate()

    async def go():
        nc = await infra.connect(nats_server.url, name="test-engine")
        eng = engine_mod.Engine(nc, Layout(ns))
        await eng.start()
        real_send, refused = eng.send, []

        async def send(st, cmds):
            if not refused and any(c.kind == "dispatch" for c in cmds):
                # the server "refuses" the dispatch: never stored, its ack fails
                acks = await real_send(st, [c for c in cmds if c.kind != "dispatch"])
                failed = asyncio.get_running_loop().create_future()
                failed.set_exception(RuntimeError("refused"))
                refused.append(st.run)
                return [*acks, failed]
            return await real_send(st, cmds)
        eng.send = send
        serving = asyncio.create_task(eng.run())
        c = await Client.connect(nats_server.url, namespace=ns)
        try:
            run = await c.submit(wf, {})
            L = Layout(ns)
            js = nc.jetstream()
            for _ in range(200):                   # the redelivery comes after ~1 s
                info = await js.stream_info(L.tasks_stream)
                if info.state.messages:
                    break
                await asyncio.sleep(0.05)
            assert refused == [run]
            assert info.state.messages == 1        # dispatched after all, once
        finally:
            eng.stop()
            await asyncio.wait_for(serving, 10)
            await c.close()
            await nc.close()
    asyncio.run(go())
