"""The shape of the house, checked: small files, no import cycle (between modules or between
rooms), no ``sys.path`` edits, no private name imported across files, one home for Swin facts
and for the tile sizes.

Read from the source with ``ast`` (nothing is imported), so a violation is named by file and line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dimap_fast"
KERNELS = ROOT / "kernels"
BENCH = ROOT / "bench"
TESTS = ROOT / "tests"
MAX_LINES = 400

# What only dimap_fast/arch/ may name: Swin classes (timm's and Hugging Face's) and Swin parameter
# patterns. nn/'s drop-in modules subclass timm's classes by design; tests and bench are not checked.
SWIN_CLASS = re.compile(r"^(Swin\w*|WindowAttention\w*|WindowMultiHeadAttention)$")
SWIN_PARAM = re.compile(r"attn\.qkv|attn\.proj|mlp\.fc[12]|relative_position_bias|logit_scale|cpb_mlp"
                        r"|blocks\.\*|attention\.self|q_proj|o_proj|intermediate\.dense")
DROP_INS = {"__init__.py", "cpu_inference.py", "drop_ins.py", "fused_block.py", "swin_block.py", "swinv2.py",
            "window_attention.py"}


def _sources(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ["dimap_fast", "kernels", *path.relative_to(KERNELS).with_suffix("").parts]
    elif path.is_relative_to(BENCH):  # bench/ runs with bench/ itself on the path (pytest, scripts)
        parts = list(path.relative_to(BENCH).with_suffix("").parts)
    else:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports, anywhere in the file (lazy imports count too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from .x import y" imports x.y when y is a module, else x itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def test_no_file_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in _sources(PACKAGE, KERNELS, BENCH, TESTS, ROOT / "scripts")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def _graph() -> dict[str, set[str]]:
    paths = _sources(PACKAGE, KERNELS, BENCH)
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules) for p in paths}
    # a package imports its own submodules to re-export them; that is not a cycle of the house
    return {mod: {d for d in deps if not mod.startswith(d + ".")} for mod, deps in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(mod, stack):
        state[mod] = "open"
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    return cycles


def _room(module: str) -> str:
    """The room a module lives in: its subpackage of dimap_fast (arch, engine, io, nn, ...), or the
    module itself for the verbs and helpers at the top; bench/'s files and packages likewise."""
    parts = module.split(".")
    if parts[0] != "dimap_fast" or len(parts) == 1:
        return parts[0]
    if parts[1] == "kernels" or (PACKAGE / parts[1] / "__init__.py").exists():
        return ".".join(parts[:2])
    return module


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_two_rooms_import_each_other():
    # Between rooms, not only modules: arch importing nn on demand while nn imports arch is a tie
    # even when no two modules close a cycle. The package root (the public API) is left out: it
    # imports every room by design and no room may import it back (the module cycle check sees that).
    rooms: dict[str, set[str]] = {}
    for mod, deps in _graph().items():
        if mod == "dimap_fast":
            continue
        rooms.setdefault(_room(mod), set()).update(_room(d) for d in deps if _room(d) != _room(mod))
    cycles = _cycles(rooms)
    assert not cycles, "rooms that import each other: " + "; ".join(" -> ".join(c) for c in cycles)


