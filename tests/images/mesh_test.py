"""The local mesh with each service in its own image (`./pants run :mesh -- --containers`): TLS with the
development CA, ID tokens from the identity emulator, allow-lists, spans to the launcher, as with processes.
"""

from __future__ import annotations

from pathlib import Path

from engine.daemon import Engine
from localmesh import containers, demo
from localmesh.launcher import Mesh
from tests.images.containers import ServiceImage


async def test_relay_survey_and_tour_through_the_containers_with_their_traces(
    engine: Engine, images: dict[str, ServiceImage], tmp_path: Path
) -> None:
    roles = {role: images[image].tag for role, image in containers.IMAGE_OF_ROLE.items()}
    logs: list[str] = []
    mesh = Mesh(tmp_path / "state", images=roles, echo=logs.append)
    said: list[str] = []
    try:
        await mesh.start()
        running = engine.docker("ps", "--format", "{{.Image}} {{.Names}}").stdout.split("\n")
        for role, image in roles.items():
            assert any(line.startswith(f"{image} mesh-{role}-") for line in running), running
        # Each step waits for the spans of every service it crosses (demo._show_trace), so the traces printed
        # came from the containers' OTLP exporters.
        await demo.run(mesh, said.append)
    finally:
        codes = await mesh.stop()
    text = "\n".join(said)
    assert "== ping.SendUpstream -> pong #1 'hello from the demo (relayed)'" in text
    assert "ping-upstream  server /ping.PingService/Send" in text  # the relay's hop, with ping's own ID token
    assert "== aggregator.Survey -> pong 'survey', 100 features in the area" in text
    for method in (
        "/ping.PingService/Send",
        "/routeguide.RouteGuide/ListFeatures",
        "/routeguide.RouteGuide/RecordRoute",
    ):
        assert f"aggregator  client {method}" in text
    assert "== aggregator.Tour -> 3 stops" in text and "note from an earlier visit: 'start here'" in text
    assert codes == {role: 0 for role in roles}, "\n".join(logs)
    assert engine.docker("ps", "--all", "--quiet", "--filter", "name=mesh-").stdout.strip() == ""
