"""What a fresh install needs: every import declared in pyproject.toml, package data in the wheel."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hf_decompose import DecomposeError, card

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
LOCAL = {"hf_decompose", "tests"} | {p.stem for p in (ROOT / "benchmarks").glob("*.py")}


def _imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports of one file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _third_party(files: list[Path]) -> dict[str, set[str]]:
    """Third-party import name -> the files importing it; local benchmark modules are followed."""
    found: dict[str, set[str]] = {}
    todo, seen = list(files), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            if name in LOCAL:
                todo += [p for p in [ROOT / "benchmarks" / f"{name}.py"] if p.is_file()]
            elif name not in sys.stdlib_module_names:
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def _normalized(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def _declared(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    return {_normalized(r) for r in requirements}


def _distribution(module: str) -> str:
    names = importlib.metadata.packages_distributions().get(module)
    assert names, f"{module} is imported but installed by no distribution"
    return _normalized(names[0])


@pytest.mark.parametrize(
    ("folders", "extras"),
    [(["hf_decompose"], ()), (["hf_decompose", "tests"], ("test",)), (["hf_decompose", "tests", "benchmarks"], ("test", "bench"))],
)
def test_every_third_party_import_is_declared(folders, extras):
    files = [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]
    imports = _third_party(files)
    assert {"torch", "transformers", "matplotlib"} <= set(imports)  # the scan sees the package's imports
    declared = _declared(*extras)
    missing = {name: sorted(where) for name, where in imports.items() if _distribution(name) not in declared}
    assert not missing, f"imported but not declared in pyproject.toml {list(extras) or 'dependencies'}: {missing}"


def test_import_leaves_datasets_and_evaluate_until_used():
    """`import hf_decompose` needs neither (only prompt files and the `evaluate` metric do): a machine without them
    can still load, decompose and serve."""
    code = "import sys, hf_decompose; print(sorted(m for m in ('datasets', 'evaluate') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]"


def test_torch_is_a_range_that_keeps_an_installed_build():
    (torch,) = [r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] if _normalized(r) == "torch"]
    assert "==" not in torch and ">=" in torch, torch


def test_wheel_ships_the_card_template_and_the_kernel_source(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT / "hf_decompose", source / "hf_decompose", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("hf_decompose-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_decompose/templates/model_card.md" in names
    assert "hf_decompose/metrics/generation_equivalence/generation_equivalence.py" in names
    assert {"hf_decompose/kernels/codes_matmul.c", "hf_decompose/kernels/bits16.c", "hf_decompose/kernels/feedback.c"} <= set(names)  # compiled on first use


def test_card_template_is_read_from_the_package():
    assert card.card_template() == (ROOT / "hf_decompose" / "templates" / "model_card.md").read_text(encoding="utf-8")
    rendered = card.render_card({"base_model": {"id": "org/base"}, "finetuned_model": {"id": "org/ft"}}, {"mode": "lossless"})
    assert "registers the \"hf_decompose\" quantization method" in rendered and "base_model: org/base" in rendered


def test_missing_card_template_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(card, "TEMPLATE", ("templates", "missing.md"))
    with pytest.raises(DecomposeError, match="model-card template .*missing.md is missing from the installed hf_decompose package"):
        card.render_card({}, {})
