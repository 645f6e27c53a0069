"""The package's layering, as docs/architecture.md states it: a module imports only from its own layer and the
layers above it in the doc's table. The table is read from the document itself, so the rule and its description
cannot drift apart, and a new module that no row claims fails here until the document places it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def layer_table() -> list[tuple[str, list[str]]]:
    """(layer, module prefixes) rows of the doc's `| layer | modules | ... |` table, top layer first."""
    rows, in_table = [], False
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["layer", "modules"]:
            in_table = True
        elif in_table and line.startswith("|") and not set(cells[0]) <= {"-", ":"}:
            rows.append((cells[0], re.findall(r"`(jaxft[\w.]*)`", cells[1])))
        elif in_table and not line.startswith("|"):
            break
    return rows


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def layer_of(module: str, table) -> int | None:
    """Index of the row whose prefix matches ``module`` most specifically (``jaxft.hf.x`` before ``jaxft``)."""
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(table) for prefix in prefixes
               if module == prefix or (prefix != "jaxft" and module.startswith(prefix + "."))]  # the root: itself
    return max(matches)[1] if matches else None


def imported_modules(path: Path) -> set[str]:
    """jaxft modules a file imports (``from jaxft import parallel`` imports ``jaxft.parallel``), at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("jaxft"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("jaxft"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT / (sub.replace(".", "/") + ".py")).is_file() or (ROOT / sub.replace(".", "/")).is_dir()
                found.add(sub if is_module else node.module)
    return found


def modules():
    return {module_name(p): p for p in sorted((ROOT / "jaxft").rglob("*.py"))}


def test_the_document_has_a_layer_table():
    table = layer_table()
    assert len(table) >= 8 and all(prefixes for _, prefixes in table), table


def test_every_module_belongs_to_a_layer():
    table = layer_table()
    unplaced = [m for m in modules() if layer_of(m, table) is None]
    assert not unplaced, f"modules no row of the layer table in {DOC} claims: {unplaced}"


def test_no_module_imports_from_a_layer_below_it():
    table = layer_table()
    wrong = []
    for name, path in modules().items():
        own = layer_of(name, table)
        for dep in imported_modules(path):
            layer = layer_of(dep, table)
            if layer is not None and own is not None and layer > own:
                wrong.append(f"{name} ({table[own][0]}) imports {dep} ({table[layer][0]})")
    assert not wrong, "imports against the layer order of docs/architecture.md:\n" + "\n".join(wrong)
