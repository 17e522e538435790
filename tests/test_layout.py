"""The layout promises of docs/design.md, checked by parsing the files: no import cycle among the
project's modules, every project import at the top of its file, and every stage's main() short and
free of nested functions, so the file reads top to bottom."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
MAIN_MAX_LINES = 80


def parsed(name):
    with open(MODULES[name], encoding="utf-8") as f:
        return ast.parse(f.read())


def project_imports(node):
    """Names of the project's modules that an import statement brings in."""
    if isinstance(node, ast.Import):
        names = [a.name.split(".")[0] for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names = [node.module.split(".")[0]]
    else:
        return []
    return [n for n in names if n in MODULES]


def import_graph():
    return {m: {d for node in parsed(m).body for d in project_imports(node)} for m in MODULES}


def find_cycle(graph):
    """A list of modules forming a cycle, or None (depth-first search with colours)."""
    colour, stack = {m: 0 for m in graph}, []

    def visit(m):
        colour[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if colour[d] == 1:
                return stack[stack.index(d):] + [d]
            if colour[d] == 0 and (cycle := visit(d)):
                return cycle
        stack.pop()
        colour[m] = 2
        return None

    for m in sorted(graph):
        if colour[m] == 0 and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_the_modules():
    graph = import_graph()
    assert "common" in graph and graph["common"] == set(), "common.py imports no module of the project"
    assert find_cycle(graph) is None


def test_every_project_import_is_at_the_top_of_its_file():
    inside = []
    for m in MODULES:
        tree = parsed(m)
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if id(node) not in top and project_imports(node):
                inside.append(f"{m}.py:{node.lineno}")
    assert not inside, f"project imports inside functions or blocks: {inside}"


def test_stage_mains_are_short_and_have_no_nested_functions():
    long, nested = [], []
    for m in MODULES:
        for f in parsed(m).body:
            if isinstance(f, ast.FunctionDef) and f.name == "main":
                if f.end_lineno - f.lineno + 1 > MAIN_MAX_LINES:
                    long.append(f"{m}.main: {f.end_lineno - f.lineno + 1} lines")
                nested += [f"{m}.main: {n.name}" for n in ast.walk(f)
                           if n is not f and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert not long, long
    assert not nested, nested
