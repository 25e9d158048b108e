"""The house rules: every stage in one room, data flowing one way, ops as thin peer wiring.

``libs/`` holds one package per stage, in the order data flows, over a small foundation; a
stage imports only earlier stages and the foundation. Ops import no other op and stay short;
no module reaches into another's private names; module docstrings stay short (the history
and measurements live under ``docs/``); nothing edits ``sys.path``.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: The stages of libs/, in the order data flows through them.
STAGES = ("manifest", "sharding", "transformations", "postgis", "lake")
#: The foundation every stage may use; it uses no stage.
FOUNDATION = ("errors", "geoparquet", "wkb_layout", "object_store", "ledger", "descriptors", "memory",
              "retry")
PROJECT_DIRS = ("libs", "etl_pipelines", "devstack", "scripts", "tests", "benchmarks", "ray_cluster",
                "run_health")


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders if (REPO / folder).exists()
                  for p in (REPO / folder).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = path.relative_to(REPO).with_suffix("").parts[:-node.level]
                module = ".".join([*package, *([module] if module else [])])
            found.append((module, [alias.name for alias in node.names]))
    return found


def _libs_room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "libs" else None


@pytest.mark.parametrize("path", _python_files("libs"), ids=lambda p: str(p.relative_to(REPO)))
def test_a_stage_imports_only_earlier_stages_and_the_foundation(path):
    room = path.relative_to(REPO / "libs").with_suffix("").parts[0]
    for module, _ in _imports(path):
        other = _libs_room(module)
        if other is None or other == room or other not in STAGES:
            continue
        if room in FOUNDATION:
            pytest.fail(f"{path.relative_to(REPO)} (foundation) imports the stage {module}")
        if room in STAGES:
            assert STAGES.index(other) < STAGES.index(room), (
                f"{path.relative_to(REPO)} (stage {room}) imports {module}, a later stage; "
                "hand it what it needs as an argument or move the shared part to the foundation")


def test_every_libs_module_has_a_room():
    rooms = {p.relative_to(REPO / "libs").with_suffix("").parts[0] for p in _python_files("libs")}
    client_side = {"__init__", "landing", "sample_batch"}  # what a data team runs, and a demo
    assert rooms - set(STAGES) - set(FOUNDATION) - client_side == set()


def test_ops_are_peers_and_thin():
    for path in _python_files("etl_pipelines/ops"):
        for module, _ in _imports(path):
            assert not module.startswith("etl_pipelines.ops"), (
                f"{path.relative_to(REPO)} imports {module}: ops are peers; shared op-side types "
                "live in etl_pipelines/types.py")
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            if not any("op" in ast.unparse(d).split("(")[0] for d in node.decorator_list):
                continue
            body = node.body[1:] if isinstance(node.body[0], ast.Expr) and isinstance(
                node.body[0].value, ast.Constant) else node.body
            lines = node.end_lineno - body[0].lineno + 1
            assert lines <= 40, (f"op {node.name} in {path.relative_to(REPO)} is {lines} lines; "
                                 "the work belongs in a libs/ function the op calls")


def test_ray_glue_lives_in_one_place():
    for path in _python_files("etl_pipelines", "libs"):
        rel = path.relative_to(REPO)
        if rel.parts[:2] == ("etl_pipelines", "ray") or rel.parts[:2] == ("etl_pipelines", "resources"):
            continue
        for module, _ in _imports(path):
            assert module.split(".")[0] != "ray", (
                f"{rel} imports {module}; Ray glue lives in etl_pipelines/ray/")


@pytest.mark.parametrize("path", _python_files(*PROJECT_DIRS), ids=lambda p: str(p.relative_to(REPO)))
def test_no_private_name_is_imported_across_modules(path):
    for module, names in _imports(path):
        if module.split(".")[0] not in PROJECT_DIRS:
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{path.relative_to(REPO)} imports private {private} from {module}"


@pytest.mark.parametrize("path", _python_files(*PROJECT_DIRS), ids=lambda p: str(p.relative_to(REPO)))
def test_module_docstrings_stay_short_and_nothing_edits_sys_path(path):
    tree = ast.parse(path.read_text())
    docstring = ast.get_docstring(tree, clean=False) or ""
    assert len(docstring.splitlines()) <= 25, (
        f"{path.relative_to(REPO)}: a {len(docstring.splitlines())}-line module docstring; keep "
        "the why in a few lines and move measurements and history to a note under docs/")
    edits = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
             and ast.unparse(node.value) == "sys.path"]
    assert not edits, f"{path.relative_to(REPO)} edits sys.path ({edits}); import through packages"


def test_no_test_reaches_into_a_private_name():
    """A test patches or reads only what a module offers: a name worth tuning is public."""
    for path in _python_files("tests", "benchmarks"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("setattr") and \
                    len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and \
                    str(node.args[1].value).startswith("_") and \
                    not str(node.args[1].value).startswith("__"):
                pytest.fail(f"{path.relative_to(REPO)}:{node.lineno} patches the private "
                            f"{node.args[1].value!r}; make it part of the module's interface")
