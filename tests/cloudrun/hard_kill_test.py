"""SIGKILL of an instance under load, through the local Cloud Run: routeguide's own manifest with two
instances (minScale = maxScale = 2), its instances from source, called as the aggregator calls it (TLS to the
front end by run.app name, the aggregator's ID token, the mesh's retry policy for its idempotent methods).

What callers see, counted by status: unary GetFeature (idempotent: retried on UNAVAILABLE) always succeeds;
every RouteChat stream ends with a status within a bound, never a hang (those on the killed instance cut, the
others complete); the autoscaler replaces the dead instance."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from pathlib import Path

import grpc
import yaml

from cloudrun import runners
from cloudrun.autoscaler import Instance
from cloudrun.platform import CloudRun
from deploy.render import render
from mesh.client import retry_service_config
from mesh.testing import NO_REUSEPORT, eventually
from routeguide import route_guide_pb2, route_guide_pb2_grpc
from tests.cloudrun.instances import CALL_TIMEOUT_S, PROJECT_NUMBER, REGION

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "demo-project"
IMAGE = "127.0.0.1:5000/demo-project/mesh/routeguide@sha256:" + "cd" * 32
CALLER = f"aggregator-sa@{PROJECT}.iam.gserviceaccount.com"  # routeguide's one allowed caller
IDEMPOTENT = ["routeguide.RouteGuide/GetFeature", "routeguide.RouteGuide/ListFeatures"]  # as the aggregator
STREAMS, CALLERS = 20, 4
CUT_WITHIN_S = 15.0  # a stream on the killed instance ends by then (Envoy sees the connection reset)
FINISH_WITHIN_S = 20.0
PLACE = route_guide_pb2.Point(latitude=409146138, longitude=-746188906)


def manifest() -> str:
    """services/routeguide/service.yaml rendered for the test's project, held at two instances."""
    text = render(
        (ROOT / "services/routeguide/service.yaml").read_text(),
        {"PROJECT_ID": PROJECT, "PROJECT_NUMBER": PROJECT_NUMBER, "REGION": REGION, "IMAGE": IMAGE},
    )
    document = yaml.safe_load(text)
    annotations = document["spec"]["template"]["metadata"]["annotations"]
    annotations["autoscaling.knative.dev/minScale"] = annotations["autoscaling.knative.dev/maxScale"] = "2"
    return yaml.safe_dump(document)


def note(stream: int, message: str) -> route_guide_pb2.RouteNote:
    return route_guide_pb2.RouteNote(
        location=route_guide_pb2.Point(latitude=stream, longitude=7), message=message
    )


async def test_a_hard_killed_instance_costs_no_idempotent_call_and_every_stream_ends(tmp_path: Path) -> None:
    started: list[Instance] = []

    def runner(revision: runners.Revision) -> runners.Launcher:
        launch = runners.from_source(revision)

        def tracked() -> Instance:
            started.append(launch())
            return started[-1]

        return tracked

    with CloudRun(tmp_path, project_number=PROJECT_NUMBER, region=REGION, runner=runner) as run:
        await asyncio.to_thread(run.replace, manifest())
        await eventually(lambda: run.snapshot()[0].instances == 2, within=30, what="two instances")
        host = run.front.host("routeguide")
        token = run.identity.mint(CALLER, f"https://{host}")
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(run.ca_file.read_bytes()), grpc.access_token_call_credentials(token)
        )
        options = [
            *NO_REUSEPORT,
            ("grpc.ssl_target_name_override", host),
            ("grpc.default_authority", f"{host}:443"),
            ("grpc.service_config", retry_service_config(IDEMPOTENT)),
        ]
        unary: collections.Counter[str] = collections.Counter()
        streams: collections.Counter[str] = collections.Counter()
        async with grpc.aio.secure_channel(run.front.address, credentials, options=options) as channel:
            stub = route_guide_pb2_grpc.RouteGuideStub(channel)
            chats = [stub.RouteChat() for _ in range(STREAMS)]
            for number, chat in enumerate(chats):
                await chat.write(note(number, "first"))
            # Each stream's next read waits for an answer that only its second note brings: a read that ends
            # before that is a stream the kill cut.
            reads = {asyncio.ensure_future(chat.read()): number for number, chat in enumerate(chats)}
            done = asyncio.Event()

            async def caller() -> None:
                for _ in range(50_000):
                    if done.is_set():
                        return
                    try:
                        feature = await stub.GetFeature(PLACE, timeout=CALL_TIMEOUT_S)
                        unary["OK" if feature.name else "OK but empty"] += 1
                    except grpc.aio.AioRpcError as error:
                        unary[error.code().name] += 1

            callers = [asyncio.create_task(caller()) for _ in range(CALLERS)]
            await eventually(lambda: unary["OK"] >= 200, within=30, what="the load")
            victim = started[0]
            killed_at = time.monotonic()
            await asyncio.to_thread(victim.kill)  # SIGKILL: no drain, no GOAWAY; the front end was not told
            # The streams it held end by themselves (Envoy sees the connection reset), without the caller acting.
            ended, _ = await asyncio.wait(reads, timeout=CUT_WITHIN_S, return_when=asyncio.FIRST_COMPLETED)
            first_end_s = time.monotonic() - killed_at
            before = unary["OK"]
            await eventually(lambda: unary["OK"] >= before + 200, within=30, what="the load after the kill")
            # The autoscaler noticed the death (out of the endpoints at once) and started a replacement.
            await eventually(
                lambda: run.snapshot()[0].instances == 2 and not victim.alive(),
                within=30,
                what="a replacement",
            )
            done.set()
            await asyncio.gather(*callers)

            async def finish(read: asyncio.Future[object], number: int) -> tuple[grpc.StatusCode, object]:
                chat = chats[number]
                if not read.done():
                    with contextlib.suppress(
                        grpc.aio.AioRpcError, asyncio.InvalidStateError
                    ):  # cut meanwhile
                        await chat.write(note(number, "second"))
                        await chat.done_writing()
                answer: object = None
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await read  # the first note, sent back once the second arrived
                    while await chat.read() is not grpc.aio.EOF:
                        pass
                return await chat.code(), answer

            ends = await asyncio.wait_for(
                asyncio.gather(*(finish(f, n) for f, n in reads.items())), FINISH_WITHIN_S
            )
    for code, answer in ends:
        streams["completed" if code == grpc.StatusCode.OK else f"cut: {code.name}"] += 1
        if code == grpc.StatusCode.OK:
            assert isinstance(answer, route_guide_pb2.RouteNote) and answer.message == "first", answer
    print(
        f"\nhard kill: unary GetFeature {dict(unary)}; streams {dict(streams)}; first end {first_end_s:.2f} s"
    )
    assert set(unary) == {"OK"}, unary  # retried to success: no caller saw the kill
    assert ended, f"no stream ended within {CUT_WITHIN_S} s of the kill"
    # Both instances held streams: the killed one's were cut with a status, the other's completed.
    assert sum(streams.values()) == STREAMS and streams["completed"] and len(streams) > 1, streams
