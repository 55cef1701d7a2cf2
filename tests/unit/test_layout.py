"""The import rules of docs/architecture.md: the core (asynctc/*.py, and asynctc/testing/) imports no
plugin, plugins import nothing private of asynctc, and the architecture page names every module (so it
stays complete as modules come and go). The rules of asynctc.lowlevel itself are in
test_lowlevel_layout.py."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from asynctc.lowlevel.bpf import Bpf

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "asynctc"
PLUGINS = ROOT / "plugins"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

PLUGIN_PACKAGES = {"asynctc_bpf_link", "asynctc_netlink", "asynctc_mock"}
# The testing kit is an application of the public API: the mock_kernel fixture and the stress harness run
# on the in-memory kernel, so they may import the mock plugin, inside the function that uses it (never at
# module level, where importing them would need the plugin installed). The command line needs none (its
# demo without root takes the kernel a mock session made: `session.kernel`).
APPLICATION_PLUGIN_IMPORTS = {
    "asynctc/testing/pytest_plugin.py": {"asynctc_mock"},
    "asynctc/testing/_stress.py": {"asynctc_mock"},
}
# Backends written outside plugins/ that follow the same rules as the built-in ones.
OTHER_BACKENDS = [ROOT / "docs" / "examples" / "dummy_backend.py",
                  ROOT / "tests" / "fixtures" / "example_backend" / "asynctc_example" / "__init__.py"]


def _imports(tree: ast.Module) -> Iterator[tuple[ast.stmt, str, tuple[str, ...]]]:
    """Every absolute import of a module: (statement, module imported from, names imported from it)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            yield node, node.module, tuple(alias.name for alias in node.names)


def _top_package(module: str) -> str:
    return module.split(".", 1)[0]


def _core_modules() -> list[Path]:
    return sorted(CORE.glob("*.py")) + sorted((CORE / "testing").glob("*.py"))


def _plugin_modules() -> list[Path]:
    return sorted(PLUGINS.glob("*/**/*.py")) + OTHER_BACKENDS


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def plugin_imports(tree: ast.Module, allowed: set[str]) -> list[str]:
    """What a core module's imports break: a plugin package imported (other than `allowed` ones, and those
    only inside a function)."""
    out = []
    for node, module, _ in _imports(tree):
        package = _top_package(module)
        if package not in PLUGIN_PACKAGES:
            continue
        if package not in allowed:
            out.append(f"line {node.lineno}: imports the plugin {module}")
        elif node in tree.body:
            out.append(f"line {node.lineno}: imports {module} at module level; import it inside the function "
                       "that needs it")
    return out


def private_imports(tree: ast.Module) -> list[str]:
    """What a backend's imports break: a private module of asynctc, or a private name from one."""
    out = []
    for node, module, names in _imports(tree):
        if _top_package(module) != "asynctc":
            continue
        if any(part.startswith("_") for part in module.split(".")):
            out.append(f"line {node.lineno}: imports the private module {module}")
        out.extend(f"line {node.lineno}: imports the private name {name} from {module}"
                   for name in names if name.startswith("_"))
    return out


@pytest.mark.parametrize("path", _core_modules(), ids=_rel)
def test_the_core_imports_no_plugin(path: Path) -> None:
    broken = plugin_imports(ast.parse(path.read_text()), APPLICATION_PLUGIN_IMPORTS.get(_rel(path), set()))
    assert not broken, f"{_rel(path)}: {broken}; the core finds backends through the entry-point group " \
                       "'asynctc', never by import"


@pytest.mark.parametrize("path", _plugin_modules(), ids=_rel)
def test_plugins_import_nothing_private_of_asynctc(path: Path) -> None:
    broken = private_imports(ast.parse(path.read_text()))
    assert not broken, f"{_rel(path)}: {broken}; use the public API (asynctc, asynctc.backend, " \
                       "asynctc.events, asynctc.lowlevel)"


