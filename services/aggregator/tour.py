"""Tour: a client walks stops; each is looked up, and its note is posted on one RouteChat for the whole tour.

Two flows are merged into the reply stream: an Arrival per stop as soon as its lookup returns, and every earlier
note that RouteChat sends back. The RouteChat stream lives exactly as long as the tour: when the client ends
its stream the chat is half-closed, and when either side is cancelled the other is too.

A lookup that fails because of routeguide (unavailable, out of time: each gets the incoming deadline less
mesh's margin) is reported on its stop's Arrival and the tour goes on; one that routeguide rejects as
INVALID_ARGUMENT is the caller's own fault and ends the tour, as does a failed RouteChat.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from aggregator.v1 import aggregator_pb2
from routeguide import route_guide_pb2, route_guide_pb2_grpc
from services.aggregator.downstream import timed

GET_FEATURE = "/routeguide.RouteGuide/GetFeature"

_DONE = object()


class Tour:
    def __init__(self, routes: route_guide_pb2_grpc.RouteGuideAsyncStub) -> None:
        self._routes = routes

    async def __call__(
        self, stops: AsyncIterator[aggregator_pb2.TourStop]
    ) -> AsyncIterator[aggregator_pb2.TourUpdate]:
        # Both queues are bounded: a client that stops reading its updates stops the walk and the relay of
        # notes, so gRPC's flow control holds back its stops and RouteChat's replies, not our memory.
        updates: asyncio.Queue[object] = asyncio.Queue(maxsize=64)
        notes: asyncio.Queue[object] = asyncio.Queue(maxsize=64)

        async def outgoing_notes() -> AsyncIterator[route_guide_pb2.RouteNote]:
            # The chat's verdict first (mesh servers send its headers on admission): a note written while
            # routeguide refuses the chat could turn the refusal into INTERNAL (mesh.server._calls.ADMITTED).
            await chat.initial_metadata()
            while (note := await notes.get()) is not _DONE:
                yield note  # type: ignore[misc]

        chat = self._routes.RouteChat(outgoing_notes())

        async def walk() -> None:
            try:
                index = 0
                async for stop in stops:
                    await updates.put(aggregator_pb2.TourUpdate(arrival=await self._arrival(index, stop)))
                    if stop.note:
                        await notes.put(route_guide_pb2.RouteNote(location=stop.location, message=stop.note))
                    index += 1
            finally:
                await notes.put(_DONE)  # half-close the chat: RouteChat ends once it has answered every note

        async def relay_notes() -> None:
            async for note in chat:
                await updates.put(aggregator_pb2.TourUpdate(note=note))

        tasks = [asyncio.create_task(walk()), asyncio.create_task(relay_notes())]
        finished = asyncio.ensure_future(asyncio.gather(*tasks))

        async def end() -> None:
            await asyncio.wait([finished])
            await updates.put(_DONE)  # after every update already queued

        tasks.append(asyncio.create_task(end()))
        try:
            while (update := await updates.get()) is not _DONE:
                yield update  # type: ignore[misc]
            await finished  # raises the first failure of either flow, with its status
        finally:
            for task in tasks:
                task.cancel()
            chat.cancel()

    async def _arrival(self, index: int, stop: aggregator_pb2.TourStop) -> aggregator_pb2.Arrival:
        looked_up = await timed(GET_FEATURE, lambda: self._routes.GetFeature(stop.location))
        if looked_up.error is not None and looked_up.error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise looked_up.error
        if looked_up.result is None:
            return aggregator_pb2.Arrival(stop=index, failure=looked_up.call)
        return aggregator_pb2.Arrival(stop=index, feature=looked_up.result)
