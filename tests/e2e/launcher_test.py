"""The launcher as a person uses it: `python -m localmesh.main --demo`, and a service that cannot start."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from localmesh import main
from localmesh.launcher import Mesh
from localmesh.supervisor import StartError
from localmesh.topology import DEVELOPER
from services.routeguide.features import builtin_database

SERVICES = ("ping-upstream", "routeguide", "ping", "aggregator")


def _launcher_env(state_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p),
        "MESH_STATE_DIR": str(state_dir),
        **extra,
    }


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
    launcher = subprocess.Popen(
        [sys.executable, "-m", main.__name__, "--demo"],
        env=_launcher_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 0, output
    for name in SERVICES:
        assert re.search(
            rf"^  {name} +127\.0\.0\.1:\d+ +audience https://{name}\.mesh\.local$", output, re.M
        ), output
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
    assert "mesh: every service stopped cleanly" in output
    assert (tmp_path / "certs" / "ca.crt").is_file()
    assert _children_of(launcher.pid) == []


@pytest.mark.asyncio
async def test_a_service_that_cannot_start_is_reported_with_its_own_output(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path)
    broken = ("ROUTEGUIDE_DB", str(tmp_path / "nonexistent.json"))
    mesh.specs = [dataclasses.replace(s, env=(broken,)) if s.name == "routeguide" else s for s in mesh.specs]
    with pytest.raises(StartError) as error:
        async with mesh:
            pytest.fail("the mesh should not have started")
    message = str(error.value)
    assert message.startswith("routeguide exited with status 2; its output:"), message
    assert "ROUTEGUIDE_DB" in message and "nonexistent.json" in message
    # ping-upstream had started before routeguide failed; it was stopped, and nothing started after.
    assert set(mesh.processes) == {"ping-upstream", "routeguide"}
    assert all(process.returncode is not None for process in mesh.processes.values())
    assert _children_of(os.getpid()) == []


@pytest.mark.asyncio
async def test_the_mesh_listens_on_this_machine_only(tmp_path: Path) -> None:
    # A service (its health and reflection take no token), the span receiver and the identity emulator: none
    # may be reachable from the network the developer's machine is on.
    async with Mesh(tmp_path, only=["ping-upstream"]) as mesh:
        ports = {name: endpoint.port for name, endpoint in mesh.endpoints.items()}
        ports["spans"] = int(
            urlsplit(mesh.service_env(mesh.specs[0])["OTEL_EXPORTER_OTLP_ENDPOINT"]).port or 0
        )
        ports["certs"] = int(urlsplit(mesh.identity.certs_url).port or 0)
        ports["metadata"] = int(mesh.identity.metadata_host(DEVELOPER).rsplit(":", 1)[1])
        listening = {name: _listening_on(port) for name, port in ports.items()}
    assert set(listening) == {"ping-upstream", "spans", "certs", "metadata"}
    for name, addresses in listening.items():
        assert addresses and all(address.is_loopback for address in addresses), (name, addresses)


def test_the_demo_command_reports_a_service_that_cannot_start_and_exits_1(tmp_path: Path) -> None:
    # The launcher passes its own environment on to the services (minus the variables it sets itself).
    env = _launcher_env(tmp_path, ROUTEGUIDE_DB=str(tmp_path / "nonexistent.json"))
    launcher = subprocess.Popen(
        [sys.executable, "-m", main.__name__, "--demo"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 1, output
    assert "mesh: routeguide exited with status 2; its output:" in output
    assert "ROUTEGUIDE_DB" in output
    assert "The mesh is up" not in output
    assert _children_of(launcher.pid) == []


def test_the_printed_cli_commands_answer_as_pasted_while_the_mesh_serves(tmp_path: Path) -> None:
    # As a person runs it: `./pants run :mesh` in a folder (state in ./.mesh), commands pasted in a second shell.
    env = {k: v for k, v in _launcher_env(tmp_path).items() if k != "MESH_STATE_DIR"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", main.__name__, "--no-demo"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert launcher.stdout is not None
    output: list[str] = []
    try:
        for line in launcher.stdout:  # bounded: the launcher gives up on a service after 30 s
            output.append(line)
            if line.startswith("Serving until Ctrl-C."):
                break
        printed = [line.strip() for line in output if line.startswith("  .mesh/cli ")]
        assert len(printed) == 3, "".join(output)
        # The script holds the developer's metadata secret: no other user may read it.
        assert (tmp_path / ".mesh" / "cli").stat().st_mode & 0o077 == 0
        shell = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PEX", "GCE_METADATA"))}
        answers = {  # by the service the command calls: `... --audience AUD SERVICE RPC ...`
            command.split(" --audience ")[1].split()[1]: subprocess.run(
                ["bash", "-c", command], cwd=tmp_path, env=shell, capture_output=True, text=True, timeout=60
            )
            for command in printed
        }
    finally:
        launcher.send_signal(signal.SIGINT)
        rest, _ = launcher.communicate(timeout=60)
    for answer in answers.values():
        assert answer.returncode == 0, answer.stderr
    assert answers["routeguide"].stdout.startswith("Berkshire Valley Management Area Trail, Jefferson, NJ")
    assert re.match(r"pong \d+: 'hi \(relayed\)'", answers["ping"].stdout), answers["ping"].stdout
    assert re.search(r"^features: [1-9]\d* in the area", answers["aggregator"].stdout, re.M)
    assert "mesh: every service stopped cleanly" in rest
    assert not (tmp_path / ".mesh" / "cli").exists()  # a stale script would point at a mesh that is gone