def test_the_plugin_list_is_the_installed_plugins() -> None:
    # If a plugin package is added under plugins/, the rule of the core must cover it too.
    assert {p.name for p in PLUGINS.iterdir() if (p / "__init__.py").is_file()} == PLUGIN_PACKAGES


def _documented_modules() -> set[str]:
    return set(re.findall(r"`(asynctc/[\w/]+\.py)`", ARCHITECTURE.read_text()))


def test_the_architecture_page_names_every_module() -> None:
    modules = sorted(CORE.glob("*.py")) + sorted((CORE / "lowlevel").glob("*.py")) \
        + sorted((CORE / "testing").glob("*.py"))
    missing = [_rel(p) for p in modules if _rel(p) not in _documented_modules()]
    assert not missing, f"docs/architecture.md does not name {missing}: add a row saying what each owns"


def test_the_architecture_page_names_no_module_that_is_gone() -> None:
    gone = sorted(m for m in _documented_modules() if not (ROOT / m).is_file())
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"


def test_the_rules_catch_what_they_forbid() -> None:
    # The checks above pass on the code as it is; these show they fail on each kind of violation.
    core = ast.parse("import asynctc_netlink\nfrom asynctc_mock import MockKernel\nimport asynctc.lowlevel.bpf\n")
    assert plugin_imports(core, set()) == ["line 1: imports the plugin asynctc_netlink",
                                           "line 2: imports the plugin asynctc_mock"]
    assert plugin_imports(core, {"asynctc_mock"}) == [
        "line 1: imports the plugin asynctc_netlink",
        "line 2: imports asynctc_mock at module level; import it inside the function that needs it",
    ]
    lazy = ast.parse("def demo() -> None:\n    from asynctc_mock import MockKernel\n")
    assert plugin_imports(lazy, {"asynctc_mock"}) == []
    assert plugin_imports(lazy, set()) == ["line 2: imports the plugin asynctc_mock"]

    backend = ast.parse("from asynctc._monitor import Fanout\nimport asynctc._errors\nfrom asynctc import _types\n"
                        "from asynctc.lowlevel import bpf\nfrom asynctc.backend import Backend\nimport asynctc\n")
    assert private_imports(backend) == ["line 1: imports the private module asynctc._monitor",
                                        "line 2: imports the private module asynctc._errors",
                                        "line 3: imports the private name _types from asynctc"]


@pytest.mark.parametrize("page", ["README.md", "docs/backends.md"])
def test_the_architecture_page_is_linked(page: str) -> None:
    target = "docs/architecture.md" if page == "README.md" else "architecture.md"
    assert f"]({target})" in (ROOT / page).read_text(), f"{page} does not link {target}"


def test_importing_asynctc_loads_no_netlink_codec() -> None:
    """`import asynctc` stays light: pyroute2 (the rtnetlink codec, ~0.2 s of imports) is loaded with the
    backends that use it, in the worker thread that loads plugins, never by the import itself."""
    import subprocess
    import sys

    code = "import sys, asynctc; print('pyroute2' in sys.modules, 'asynctc.lowlevel.codec' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# The real backends reach the kernel only through their session's kernel (`ctx.kernel`: the real one or a
# MockKernel), never through the module functions or the host's own calls, which always mean the real kernel.
KERNEL_BACKENDS = [PLUGINS / "asynctc_bpf_link" / "__init__.py", *sorted((PLUGINS / "asynctc_netlink").glob("*.py"))]
_BYPASSES = {
    "bpf": {name for name in dir(Bpf) if not name.startswith("_")},
    "pins": {"pin_object", "get_object", "unpin", "pin_over", "rename_over", "read_pinned_value"},
    "os": {"close", "dup", "memfd_create"},
    "socket": {"if_nametoindex", "if_indextoname", "socket"},
    "fcntl": {"ioctl"},
    "tcpolicy": {"process_alive"},
}


