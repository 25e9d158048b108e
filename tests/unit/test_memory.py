"""libs.memory: the run process's Arrow pool and handing freed memory back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

REPO = Path(__file__).resolve().parents[2]
_PROBE = """
import json, pyarrow as pa
from libs.memory import release_memory, use_jemalloc_pool
before = pa.default_memory_pool().backend_name
chosen = use_jemalloc_pool()
again = use_jemalloc_pool()
kept = pa.array(range(100_000))  # allocated from the chosen pool, still readable after
release_memory()
print(json.dumps({"before": before, "chosen": chosen, "again": again,
                  "default": pa.default_memory_pool().backend_name, "sum": kept.sum().as_py()}))
"""


def _probe(**env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True,
                         env={**environ, "PYTHONPATH": str(REPO), **env}, check=True)
    return json.loads(out.stdout)


def _has_jemalloc() -> bool:
    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        return False
    return True


@pytest.mark.skipif(not _has_jemalloc(), reason="this pyarrow is built without jemalloc")
def test_the_run_process_switches_arrow_to_jemalloc_once():
    facts = _probe()
    assert facts["before"] == "mimalloc"  # pyarrow's own default on Linux wheels
    assert facts["chosen"] == facts["again"] == facts["default"] == "jemalloc"
    assert facts["sum"] == sum(range(100_000))


def test_an_explicit_pool_in_the_environment_is_kept():
    facts = _probe(ARROW_DEFAULT_MEMORY_POOL="system")
    assert facts["before"] == facts["chosen"] == facts["default"] == "system"