def _edits_sys_path(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value  # sys.path.insert(...), sys.path.append(...)
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            target = next((t.value if isinstance(t, ast.Subscript) else t for t in targets
                           if isinstance(t, (ast.Attribute, ast.Subscript))), None)
        if (isinstance(target, ast.Attribute) and target.attr == "path"
                and isinstance(target.value, ast.Name) and target.value.id == "sys"):
            lines.append(node.lineno)
    return sorted(lines)


def test_no_sys_path_edits():
    found = {str(p.relative_to(ROOT)): lines for p in _sources(PACKAGE, KERNELS, BENCH, TESTS)
             if (lines := _edits_sys_path(ast.parse(p.read_text(encoding="utf-8"))))}
    assert not found, f"sys.path edited (a package, pytest's pythonpath or python -m does it): {found}"


def _private_imports(path: Path, local: frozenset = frozenset()) -> list[str]:
    """Private names imported from the project's own files (relative, dimap_fast, or a module in
    ``local``). Exempt: the Triton kernels of a ``*_kernels`` module, private by Triton's naming."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        ours = node.level or module.split(".")[0] in {"dimap_fast", "kernels", *local}
        if ours and not module.endswith("_kernels"):
            hits += [f"{node.lineno}: {a.name}" for a in node.names
                     if a.name.startswith("_") and not a.name.startswith("__")]
    return hits


def test_no_private_name_imported_across_files():
    paths = _sources(PACKAGE, KERNELS, BENCH, TESTS)
    local = frozenset(p.stem for p in paths if not p.is_relative_to(PACKAGE))
    found = {str(p.relative_to(ROOT)): hits for p in paths if (hits := _private_imports(p, local))}
    assert not found, f"private names imported from another file (make them public or keep them home): {found}"


TILE_SIZES = re.compile(r"\(\s*16\s*,\s*32\s*,\s*64\s*\)")


def test_one_home_for_the_tile_sizes():
    homes = [f"{p.relative_to(ROOT)}:{n}" for p in _sources(PACKAGE, KERNELS, BENCH)
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if TILE_SIZES.search(line.split("#")[0])]
    assert len(homes) == 1, f"the tile sizes (16, 32, 64) written more than once: {homes}"


def test_kernels_import_nothing_from_the_engine():
    paths = _sources(PACKAGE, KERNELS)
    modules = {_module_name(p) for p in paths}
    for path in _sources(KERNELS):
        outside = {m for m in _imports(path, modules) if not m.startswith("dimap_fast.kernels")}
        assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}: kernels/ holds Triton kernels only"


def _swin_names(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and SWIN_CLASS.match(node.id):
            hits.append(f"{node.lineno}: {node.id}")
        elif isinstance(node, ast.Attribute) and (SWIN_CLASS.match(node.attr) or SWIN_PARAM.search(node.attr)):
            hits.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.alias) and SWIN_CLASS.match(node.name.rpartition(".")[2]):
            hits.append(f"import {node.name}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and SWIN_PARAM.search(node.value)):
            hits.append(f"{node.lineno}: {node.value[:60]!r}")
    return hits


def test_swin_facts_live_in_arch_only():
    found = {}
    for path in _sources(PACKAGE, KERNELS):
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("dimap_fast", "arch") or (rel.parts[:2] == ("dimap_fast", "nn") and path.name in DROP_INS):
            continue
        hits = _swin_names(path)
        if hits:
            found[str(rel)] = hits[:3]
    assert not found, f"Swin classes or parameter patterns outside dimap_fast/arch/: {found}"


def test_the_checks_see_what_they_look_for(tmp_path):
    # the scanners are only worth something if they fire: feed them a file that breaks each rule
    bad = tmp_path / "bad.py"
    bad.write_text('"""Swin docs may say attn.qkv."""\nfrom timm.models.swin_transformer import SwinTransformer\n'
                   'PATTERN = "*blocks.*.attn.qkv.weight"\nx = model.relative_position_bias_table\n'
                   'import sys\nsys.path.insert(0, "x")\nsys.path[:0] = ["y"]\nfrom .a import _hidden, __version__\n'
                   'from timm.layers import _fx\nfrom .window_attention_kernels import _fwd\n')
    hits = _swin_names(bad)
    assert len(hits) == 3 and not any("docs" in h for h in hits), hits
    assert _edits_sys_path(ast.parse(bad.read_text())) == [6, 7]
    assert _private_imports(bad) == ["8: _hidden"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b", "a"]]
    assert _room("dimap_fast.nn.convert") == "dimap_fast.nn" and _room("dimap_fast.shrink") == "dimap_fast.shrink"
    assert TILE_SIZES.search("BLOCKS = (16, 32,64)")
