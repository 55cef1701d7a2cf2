"""The pytest plugin as another project sees it: loaded through the `pytest11` entry point (no `-p`), its
fixtures and the `kernel` marker working under `--strict-markers`, configurable namespace prefixes, and no
effect on a project that does not use it. Each case is a small project in a temporary directory, run by
`python -m pytest` in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from asynctc.testing import kernel_test_skip_reason

PYPROJECT = """\
[tool.pytest.ini_options]
trio_mode = true
addopts = "--strict-markers -p no:cacheprovider"
filterwarnings = ["error"]
{extra}
"""

APP_TESTS = '''
import os

import pytest

import asynctc


def test_a_fresh_mock_kernel(mock_kernel):
    assert set(mock_kernel.devices()) == {"lo", "eth0", "veth0", "veth1"}
    mock_kernel.remove_device("eth0")  # the next test gets its own kernel


async def test_the_mock_session_detaches_on_exit(mock_kernel, mock_session):
    assert set(mock_kernel.devices()) == {"lo", "eth0", "veth0", "veth1"}
    prog = mock_kernel.program("drop")
    async with mock_session.open_attachment("eth0", "ingress", prog):
        assert mock_kernel.send("eth0", "ingress") == "drop"
    assert mock_kernel.send("eth0", "ingress") == "pass"


@pytest.mark.kernel
def test_namespaces_carry_the_configured_prefixes(netns, peer_netns):
    assert netns.startswith("myapp") and peer_netns.startswith("myfar")
    assert os.path.exists(f"/run/netns/{netns}")


@pytest.mark.kernel
async def test_a_real_session_in_a_fresh_namespace(kernel_session, veth):
    assert kernel_session.backend_name in ("bpf_link", "netlink")
    hook = await kernel_session.query(veth.a, "ingress")
    assert hook.entries == ()


@pytest.mark.kernel
def test_a_private_bpffs(bpffs):
    assert os.path.ismount(bpffs)
'''


def run_project(tmp_path: Path, tests: str, *args: str, extra_ini: str = "",
                conftest: str = "") -> subprocess.CompletedProcess[str]:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT.format(extra=extra_ini))
    (tmp_path / "test_app.py").write_text(textwrap.dedent(tests))
    if conftest:
        (tmp_path / "conftest.py").write_text(textwrap.dedent(conftest))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-rs", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)


def outcome(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    last = proc.stdout.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}


def test_a_project_uses_the_fixtures_and_the_marker_without_enabling_anything(tmp_path: Path) -> None:
    proc = run_project(tmp_path, APP_TESTS,
                       extra_ini='asynctc_netns_prefix = "myapp"\nasynctc_peer_netns_prefix = "myfar"')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    why = kernel_test_skip_reason()
    if why is None:
        assert outcome(proc) == {"passed": 5}, proc.stdout
    else:
        assert outcome(proc) == {"passed": 2, "skipped": 3}, proc.stdout
        assert f"real-kernel test: {why}" in proc.stdout


def test_the_command_line_option_overrides_the_ini_prefix(tmp_path: Path) -> None:
    tests = '''
    import pytest

    @pytest.mark.kernel
    def test_prefix(netns):
        assert netns.startswith("cliprefix")
    '''
    proc = run_project(tmp_path, tests, "--asynctc-netns-prefix", "cliprefix", extra_ini='asynctc_netns_prefix = "x"')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert outcome(proc) == ({"passed": 1} if kernel_test_skip_reason() is None else {"skipped": 1})


def test_a_bad_prefix_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_project(tmp_path, "def test_nothing():\n    pass\n", "--asynctc-netns-prefix", "a/b")
    assert proc.returncode == 4  # pytest's exit code for a usage error
    assert "--asynctc-netns-prefix / asynctc_netns_prefix must be 1 to 32 letters" in proc.stderr
    assert "'a/b'" in proc.stderr


def test_a_project_that_does_not_use_it_is_unaffected(tmp_path: Path) -> None:
    # its own `netns` fixture wins over the plugin's, and nothing is skipped or created
    conftest = '''
    import pytest

    @pytest.fixture
    def netns():
        return "the project's own"
    '''
    tests = '''
    def test_own_fixture(netns):
        assert netns == "the project's own"

    def test_plain():
        assert 1 + 1 == 2
    '''
    proc = run_project(tmp_path, tests, conftest=conftest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert outcome(proc) == {"passed": 2}


def test_it_can_be_disabled_by_name(tmp_path: Path) -> None:
    proc = run_project(tmp_path, "def test_uses(mock_kernel):\n    pass\n", "-p", "no:asynctc")
    assert proc.returncode == 1
    assert "fixture 'mock_kernel' not found" in proc.stdout
