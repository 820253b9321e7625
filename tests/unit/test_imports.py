"""Imports go one way: the pure modules load with Ray and DeepSpeed made unimportable."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PURE = [
    "ensemble.config",
    "ensemble.models.members",
    "ensemble.losses",
    "ensemble.combine",
    "ensemble.training.loop",
    "ensemble.training.engine",
    "ensemble.training.stages",
    "ensemble.data",
    "ensemble.metrics",
    "ensemble.calibration",
    "ensemble.evaluate",
    "ensemble.tuning.objective",
    "ensemble.tuning.weights",
    "ensemble.inference",
    "ensemble.parts",
    "ensemble.distill",
    "ensemble.training.job",
]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_pure_modules_import_without_ray_or_deepspeed() -> None:
    proc = _run(f"""
        import importlib, sys
        sys.modules["ray"] = None  # `import ray` now raises ImportError
        sys.modules["deepspeed"] = None
        for name in {PURE!r}:
            importlib.import_module(name)

        # the torch engine works; the DeepSpeed one reaches for deepspeed only when built
        import torch
        from ensemble.training.engine import OptimSettings, make_engine
        model = torch.nn.Linear(2, 2)
        make_engine(model, OptimSettings(lr=0.1), backend="torch")
        try:
            make_engine(model, OptimSettings(lr=0.1), backend="deepspeed")
        except ImportError:
            print("deepspeed imported lazily")
        print("OK")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deepspeed imported lazily" in proc.stdout and "OK" in proc.stdout


def test_the_guard_really_blocks_ray() -> None:
    # the test above would be vacuous if a None entry in sys.modules did not block the import
    proc = _run("""
        import sys
        sys.modules["ray"] = None
        import ensemble.runner
    """)
    assert proc.returncode != 0 and "import of ray halted" in proc.stderr


def _imports(path: Path, package: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports, at module level or inside functions alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in package}
    return found


def test_the_package_has_no_import_cycle() -> None:
    package = {}
    for path in (REPO / "ensemble").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        package[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges = {m: _imports(p, package) - {m} for m, p in package.items()}
    # a cycle exists iff some module reaches itself
    for start in edges:
        seen, todo = set(), list(edges[start])
        while todo:
            module = todo.pop()
            assert module != start, f"{start} imports itself through the modules it imports"
            if module not in seen:
                seen.add(module)
                todo.extend(edges[module])
