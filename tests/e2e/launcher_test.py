"""The launcher as a person uses it: `python -m localmesh.main --demo`, the CLI commands it prints, its live
table and scaling options, and a service that cannot start."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cloudrun.platform import CloudRunError
from localmesh import main
from localmesh.launcher import Mesh
from services.routeguide.features import builtin_database

SERVICES = ("ping-upstream", "routeguide", "ping", "aggregator")
LAUNCHER_WITHIN_S = 90  # the mesh up, the demo, the mesh down, on a busy 2-core machine


def _launcher_env(state_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p),
        "MESH_STATE_DIR": str(state_dir),
        **extra,
    }


def _launch(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    """`./pants run :mesh -- ARGS` as a process of its own, its output (both streams) read as text."""
    return subprocess.Popen(
        [sys.executable, "-m", main.__name__, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _children_of(launcher_pid: int) -> list[int]:
    """Live service processes started by the launcher with this pid (cloudrun.child names it in its argv)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # it exited meanwhile
        if b"cloudrun.child" in argv and str(launcher_pid).encode() in argv and state != "Z":
            found.append(int(entry.name))
    return found


def _listening_on(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses of this machine's sockets listening (state 0A) on TCP `port`, from /proc/net."""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(_unmapped(ipaddress.ip_address(words)))
    return found


def _unmapped(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """gRPC listens on 127.0.0.1 through an IPv6 socket bound to ::ffff:127.0.0.1: that IPv4 address."""
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def _trace_trees(output: str) -> list[str]:
    return re.findall(r"^trace [0-9a-f]{32}\n(?:.+\n)+", output, flags=re.MULTILINE)


def test_the_demo_command_prints_the_services_the_results_and_the_trace_trees(tmp_path: Path) -> None:
    launcher = _launch(_launcher_env(tmp_path), "--demo")
    output, _ = launcher.communicate(timeout=LAUNCHER_WITHIN_S)
    assert launcher.returncode == 0, output
    assert re.search(r"^The mesh is up behind the front end at 127\.0\.0\.1:\d+ ", output, re.M), output
    for name in SERVICES:
        assert re.search(rf"^  {name} +https://{name}-\d+\.europe-west1\.run\.app$", output, re.M), output
    assert "pong #1 'hello from the demo (relayed)'" in output
    assert re.search(r"== aggregator\.Survey -> pong 'survey', [1-9]\d* features", output), output
    assert re.search(r"== aggregator\.Tour -> 3 stops", output), output
    # The Tour walks named places of gRPC's canonical RouteGuide set, which the mesh serves by default.
    stops = re.findall(r"^   stop \d: (.+)$", output, re.M)
    canonical = {feature.name for feature in builtin_database().features if feature.name}
    assert len(stops) == 3 and set(stops) <= canonical, stops
    trees = _trace_trees(output)
    assert len(trees) == 3, output
    survey = next(tree for tree in trees if "Aggregator/Survey" in tree)
    for service, method in (("aggregator", "Survey"), ("ping", "Send"), ("routeguide", "ListFeatures")):
        assert re.search(rf"└─ {service} +server /\S+/{method} .* OK$", survey, re.M), survey
    # The per-method table from the services' metrics: the demo's calls, counted where they were served.
    table = output.split("Calls served while the mesh ran", 1)[1]
    for service, method, count in (
        ("aggregator", "/aggregator.v1.Aggregator/Survey", 1),
        ("aggregator", "/aggregator.v1.Aggregator/Tour", 1),
        ("routeguide", "/routeguide.RouteGuide/GetFeature", 3),
        ("ping-upstream", "/ping.PingService/Send", 1),
    ):
        assert re.search(
            rf"^  {service} +{re.escape(method)} +{count} +- +\d+\.\d +\d+\.\d$", table, re.M
        ), table
    assert "grpc.health" not in table
    assert "mesh: every instance stopped cleanly" in output
    assert (tmp_path / "certs" / "ca.crt").is_file()
    assert _children_of(launcher.pid) == []


@pytest.mark.asyncio
async def test_a_service_that_cannot_start_is_reported_with_its_own_output(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path, env={"routeguide": {"ROUTEGUIDE_DB": str(tmp_path / "nonexistent.json")}})
    with pytest.raises(CloudRunError) as error:
        async with mesh:
            pytest.fail("the mesh should not have started")
    message = str(error.value)
    assert message.startswith("Revision 'routeguide-"), message  # Cloud Run's words for a failed probe
    assert "ROUTEGUIDE_DB" in message and "nonexistent.json" in message
    # Callees first: the pings had started before routeguide failed; the aggregator, which calls it, never did.
    assert list(mesh.deployed) == ["ping-upstream", "ping"]
    assert {service for service, _ in mesh.started} == {"ping-upstream", "ping"}
    assert not any(instance.alive() for _, instance in mesh.started)
    assert _children_of(os.getpid()) == []


@pytest.mark.asyncio
async def test_the_mesh_listens_on_this_machine_only(tmp_path: Path) -> None:
    # The front end, an instance (its health and reflection take no token), the span receiver and the identity
    # emulator: none may be reachable from the network the developer's machine is on.
    async with Mesh(tmp_path, only=["ping-upstream"]) as mesh:
        assert mesh.plan is not None
        ports = {"front end": int(mesh.front.rsplit(":", 1)[1])}
        ports.update({f"instance {i}": instance.port for i, (_, instance) in enumerate(mesh.started)})
        endpoint = mesh.telemetry(mesh.plan.services[0].spec)["OTEL_EXPORTER_OTLP_ENDPOINT"]
        ports["spans"] = int(urlsplit(endpoint).port or 0)
        ports["certs"] = int(urlsplit(mesh.identity.certs_url).port or 0)
        ports["metadata"] = int(mesh.identity.metadata_host(mesh.developer).rsplit(":", 1)[1])
        listening = {name: _listening_on(port) for name, port in ports.items()}
    assert set(listening) == {"front end", "instance 0", "spans", "certs", "metadata"}
    for name, addresses in listening.items():
        assert addresses and all(address.is_loopback for address in addresses), (name, addresses)


def test_the_demo_command_reports_a_service_that_cannot_start_and_exits_1(tmp_path: Path) -> None:
    # The launcher passes its own environment on to the services (minus the variables it sets itself).
    env = _launcher_env(tmp_path, ROUTEGUIDE_DB=str(tmp_path / "nonexistent.json"))
    launcher = _launch(env, "--demo")
    output, _ = launcher.communicate(timeout=LAUNCHER_WITHIN_S)
    assert launcher.returncode == 1, output
    assert re.search(r"^mesh: Revision 'routeguide-\S+' is not ready", output, re.M), output
    assert "ROUTEGUIDE_DB" in output
    assert "The mesh is up" not in output
    assert _children_of(launcher.pid) == []


def test_the_printed_cli_commands_answer_as_pasted_while_the_mesh_serves(tmp_path: Path) -> None:
    # As a person runs it: `./pants run :mesh` in a folder (state in ./.mesh), commands pasted in a second shell.
    env = {k: v for k, v in _launcher_env(tmp_path).items() if k != "MESH_STATE_DIR"}
    launcher = _launch(env, "--no-demo", cwd=tmp_path)
    assert launcher.stdout is not None
    output: list[str] = []
    try:
        for line in launcher.stdout:  # bounded: the launcher gives up on a service after 30 s
            output.append(line)
            if line.startswith("Serving until Ctrl-C"):
                break
        printed = [line.strip() for line in output if line.startswith("  .mesh/cli ")]
        assert len(printed) == 2, "".join(output)  # what the developer may call: ping and the aggregator
        # The script holds the developer's metadata secret: no other user may read it.
        assert (tmp_path / ".mesh" / "cli").stat().st_mode & 0o077 == 0
        shell = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PEX", "GCE_METADATA"))}
        answers = (
            {  # by the service the command calls: `.mesh/cli --server SERVICE-NUMBER.REGION.run.app:443 ...`
                re.split(r"-\d+\.", command.split(" --server ")[1])[0]: subprocess.run(
                    ["bash", "-c", command],
                    cwd=tmp_path,
                    env=shell,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                for command in printed
            }
        )
    finally:
        launcher.send_signal(signal.SIGINT)
        rest, _ = launcher.communicate(timeout=60)
    assert set(answers) == {"ping", "aggregator"}, printed
    for answer in answers.values():
        assert answer.returncode == 0, answer.stderr
    assert re.match(r"pong \d+: 'hi \(relayed\)'", answers["ping"].stdout), answers["ping"].stdout
    assert re.search(r"^features: [1-9]\d* in the area", answers["aggregator"].stdout, re.M)
    assert "mesh: every instance stopped cleanly" in rest
    assert not (tmp_path / ".mesh" / "cli").exists()  # a stale script would point at a mesh that is gone


def _rows(lines: list[str]) -> list[dict[str, str]]:
    """The live table's rows (`  SERVICE  REVISION  TRAFFIC  INSTANCES  IN FLIGHT` and its lines)."""
    rows = []
    for line in lines:
        cells = line.split()
        if len(cells) >= 5 and cells[-2].isdigit() and cells[-1].isdigit() and cells[2].endswith("%"):
            rows.append({"service": cells[0], "revision": cells[1], "instances": cells[-2]})
    return rows


def test_min_instances_shows_in_the_live_table_and_max_caps_it(tmp_path: Path) -> None:
    launcher = _launch(_launcher_env(tmp_path), "--no-demo", "--only", "ping", "--min-instances", "ping=2")
    assert launcher.stdout is not None
    seen: list[str] = []
    try:
        for line in launcher.stdout:  # bounded: the second instance starts within seconds, or the test fails
            seen.append(line)
            if any(r["service"] == "ping" and r["instances"] == "2" for r in _rows(seen[-6:])):
                break
    finally:
        launcher.send_signal(signal.SIGINT)
        rest, _ = launcher.communicate(timeout=LAUNCHER_WITHIN_S)
    rows = _rows(seen)
    assert any(r["service"] == "ping" and r["instances"] == "2" for r in rows), "".join(seen)
    # --only ping deploys what ping calls too, and nothing else.
    assert {r["service"] for r in rows} == {"ping", "ping-upstream"}, "".join(seen)
    assert "mesh: every instance stopped cleanly" in rest, rest
    assert _children_of(launcher.pid) == []


def test_scaling_an_unknown_service_stops_with_one_line(tmp_path: Path) -> None:
    launcher = subprocess.run(
        [
            sys.executable,
            "-m",
            main.__name__,
            "--demo",
            "--only",
            "ping-upstream",
            "--max-instances",
            "nope=1",
        ],
        env=_launcher_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=LAUNCHER_WITHIN_S,
    )
    assert launcher.returncode == 1, launcher.stdout
    assert "mesh: Cannot find service [nope]" in launcher.stdout, launcher.stdout
