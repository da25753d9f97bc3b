"""The house rules, read from the code: which package may import which, and how large a module
or a function may grow. Imports inside functions count as much as those at the top."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

PACKAGE = Path(os.environ.get("EDGETL_LAYOUT_ROOT", Path(__file__).resolve().parent.parent)) / "edgetl"
WORKFLOWS = ("predict", "bench", "demo", "cli")
# What each part of edgetl must not import (edgetl's own packages, and heavy runtimes).
FORBIDDEN = {
    "head": ("train", "export", "device", "bundle", "convert", *WORKFLOWS),
    "bundle": ("train", "export", "device", "convert", *WORKFLOWS),
    "convert": ("train", "export", "device", *WORKFLOWS),
    "train": ("export", "device", *WORKFLOWS),
    "export": ("device", *WORKFLOWS),
    "device": ("train", "export", "convert", *WORKFLOWS),
    "": ("train", "export", "device", "convert", *WORKFLOWS),  # the ground floor: edgetl/*.py
}
NEVER_ON_THE_DEVICE = ("tensorflow", "keras", "tf2onnx", "onnx")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100
pytestmark = pytest.mark.device  # pure Python: runs in the TensorFlow-free environment too


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, parts


def _imports(path: Path, parts: list[str]) -> list[tuple[int, str]]:
    """Every module ``path`` imports, absolute, with its line."""
    package = parts if path.name == "__init__.py" else parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                # "from . import x" may name a module: count each name as one
                out += [(node.lineno, f"{name}.{a.name}") for a in node.names] if not node.module else [
                    (node.lineno, name)]
            else:
                out.append((node.lineno, node.module))
    return out


def _part(parts: list[str]) -> str:
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else ""


def test_each_part_imports_only_what_lies_below_it():
    broken = []
    for path, parts in _modules():
        if len(parts) < 2:
            continue  # edgetl/__init__.py
        part = _part(parts)
        if part in WORKFLOWS:
            continue
        for line, name in _imports(path, parts):
            bits = name.split(".")
            if bits[0] == "edgetl" and len(bits) > 1 and bits[1] in FORBIDDEN[part]:
                broken.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
            if part == "device" and bits[0] in NEVER_ON_THE_DEVICE:
                broken.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} on the device side")
    assert not broken, "\n".join(broken)


def test_the_rule_sees_an_import_inside_a_function(tmp_path):
    """The checker itself: a forbidden import inside a function is found."""
    mod = tmp_path / "edgetl" / "device" / "x.py"
    mod.parent.mkdir(parents=True)
    mod.write_text("def f():\n    from ..train.run import Run\n")
    assert (2, "edgetl.train.run") in _imports(mod, ["edgetl", "device", "x"])


def test_export_reads_train_only_through_a_run_folder():
    ties = {name for path, parts in _modules() if _part(parts) == "export"
            for _, name in _imports(path, parts) if name.startswith("edgetl.train")}
    assert ties <= {"edgetl.train.run"}, ties


@pytest.mark.parametrize("limit", [MAX_MODULE_LINES])
def test_no_module_is_too_long(limit):
    long = {str(p.relative_to(PACKAGE.parent)): n for p, _ in _modules()
            if (n := len(p.read_text().splitlines())) > limit}
    assert not long, f"modules over {limit} lines: {long}"


def test_no_function_is_too_long():
    long = []
    for path, _ in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)
