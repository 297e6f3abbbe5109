"""The package's layering (docs/architecture.md), checked on the source with ``ast``.

1. A module imports only from its own layer or lower ones.
2. Imports sit at the top of a module; one inside a function needs a one-line reason as a
   comment on its line or the line above (CLI start-up time, an optional dependency).
3. docs/architecture.md names every module, under the layer it has here.
"""
import ast
import io
import re
import tokenize
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "s2dm"

# A module's layer is that of its first package component under s2dm (s2dm/core/unet.py →
# core), or of its own name for a top-level module (s2dm/cli.py → cli).
LAYERS: Dict[str, int] = {
    "errors": 0, "_version": 0,
    "core": 1, "util": 1,
    "samplers": 2, "io": 2,
    "training": 3, "metrics": 3, "interop": 3, "sampling": 3,
    "study": 4,
    "cli": 5, "cli_errors": 5, "__init__": 5, "__main__": 5,
}


def source_files() -> List[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def module_of(path: Path) -> Tuple[str, bool]:
    """(dotted name, is a package's __init__) of a file under s2dm/."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def layer_of(dotted: str) -> Optional[int]:
    """The layer of an s2dm module (or of a name in it); None for anything outside s2dm."""
    parts = dotted.split(".")
    if parts[0] != "s2dm":
        return None
    if len(parts) == 1:
        return LAYERS["__init__"]
    first = parts[1]
    if not ((PACKAGE / first).is_dir() or (PACKAGE / f"{first}.py").is_file()):
        return LAYERS["__init__"]  # `from s2dm import load_checkpoint`: a name of the package itself
    if first not in LAYERS:
        raise AssertionError(f"s2dm/{first} has no layer: add it to LAYERS here and to docs/architecture.md")
    return LAYERS[first]


def imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[Tuple[int, str]]:
    """(line, absolute dotted target) of every import in the tree, relative ones resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]  # a module's imports are relative to its package
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if node.module is None or target == "s2dm":  # `from . import x`: x may be a module
                for alias in node.names:
                    yield node.lineno, f"{target}.{alias.name}"
            else:
                yield node.lineno, target


def test_every_module_has_a_layer():
    for path in source_files():
        module, _ = module_of(path)
        assert layer_of(module) is not None, path


def test_imports_point_down():
    bad = []
    for path in source_files():
        module, is_package = module_of(path)
        own = layer_of(module) if module != "s2dm" else LAYERS[path.stem]
        tree = ast.parse(path.read_text(), str(path))
        for line, target in imports(tree, module, is_package):
            layer = layer_of(target)
            if layer is not None and layer > own:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} (layer {own}) imports "
                           f"{target} (layer {layer})")
    assert not bad, "imports of a higher layer (see docs/architecture.md):\n" + "\n".join(bad)


def comment_lines(text: str) -> Tuple[set, set]:
    """(lines holding a comment, lines that are nothing but a comment)."""
    anywhere, alone = set(), set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            anywhere.add(tok.start[0])
            if not tok.line[:tok.start[1]].strip():
                alone.add(tok.start[0])
    return anywhere, alone


def function_imports(tree: ast.AST) -> Iterator[ast.stmt]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    yield inner


def test_imports_inside_functions_give_a_reason():
    bad = []
    for path in source_files():
        text = path.read_text()
        anywhere, alone = comment_lines(text)
        seen = set()
        for node in function_imports(ast.parse(text, str(path))):
            if node.lineno in seen:  # nested functions are walked more than once
                continue
            seen.add(node.lineno)
            own_lines = set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
            if not (own_lines & anywhere or node.lineno - 1 in alone):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, ("imports inside functions without a one-line reason (move them to the top, or say "
                     "why on their line or the line above):\n" + "\n".join(bad))


def documented_modules() -> Dict[str, int]:
    """Path under s2dm/ → layer, as docs/architecture.md's Modules section lists them: a
    ``Layer N: `s2dm/pkg/` `` heading, then ``- `a.py`, `b.py` — what they do`` items."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    found: Dict[str, int] = {}
    layer, folder = None, ""
    for line in section.splitlines():
        heading = re.match(r"Layer (\d+)(?:: `s2dm/(\w+)/`)?", line)
        if heading:
            layer, folder = int(heading.group(1)), f"{heading.group(2)}/" if heading.group(2) else ""
        elif line.startswith("- ") and layer is not None:
            for name in re.findall(r"`([\w/]+\.py)`", line.split(" — ")[0]):
                found[name[len("s2dm/"):] if name.startswith("s2dm/") else folder + name] = layer
    return found


def test_architecture_md_names_every_module_in_its_layer():
    documented = documented_modules()
    missing, misplaced = [], []
    for path in source_files():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in documented:
            if not rel.endswith("/__init__.py"):  # a subpackage's __init__ may go unnamed
                missing.append(rel)
            continue
        layer = layer_of(module_of(path)[0])
        if documented[rel] != layer:
            misplaced.append(f"{rel}: layer {documented[rel]} in the docs, {layer} here")
    stale = [rel for rel in documented if not (PACKAGE / rel).is_file()]
    assert not (missing or misplaced or stale), (
        "docs/architecture.md and the package disagree:\n" + "\n".join(
            [f"not named: s2dm/{m}" for m in missing] + misplaced + [f"named but absent: s2dm/{s}" for s in stale]))