# Helpers that take the kernel and default to the real one: a call must say which (keyword `kernel`, or
# `names` for resolve_device's DeviceNames, or the argument at this position).
_KERNEL_ARGS = {"start_transport": None, "open_transport": None, "open_multicast_socket": None,
                "open_netlink_event_source": None, "read_record": None, "write_record": None,
                "rewrite_record": None, "resolve_device": 2, "ProgNameCache": 0}
# the real kernel's locks (`ctx.kernel.device_locks`/`pin_claim`) and device names (`open_device_names`)
_HOST_ONLY = {"DeviceLocks", "PinClaim", "SocketDeviceNames"}


def kernel_bypasses(tree: ast.Module) -> list[str]:
    """Calls that reach the kernel without `ctx.kernel`: `bpf.link_info(...)`, `os.close(...)`, a bare
    `process_alive(...)`, a helper left to its default kernel (`start_transport(runner)`), the host's own
    locks (`DeviceLocks(...)`)..."""
    bare = {name for names in _BYPASSES.values() for name in names if name not in ("close", "dup", "socket")}
    # `from m import f as g`: a call of g is a call of f
    aliases = {a.asname: a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for a in node.names if a.asname is not None}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else aliases.get(f.id, f.id) if isinstance(f, ast.Name) else ""
        if name in _KERNEL_ARGS:
            pos = _KERNEL_ARGS[name]
            said = any(k.arg in ("kernel", "calls", "names") for k in node.keywords)
            if not said and (pos is None or len(node.args) <= pos):
                out.append(f"line {node.lineno}: {name}(...) without its kernel")
            continue
        if name in _HOST_ONLY:
            out.append(f"line {node.lineno}: {name}(...)")
            continue
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.attr in _BYPASSES.get(f.value.id, ()):
            out.append(f"line {node.lineno}: {f.value.id}.{f.attr}(...)")
        elif isinstance(f, ast.Name) and name in bare:
            out.append(f"line {node.lineno}: {f.id}(...)")
    return out


def test_kernel_bypasses_are_found() -> None:
    tree = ast.parse("bpf.link_info(fd)\nos.close(fd)\nself.kernel.bpf.link_info(fd)\nprocess_alive(1, 's')\n"
                     "socket.if_indextoname(3)\nk.pins.unpin(p)\npins.unpin(p)\nstart_transport(r)\n"
                     "start_transport(r, kernel=k)\nresolve_device(d, n)\nresolve_device(d, n, k)\n"
                     "hooklib.ProgNameCache()\nDeviceLocks(1)\nfcntl.ioctl(s, 0x8933, b'')\n"
                     "from asynctc.lowlevel.netdev import resolve_device as here\nhere(d, n)\nhere(d, n, names)\n"
                     "kernel.SocketDeviceNames()\nself.ctx.kernel.open_device_names()\n")
    assert kernel_bypasses(tree) == ["line 1: bpf.link_info(...)", "line 2: os.close(...)",
                                     "line 4: process_alive(...)", "line 5: socket.if_indextoname(...)",
                                     "line 7: pins.unpin(...)", "line 8: start_transport(...) without its kernel",
                                     "line 10: resolve_device(...) without its kernel",
                                     "line 12: ProgNameCache(...) without its kernel", "line 13: DeviceLocks(...)",
                                     "line 14: fcntl.ioctl(...)", "line 16: resolve_device(...) without its kernel",
                                     "line 18: SocketDeviceNames(...)"]


@pytest.mark.parametrize("path", KERNEL_BACKENDS, ids=_rel)
def test_the_real_backends_reach_the_kernel_only_through_ctx_kernel(path: Path) -> None:
    assert kernel_bypasses(ast.parse(path.read_text())) == [], (
        f"{_rel(path)} calls the kernel around its session's kernel: use self.ctx.kernel (bpf, pins, "
        "if_nametoindex, open_device_names, session_alive...) so that it runs on a MockKernel too")
