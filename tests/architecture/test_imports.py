"""dn2's import graph: no cycles between its own modules (deferred imports counted), and
no module importing one above its layer (the layers contract of .importlinter, which
`make test` checks with lint-imports; here the same contract runs inside pytest too)."""

from __future__ import annotations

import configparser
import pathlib

import grimp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # grimp reads every import statement, those inside functions too.
    return grimp.build_graph("dn2ops", "pipelines", include_external_packages=False)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def module_edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    """Module -> the modules it imports, a package's __init__ counted as the package."""
    return {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_grimp_sees_deferred_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "deferred_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from deferred_pkg import b\n")
    (pkg / "b.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    g = grimp.build_graph("deferred_pkg", cache_dir=None)
    assert g.direct_import_exists(importer="deferred_pkg.a", imported="deferred_pkg.b")


def test_no_import_cycles_between_dn2_modules(graph):
    assert cycles(module_edges(graph)) == []


def test_layers_contract_holds(graph):
    """Each layer of .importlinter imports only the layers below it."""
    config = configparser.ConfigParser()
    config.read(REPO / ".importlinter")
    layers = [line.strip() for line in config["importlinter:contract:layers"]["layers"]
              .strip().splitlines()]
    assert len(layers) >= 6
    # "a : b" in .importlinter: siblings of one layer that may import each other.
    illegal = graph.find_illegal_dependencies_for_layers(
        layers=[grimp.Layer(*(m.strip() for m in layer.split(":")), independent=False)
                for layer in layers], containers=set())
    assert not illegal, [(d.importer, d.imported) for d in illegal]
