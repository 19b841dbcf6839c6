"""The contract checks (build-support/contracts) on a temporary git copy of protos/: each change that breaks a
caller on the previous commit's contract fails with buf's own line naming the file, the message and the field
(or the service and the method); what callers cannot see passes; and buf.yaml's lint exceptions cover the
published contracts only.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from contracts.check.__main__ import FINDINGS, UNUSABLE, main

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, timeout=60)


def commit(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", message)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository whose first commit holds today's protos/ (buf.yaml and every .proto)."""
    repo = tmp_path / "repo"
    shutil.copytree(PROTOS, repo / "protos", ignore=shutil.ignore_patterns("BUILD"))
    assert (repo / "protos" / "buf.yaml").is_file() and list((repo / "protos").rglob("*.proto"))
    git(repo, "init", "-q")
    commit(repo, "today's contracts")
    return repo


def change(repo: Path, proto: str, old: str, new: str) -> None:
    """Commits `old` replaced by `new` in protos/PROTO: the check then compares HEAD with HEAD~1, as CI does."""
    path = repo / "protos" / proto
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {proto}"
    path.write_text(text.replace(old, new))
    commit(repo, f"edit {proto}")


def check(repo: Path, capfd: pytest.CaptureFixture[str], against: str = "HEAD~1") -> tuple[int, str]:
    code = main(["--root", str(repo), "--against", against])
    out, err = capfd.readouterr()
    return code, out + err


def buf_says(output: str, proto: str, finding: str) -> bool:
    """buf printed `finding` about protos/PROTO, at some line and column (the line numbers move with edits)."""
    return re.search(rf"^{re.escape(proto)}:\d+:\d+:{re.escape(finding)}", output, re.MULTILINE) is not None


def test_the_contracts_of_today_pass_lint_and_break_nothing(
    repo: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Lint passes only through buf.yaml's exceptions: the public samples' names are kept as they are.
    code, output = check(repo, capfd, against="HEAD")
    assert code == 0, output
    assert "buf lint: clean" in output and "buf breaking against HEAD: nothing breaks" in output


# Each change breaks a caller still on the previous commit's contract; buf names the file, message and field
# (or service and method). (proto, old text, new text, buf's finding, why a caller breaks)
BREAKING = {
    "a renumbered field": (
        "routeguide/route_guide.proto",
        "int32 latitude = 1;",
        "int32 latitude = 5;",
        'Previously present field "1" with name "latitude" on message "Point" was deleted without reserving'
        ' the number "1".',
    ),
    "a removed method": (
        "ping/ping.proto",
        "  // Relays the message to the configured upstream's Send and returns its Pong.\n"
        "  rpc SendUpstream(Request) returns (Response);\n",
        "",
        'Previously present RPC "SendUpstream" on service "PingService" was deleted.',
    ),
    # The service's name is in every request's path: its callers would get UNIMPLEMENTED.
    "a renamed service": (
        "aggregator/v1/aggregator.proto",
        "service Aggregator {",
        "service AggregatorService {",
        'Previously present service "Aggregator" was deleted from package "aggregator.v1".',
    ),
    "a changed field type": (
        "aggregator/v1/aggregator.proto",
        "  int32 code = 2;",
        "  string code = 2;",
        'Field "2" with name "code" on message "DownstreamCall" changed type from "int32" to "string".',
    ),
    # Same number and type, so the binary encoding survives; a JSON caller (a call through reflection) breaks.
    "a renamed field": (
        "routeguide/route_guide.proto",
        "  string message = 2;",
        "  string text = 2;",
        'Field "2" on message "RouteNote" changed name from "message" to "text".',
    ),
}


@pytest.mark.parametrize("proto, old, new, finding", BREAKING.values(), ids=BREAKING.keys())
def test_a_breaking_change_fails_with_bufs_own_line(
    repo: Path, capfd: pytest.CaptureFixture[str], proto: str, old: str, new: str, finding: str
) -> None:
    change(repo, proto, old, new)
    code, output = check(repo, capfd)
    assert code == FINDINGS
    assert buf_says(output, proto, finding), output
    assert "add a new package version beside the old one" in output


def test_an_added_field_and_an_added_method_pass(repo: Path, capfd: pytest.CaptureFixture[str]) -> None:
    change(
        repo,
        "aggregator/v1/aggregator.proto",
        "  repeated routeguide.Point route = 3;\n}",
        "  repeated routeguide.Point route = 3;\n  // Added: old callers leave it unset.\n  int32 limit = 4;\n}",
    )
    change(
        repo,
        "aggregator/v1/aggregator.proto",
        "  rpc Tour(stream TourStop) returns (stream TourUpdate);\n}",
        "  rpc Tour(stream TourStop) returns (stream TourUpdate);\n\n"
        "  // Added: old callers never call it.\n"
        "  rpc Count(CountRequest) returns (CountResponse);\n}\n\n"
        "message CountRequest {}\n\nmessage CountResponse {\n  int32 count = 1;\n}",
    )
    code, output = check(repo, capfd, against="HEAD~2")
    assert code == 0, output
    assert "buf breaking against HEAD~2: nothing breaks" in output


def test_an_intended_break_is_a_new_package_version_beside_the_old_one(
    repo: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # routeguide.v2 renumbers and retypes what v1 has; v1 stays for its callers, so nothing breaks. A new
    # version is held to buf's STANDARD rules, without the exceptions of the published contracts.
    v2 = repo / "protos" / "routeguide" / "v2"
    v2.mkdir()
    (v2 / "route_guide.proto").write_text(
        'syntax = "proto3";\n\npackage routeguide.v2;\n\n'
        "service RouteGuideService {\n  rpc GetFeature(GetFeatureRequest) returns (GetFeatureResponse);\n}\n\n"
        "message GetFeatureRequest {\n  int64 latitude = 1;\n  int64 longitude = 2;\n}\n\n"
        "message GetFeatureResponse {\n  string name = 1;\n}\n"
    )
    commit(repo, "routeguide.v2")
    code, output = check(repo, capfd)
    assert code == 0, output


def test_a_new_contract_gets_no_exception(repo: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # The exceptions are per file: a new service named like the samples' fails buf's STANDARD rules.
    orders = repo / "protos" / "orders" / "v1"
    orders.mkdir(parents=True)
    (orders / "orders.proto").write_text(
        'syntax = "proto3";\n\npackage orders.v1;\n\n'
        "service Orders {\n  rpc Get(Order) returns (Order);\n}\n\nmessage Order {\n  string id = 1;\n}\n"
    )
    commit(repo, "orders.v1")
    code, output = check(repo, capfd)
    assert code == FINDINGS
    assert buf_says(
        output, "orders/v1/orders.proto", 'Service name "Orders" should be suffixed with "Service".'
    )
    assert buf_says(output, "orders/v1/orders.proto", 'RPC request type "Order" should be named "GetRequest"')


def test_a_base_that_is_not_a_commit_here_is_said(repo: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, output = check(repo, capfd, against="HEAD~5")
    assert code == UNUSABLE
    assert "contracts: cannot compare: 'HEAD~5' is not a commit in" in output
