"""The local mesh read from the manifests and services/invokers.yaml: who runs, in which order, as whom, and
who the developer is; a change to those files changes the mesh, with nothing else to edit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from localmesh.plan import Plan, PlanError, find_root, source_image, templates

ROOT = find_root()


def images(root: Path) -> dict[str, str]:
    return {folder: source_image(root, folder) for folder, _ in templates(root).values()}


def copy(tmp_path: Path) -> Path:
    """The repo's manifests and invokers file, alone in `tmp_path`."""
    for path in [ROOT / "services/invokers.yaml", *ROOT.glob("services/*/service*.yaml")]:
        target = tmp_path / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return tmp_path


def test_callees_start_first_and_each_runs_as_its_manifest_says() -> None:
    plan = Plan.load(ROOT, images(ROOT))
    order = [s.name for s in plan.services]
    assert sorted(order) == ["aggregator", "ping", "ping-upstream", "routeguide"]
    for service in plan.services:
        assert all(order.index(u) < order.index(service.name) for u in service.upstreams), order
    assert plan["aggregator"].upstreams == ("ping", "routeguide") and plan["ping"].upstreams == (
        "ping-upstream",
    )
    assert plan["ping-upstream"].folder == "ping"  # the same image as ping: its manifest's folder
    assert plan["ping"].spec.service_account == "ping-sa@local-mesh.iam.gserviceaccount.com"
    assert plan["ping"].audience == f"https://{plan['ping'].host}"
    assert plan.developer == "mesh-client@local-mesh.iam.gserviceaccount.com"
    assert plan.invokers("routeguide") == ["aggregator-sa@local-mesh.iam.gserviceaccount.com"]


def test_only_takes_what_a_service_calls() -> None:
    assert [s.name for s in Plan.load(ROOT, images(ROOT), ["ping"]).services] == ["ping-upstream", "ping"]
    with pytest.raises(PlanError, match="no manifest for nope; the services are aggregator, ping"):
        Plan.load(ROOT, images(ROOT), ["nope"])


def test_the_source_digest_follows_the_service_source(tmp_path: Path) -> None:
    root = copy(tmp_path)
    before = source_image(root, "routeguide")
    assert before.startswith("mesh.local/routeguide@sha256:") and source_image(root, "ping") != before
    (root / "services/routeguide/service.yaml").write_text("# changed\n", encoding="utf-8")
    assert source_image(root, "routeguide") != before


def test_the_developer_is_the_one_invoker_no_service_runs_as(tmp_path: Path) -> None:
    root = copy(tmp_path)
    invokers = root / "services/invokers.yaml"
    text = invokers.read_text()
    invokers.write_text(text.replace("aggregator: [mesh-client]", "aggregator: [mesh-client, partner]"))
    with pytest.raises(PlanError, match=r"\['mesh-client', 'partner'\] invoker"):
        Plan.load(root, images(root))
    invokers.write_text(text.replace("mesh-client", "outside-caller"))
    assert Plan.load(root, images(root)).developer == "outside-caller@local-mesh.iam.gserviceaccount.com"
