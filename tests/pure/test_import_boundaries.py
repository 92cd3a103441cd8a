"""The import graph: stages -> (lifecycle, archive, config, runtime) -> core -> foundation, no circles.

- foundation: nemo_ft.errors, artifacts, peft, paths (standard library only);
- core: nemo_ft.data, plan, export, eval: no NeMo, torch, omegaconf or hydra, never a module above them,
  not even lazily inside a function (checked on the source, and by importing them in a fresh process);
- the config layer answers `--help`, `--cfg job` and config errors without NeMo, torch or Lightning.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_ft.paths import REPO_ROOT

PKG = REPO_ROOT / "nemo_ft"
FOUNDATION = ("nemo_ft.errors", "nemo_ft.artifacts", "nemo_ft.peft", "nemo_ft.paths")
CORE = [p for p in ("nemo_ft.data", "nemo_ft.plan", "nemo_ft.export", "nemo_ft.eval") if (REPO_ROOT / p.replace(".", "/")).is_dir()]
HEAVY = ("torch", "nemo", "nemo_aligner", "megatron", "lightning", "pytorch_lightning", "omegaconf", "hydra",
         "transformers", "peft", "safetensors", "tensorrt_llm", "vllm")
LIGHT = ("nemo_ft.cli", "nemo_ft.config.validate", "nemo_ft.config.entry", "nemo_ft.stages.plan", "nemo_ft.stages.prep")


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO_ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside a function, as dotted names."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                # `from pkg import mod` imports a module; `from mod import name` imports mod
                out.add(full if (REPO_ROOT / (full.replace(".", "/") + ".py")).exists()
                        or (REPO_ROOT / full.replace(".", "/")).is_dir() else base)
    return out


SOURCES = {module_name(p): p for p in PKG.rglob("*.py")}


def _under(name: str, roots) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


@pytest.mark.parametrize("module", [m for m in SOURCES if _under(m, CORE + list(FOUNDATION))])
def test_core_and_foundation_import_nothing_above_them(module):
    allowed = FOUNDATION if _under(module, FOUNDATION) else FOUNDATION + tuple(CORE)
    for name in imports_of(SOURCES[module]):
        assert name.split(".")[0] not in HEAVY, f"{module} imports {name}: the core must not depend on the NeMo stack"
        if name.split(".")[0] == "nemo_ft":
            assert _under(name, allowed), f"{module} imports {name}, a module above it"


def test_no_import_cycles_between_nemo_ft_modules():
    graph = {m: {i for i in imports_of(p) if i in SOURCES and i != m} for m, p in SOURCES.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_middle_layer_never_imports_stages():
    for module, path in SOURCES.items():
        if _under(module, ("nemo_ft.config", "nemo_ft.runtime", "nemo_ft.nemo_archive")):
            assert not any(_under(i, ("nemo_ft.stages",)) for i in imports_of(path)), module


def _loaded_after_import(modules) -> list[str]:
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {list(modules)!r}]; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip())


def test_core_imports_in_a_fresh_process_load_no_heavy_stack():
    core_modules = [m for m in SOURCES if _under(m, CORE + list(FOUNDATION))]
    loaded = _loaded_after_import(core_modules)
    assert not [m for m in loaded if m in HEAVY], loaded


def test_config_layer_answers_without_nemo_torch_or_lightning():
    loaded = _loaded_after_import(LIGHT)
    assert not [m for m in loaded if m in ("torch", "nemo", "megatron", "lightning", "transformers")], loaded
