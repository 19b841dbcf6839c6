"""The default worker count: the container's CPU quota, read from its cgroup (v2 or v1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.settings import ConfigError
from mesh.workers import cpu_quota, worker_count


def _v2(root: Path, cpu_max: str) -> Path:
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def _v1(root: Path, quota: str, period: str = "100000") -> Path:
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(period + "\n")
    return root


@pytest.mark.parametrize(
    "cpu_max, expected",
    [
        ("200000 100000", 2),
        ("100000 100000", 1),
        ("150000 100000", 2),
        ("50000 100000", 1),
        ("max 100000", 1),
    ],
)
def test_cgroup_v2_quota_in_whole_cpus_rounded_up(tmp_path: Path, cpu_max: str, expected: int) -> None:
    assert cpu_quota(_v2(tmp_path, cpu_max)) == expected


@pytest.mark.parametrize("quota, expected", [("400000", 4), ("-1", 1), ("25000", 1)])
def test_cgroup_v1_quota(tmp_path: Path, quota: str, expected: int) -> None:
    assert cpu_quota(_v1(tmp_path, quota)) == expected


def test_no_readable_quota_means_one_worker(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path) == 1
    assert cpu_quota(_v2(tmp_path, "garbage")) == 1


def test_worker_processes_overrides_the_quota_and_is_checked(tmp_path: Path) -> None:
    cgroup = _v2(tmp_path, "200000 100000")
    assert worker_count({}, cgroup) == 2
    assert worker_count({"WORKER_PROCESSES": "3"}, cgroup) == 3
    with pytest.raises(
        ConfigError, match=r"^WORKER_PROCESSES='0' is not valid; set WORKER_PROCESSES to an integer"
    ):
        worker_count({"WORKER_PROCESSES": "0"}, cgroup)
