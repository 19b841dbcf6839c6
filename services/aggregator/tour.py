"""Tour: a client walks stops; each is looked up, and its note is posted on one RouteChat for the whole tour.

Two flows are merged into the reply stream: an Arrival per stop as soon as its lookup returns, and every earlier
note that RouteChat sends back. The RouteChat stream lives exactly as long as the tour: when the client ends
its stream the chat is half-closed, and when either side is cancelled the other is too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aggregator.v1 import aggregator_pb2
from routeguide import route_guide_pb2, route_guide_pb2_grpc

_DONE = object()


class Tour:
    def __init__(self, routes: route_guide_pb2_grpc.RouteGuideAsyncStub) -> None:
        self._routes = routes

    async def __call__(
        self, stops: AsyncIterator[aggregator_pb2.TourStop]
    ) -> AsyncIterator[aggregator_pb2.TourUpdate]:
        # Updates are paced by the client's stops and RouteChat's bounded replies; notes wait for the chat.
        updates: asyncio.Queue[object] = asyncio.Queue()
        notes: asyncio.Queue[object] = asyncio.Queue(maxsize=64)

        async def outgoing_notes() -> AsyncIterator[route_guide_pb2.RouteNote]:
            while (note := await notes.get()) is not _DONE:
                yield note  # type: ignore[misc]

        chat = self._routes.RouteChat(outgoing_notes())

        async def walk() -> None:
            try:
                index = 0
                async for stop in stops:
                    feature = await self._routes.GetFeature(stop.location)
                    arrival = aggregator_pb2.Arrival(stop=index, feature=feature)
                    await updates.put(aggregator_pb2.TourUpdate(arrival=arrival))
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
        finished.add_done_callback(lambda _: updates.put_nowait(_DONE))
        try:
            while (update := await updates.get()) is not _DONE:
                yield update  # type: ignore[misc]
            await finished  # raises the first failure of either flow, with its status
        finally:
            for task in tasks:
                task.cancel()
            chat.cancel()
