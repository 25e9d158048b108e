"""Platform contract points that are properties of the code itself."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in (REPO / folder).rglob("*.py")]


def test_libs_import_nothing_from_dagster_or_ray():
    for path in _python_files("libs"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"dagster", "ray", "etl_pipelines"}, (
                    f"{path.relative_to(REPO)} imports {name}: libs/ must not depend on "
                    "Dagster, Ray or the code location")


def test_only_the_publish_path_writes_to_the_lake():
    """Only libs/lake/publish.py writes objects into the lake bucket; only libs/lake/batch.py
    calls it, and only the publish op calls that."""
    writers, callers, op_callers = set(), set(), set()
    for path in _python_files("libs", "etl_pipelines"):
        text = path.read_text()
        rel = str(path.relative_to(REPO))
        if "lake_bucket" in text and any(w in text for w in ("put_bytes(lake_bucket",
                                                              "copy_object(lake_bucket",
                                                              "upload(lake_bucket")):
            writers.add(rel)
        if "publish_to_lake(" in text and not rel.endswith("libs/lake/publish.py"):
            callers.add(rel)
        if "publish_batch_to_lake(" in text and not rel.endswith("libs/lake/batch.py"):
            op_callers.add(rel)
    assert writers == {"libs/lake/publish.py"}
    assert callers == {"libs/lake/batch.py"}
    assert op_callers == {"etl_pipelines/ops/publish.py"}


def test_no_service_setting_is_read_at_import_time():
    for path in _python_files("etl_pipelines", "libs"):
        text = path.read_text()
        assert "os.environ" not in text and "os.getenv" not in text, (
            f"{path.relative_to(REPO)} reads the environment; resources use dagster.EnvVar")
