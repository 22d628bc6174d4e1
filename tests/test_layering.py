"""Who may import whom (docs/DESIGN.md, "Layers"), read from the source, so a wrong import fails
here before it becomes a circle or a twin that shares code with what it checks:

- the NumPy twins (fastlora/reference/) import nothing from the fast code, and the fast code
  nothing from them: what both need lives in fastlora.checks (validators) and fastlora.spec
  (definitions they must agree on), which import only NumPy and the standard library;
- the runtime (fastlora/_runtime/) imports only itself and the compiled kernels, each module only
  those listed before it in fastlora/_runtime/__init__.py, so there is no import circle.
"""
import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastlora"
SHARED = {"fastlora.checks", "fastlora.spec"}
RUNTIME_ORDER = ["threads", "blas", "openmp", "malloc", "process", "gemm", "attention"]


def _module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name):
    """A module of ours: a .py file, a package, or a compiled kernel (fastlora._ext.<csrc name>)."""
    path = ROOT.joinpath(*name.split("."))
    kernel = name.startswith("fastlora._ext.") and (ROOT / "csrc" / f"{path.name}.pyx").exists()
    return kernel or path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path):
    """Every module `path` imports, at any depth (function-level imports count too), as
    absolute names; `from a import b` gives a.b when a.b is a module of the package, else a."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if _is_module(sub) else base)
    return found


def _ours(names):
    return {n for n in names if n == "fastlora" or n.startswith("fastlora.")}


def _python_files(folder):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _third_party(names):
    stdlib = set(getattr(sys, "stdlib_module_names", ())) or {n.split(".")[0] for n in names}  # Python 3.10+
    return {n.split(".")[0] for n in names} - stdlib - {"fastlora"}


def test_the_import_reader_sees_each_kind_of_import():
    """A reader that saw nothing would pass every check below."""
    got = _imports(PACKAGE / "_runtime" / "attention.py")
    assert {"fastlora._runtime.blas", "fastlora._runtime.gemm", "fastlora._ext.attention", "numpy"} <= got
    assert "fastlora._runtime.blas" in _imports(PACKAGE / "_runtime" / "process.py")
    assert "fastlora.checks" in _imports(PACKAGE / "reference" / "bpe.py")


@pytest.mark.parametrize("path", _python_files(PACKAGE / "reference"), ids=lambda p: p.name)
def test_twins_import_no_fast_code(path):
    ours = _ours(_imports(path))
    bad = {n for n in ours if not n.startswith("fastlora.reference") and n not in SHARED}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: the twins stand alone"
    assert _third_party(_imports(path)) <= {"numpy"}


def test_fast_code_imports_no_twin():
    for path in _python_files(PACKAGE):
        if path.is_relative_to(PACKAGE / "reference") or path.is_relative_to(PACKAGE / "testing"):
            continue
        bad = {n for n in _ours(_imports(path)) if n.startswith("fastlora.reference")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: share it through fastlora.checks or .spec"


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_modules_depend_on_nothing_of_ours(name):
    names = _imports(PACKAGE / f"{name.split('.')[1]}.py")
    assert not _ours(names) and _third_party(names) <= {"numpy"}


def test_runtime_modules_import_only_those_before_them():
    folder = PACKAGE / "_runtime"
    assert sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__") == sorted(RUNTIME_ORDER), \
        "a runtime module is missing from RUNTIME_ORDER (and from fastlora/_runtime/__init__.py's list)"
    assert not _ours(_imports(folder / "__init__.py"))
    for i, stem in enumerate(RUNTIME_ORDER):
        allowed = {f"fastlora._runtime.{s}" for s in RUNTIME_ORDER[:i]} | {"fastlora._runtime"}
        ours = _ours(_imports(folder / f"{stem}.py"))
        kernels = {n for n in ours if n.startswith("fastlora._ext")}
        assert ours - kernels <= allowed, f"_runtime/{stem}.py imports {sorted(ours - kernels - allowed)}"
        if kernels:  # the kernels' package loads OpenMP through openmp, so only later modules load it
            assert i > RUNTIME_ORDER.index("openmp"), f"_runtime/{stem}.py loads kernels before openmp"


def test_compiled_kernels_package_needs_only_openmp():
    assert _ours(_imports(PACKAGE / "_ext" / "__init__.py")) == {"fastlora._runtime.openmp"}
