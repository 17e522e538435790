"""The layout promises of docs/design.md, checked by parsing the files: no import cycle among the
project's modules, no stage or tool importing a stage (the reward model of reward.py excepted), every project
import at the top of its file, no local name hiding an imported module, and every stage's main() short and
free of nested functions, so the file reads top to bottom."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
MAIN_MAX_LINES = 80
FILE_MAX_LINES = 560           # docs/design.md: every file under ~550 lines, world.py's word tables excepted
RL_MAX_LINES = 480             # ppo.py and grpo.py under ~470: the method, the rollout in rollout.py
STAGES = {"pretrain", "prompting", "sft", "preferences", "reward", "dpo", "ppo", "grpo"}
TOOLS = {"sample", "report", "bench", "gpu_check"}
# the reward model (reward.load_reward_model, reward_scores) serves the RL stages and the tools
MAY_IMPORT_A_STAGE = {(m, "reward") for m in ("ppo", "grpo", "report", "bench", "gpu_check", "sample")}


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


def stage_imports(graph):
    """(importer, stage) for every stage or tool importing a stage, beyond MAY_IMPORT_A_STAGE."""
    return sorted((m, d) for m in STAGES | TOOLS for d in graph.get(m, ()) if d in STAGES
                  and (m, d) not in MAY_IMPORT_A_STAGE)


def test_no_stage_imports_another_stage():
    assert stage_imports({"grpo": {"ppo", "reward"}, "ppo": {"reward"}}) == [("grpo", "ppo")]   # the check can fail
    graph = import_graph()
    assert STAGES | TOOLS <= set(graph), "a stage or tool was renamed: update STAGES / TOOLS"
    assert not stage_imports(graph), stage_imports(graph)


def shadowed_modules(tree):
    """Names that a file imports as modules (import world) and then rebinds: an argument, an assignment or a
    loop variable of that name hides the module in its scope."""
    modules = {(a.asname or a.name).split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    return sorted({(n.id, n.lineno) for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
                   and n.id in modules} | {(n.arg, n.lineno) for n in ast.walk(tree) if isinstance(n, ast.arg)
                                           and n.arg in modules})


def test_no_local_name_hides_an_imported_module():
    assert shadowed_modules(ast.parse("import world\ndef f(ctx):\n    world = ctx.world\n")) == [("world", 3)]
    hidden = {m: shadowed_modules(parsed(m)) for m in MODULES}
    assert not {m: v for m, v in hidden.items() if v}


def test_no_file_is_longer_than_the_design_allows():
    lines = {m: sum(1 for _ in open(path, encoding="utf-8")) for m, path in MODULES.items()}
    assert not {m: n for m, n in lines.items() if n > FILE_MAX_LINES and m != "world"}
    assert not {m: lines[m] for m in ("ppo", "grpo") if lines[m] > RL_MAX_LINES}


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


def test_every_command_ends_in_run_cli_of_main():
    """`python X.py` runs exactly run_cli(main), so conftest.run_script, which calls that in the test's
    process, tests what the command runs (sample.py adds a Ctrl-C line around it for its chat)."""
    commands = [m for m, path in MODULES.items() if '\nif __name__ == "__main__":' in open(path, encoding="utf-8").read()]
    assert {"pretrain", "sft", "dpo", "report", "sample"} <= set(commands)
    for m in commands:
        tail = open(MODULES[m], encoding="utf-8").read().split('\nif __name__ == "__main__":\n')[-1]
        assert "    run_cli(main)\n" in tail and "run_cli(lambda" not in tail, m
