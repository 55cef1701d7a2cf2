"""The reference docs cover the whole public surface: every hook has its own section in docs/backends.md
(and a tested example), every name re-exported by asynctc/__init__.py appears in docs/api.md."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import asynctc
from asynctc import hookspecs

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _hook_names() -> list[str]:
    return sorted(
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("asynctc_") and hasattr(fn, "asynctc_spec")
    )


def _public_names() -> list[str]:
    """The names asynctc/__init__.py re-exports (`from x import Name as Name`), plus its own globals."""
    tree = ast.parse((ROOT / "asynctc" / "__init__.py").read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            names.update(a.asname for a in node.names if a.asname is not None and a.asname == a.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return sorted(names)


def test_the_hooks_are_found() -> None:
    assert _hook_names() == ["asynctc_attachment_event", "asynctc_register_backends", "asynctc_select_backend"]


def test_the_public_names_are_found() -> None:
    names = _public_names()
    assert {"open_session", "Session", "Attachment", "TCError", "events", "__version__"} <= set(names)
    assert all(hasattr(asynctc, n) for n in names)


@pytest.mark.parametrize("hook", _hook_names())
def test_every_hook_has_a_section_in_backends_md(hook: str) -> None:
    text = (DOCS / "backends.md").read_text()
    match = re.search(rf"^###\s+`?{hook}`?\s*$(.*?)(?=^#{{1,3}}\s)", text, flags=re.M | re.S)
    assert match, f"docs/backends.md has no '### {hook}' section"
    section = match.group(1)
    assert f"def {hook}(" in section, f"the {hook} section does not show the signature"
    assert "Use cases" in section, f"the {hook} section does not list use cases"
    assert "```python" in section, f"the {hook} section has no tested example"


@pytest.mark.parametrize("hook", _hook_names())
def test_every_hook_has_a_tested_example(hook: str) -> None:
    examples = (Path(__file__).parent / "test_docs_examples.py").read_text()
    assert f"def {hook}(" in examples, f"no example implements {hook} in test_docs_examples.py"


@pytest.mark.parametrize("name", _public_names())
def test_every_public_name_is_in_api_md(name: str) -> None:
    text = (DOCS / "api.md").read_text()
    assert re.search(rf"`[^`\n]*(?<![\w.]){re.escape(name)}\b[^`\n]*`", text) or re.search(
        rf"^#+ .*\b{re.escape(name)}\b", text, flags=re.M
    ), f"docs/api.md does not mention `{name}`"
