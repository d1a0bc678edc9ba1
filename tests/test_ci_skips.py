"""The CI rule (tests/conftest.py): with CI set, a skipped test fails the run unless its reason is
hardware the machine lacks (a GPU, CUDA); without CI, skips are skips. Checked on throwaway test
files run by a real pytest subprocess with the suite's own conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from support import REPO

HARDWARE_ONLY = """
    import pytest

    def test_runs():
        assert True

    def test_needs_a_gpu():
        pytest.skip("needs a CUDA GPU (none here)")

    def test_needs_two_gpus():
        pytest.skip("needs 2 GPUs, found 0")

    @pytest.mark.xfail(reason="a known failure, not a skip")
    def test_expected_to_fail():
        assert False
"""

OTHER_SKIPS = """
    import pytest

    def test_plain_skip():
        pytest.skip("not today")

    def test_missing_module():
        pytest.importorskip("a_module_that_does_not_exist_anywhere")

    def test_missing_tool():
        pytest.skip("setpriv (util-linux) is missing")
"""

MODULE_SKIP = """
    import pytest

    pytest.skip("this whole module is skipped", allow_module_level=True)

    def test_never_collected():
        assert True
"""


def run_suite(folder, files: dict[str, str], ci: str | None) -> subprocess.CompletedProcess:
    for name in ("conftest.py", "support.py"):
        (folder / name).write_text((REPO / "tests" / name).read_text())
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)


def test_under_ci_only_missing_hardware_may_skip(tmp_path):
    files = {"test_hardware.py": HARDWARE_ONLY, "test_other.py": OTHER_SKIPS, "test_module.py": MODULE_SKIP}
    every = run_suite(tmp_path, files, "true")
    assert every.returncode == 1, every.stdout
    summary = every.stdout[every.stdout.index("Tests skipped under CI"):]
    for name in ("test_plain_skip (not today)", "test_missing_module (could not import",
                 "test_missing_tool (setpriv (util-linux) is missing)", "test_module.py (this whole module is skipped)"):
        assert name in summary, summary
    assert "test_needs_a_gpu" not in summary and "test_needs_two_gpus" not in summary
    assert "test_expected_to_fail" not in summary


def test_under_ci_a_missing_gpu_is_a_skip(tmp_path):
    hardware = run_suite(tmp_path, {"test_hardware.py": HARDWARE_ONLY}, "true")
    assert hardware.returncode == 0, hardware.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in hardware.stdout
    assert "skipped under CI" not in hardware.stdout


def test_without_ci_skips_are_skips(tmp_path):
    files = {"test_hardware.py": HARDWARE_ONLY, "test_other.py": OTHER_SKIPS, "test_module.py": MODULE_SKIP}
    local = run_suite(tmp_path, files, None)
    assert local.returncode == 0, local.stdout
    assert "skipped under CI" not in local.stdout
