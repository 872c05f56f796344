"""House rules the layout depends on."""

import ast
import importlib
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_platform_package_shadowing_stdlib():
    assert not (ROOT / "platform" / "__init__.py").exists(), (
        "platform/__init__.py would shadow stdlib 'platform'"
    )
    # stdlib platform still works inside the project
    assert platform.system()
    out = subprocess.run(
        [sys.executable, "-c", "import platform, astra; print(platform.python_version())"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == platform.python_version()


def test_astra_imports_from_platform_folder():
    astra = importlib.import_module("astra")
    assert Path(astra.__file__).resolve().parent == ROOT / "platform" / "astra"


def test_core_layers_do_not_import_ray_or_fastapi():
    for layer in ("model", "diffusion", "data", "config.py"):
        paths = (
            [ROOT / "platform" / "astra" / layer]
            if layer.endswith(".py")
            else list((ROOT / "platform" / "astra" / layer).rglob("*.py"))
        )
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                for n in names:
                    assert n.split(".")[0] not in {"ray", "fastapi"}, f"{path} imports {n}"
