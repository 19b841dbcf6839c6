"""The local mesh with each service from its own image (`./pants run :mesh -- --containers`): the manifests name
each image by its ID, the instances run that ID with Cloud Run's flags behind the front end, and a caller outside
reaches them by run.app name with ID tokens, allow-lists and spans to the launcher, as with processes.
"""

from __future__ import annotations

from pathlib import Path

from engine.daemon import Engine
from localmesh import demo
from localmesh.launcher import Mesh
from tests.images.containers import ServiceImage


async def test_relay_survey_and_tour_through_the_containers_with_their_traces(
    engine: Engine, images: dict[str, ServiceImage], tmp_path: Path
) -> None:
    local = {folder: image.tag for folder, image in images.items()}
    logs: list[str] = []
    mesh = Mesh(tmp_path / "state", images=local, docker_env=engine.docker_env(), echo=logs.append)
    said: list[str] = []
    try:
        await mesh.start()
        assert mesh.plan is not None
        ids = {
            folder: engine.docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
            for folder, tag in local.items()
        }
        running = engine.docker("ps", "--format", "{{.Names}}").stdout.split()
        for service in mesh.plan.services:
            # The manifest names the image by its ID, and the service's container runs that very image.
            assert service.spec.image == f"mesh.local/{service.folder}@{ids[service.folder]}"
            (name,) = [n for n in running if n.startswith(f"cloudrun-{mesh.deployed[service.name]}-")]
            assert (
                engine.docker("inspect", "--format", "{{.Image}}", name).stdout.strip() == ids[service.folder]
            )
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
    assert codes == {service: 0 for service in mesh.deployed}, "\n".join(logs)
    # Only this mesh's containers: the pipeline's Cloud Run (tests/pipeline) may be running its own meanwhile.
    for revision in mesh.deployed.values():
        left = engine.docker("ps", "--all", "--quiet", "--filter", f"name=cloudrun-{revision}-").stdout
        assert left.strip() == "", f"{revision}'s container is still there"
