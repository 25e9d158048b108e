import pytest

from etl_pipelines.definitions import defs
from libs.errors import ConfigError
from libs.object_store import ObjectStoreSettings
from libs.postgis import run_id_of_schema, run_schema_name


def test_definitions_load_and_register_everything():
    job = defs.resolve_job_def("ingest_batch")
    assert {n.name for n in job.nodes} == {
        "validate_batch", "shard_batch", "transform_chunks", "load_and_join", "publish_batch"}
    names = {s.name for s in defs.sensors}
    assert names == {"manifest_sensor", "postgis_schema_janitor", "ledger_run_failure_sensor",
                     "staging_janitor", "scratch_janitor"}
    assert set(defs.resources) >= {"object_store", "io_manager", "ledger", "postgis_db",
                                   "ray_cluster"}


def test_resources_read_the_contract_env_vars_lazily():
    text = open("etl_pipelines/definitions.py").read()
    for var in ("MINIO_ENDPOINT", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
                "MONGO_CONNECTION_STRING", "POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_USER",
                "POSTGRES_PASSWORD", "RAY_ADDRESS"):
        assert f'EnvVar("{var}")' in text or f'EnvVar.int("{var}")' in text, var
    assert "os.environ" not in text and "getenv" not in text


def test_definitions_import_without_any_service_env(monkeypatch):
    import importlib

    import etl_pipelines.definitions as module

    for var in ("MINIO_ENDPOINT", "MONGO_CONNECTION_STRING", "POSTGRES_HOST", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert importlib.reload(module).defs is not None


@pytest.mark.parametrize("endpoint", ["http://minio:9000", "https://x:1", "minio", "minio:port"])
def test_endpoint_must_be_host_port(endpoint):
    with pytest.raises(ConfigError, match="MINIO_ENDPOINT"):
        ObjectStoreSettings(endpoint, "k", "s")


def test_secret_never_in_repr():
    assert "s3cr3t" not in repr(ObjectStoreSettings("minio:9000", "k", "s3cr3t"))


def test_run_schema_names_round_trip():
    run_id = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    schema = run_schema_name(run_id)
    assert schema == "etl_run_0f1e2d3c4b5a69788796a5b4c3d2e1f0" and len(schema.encode()) <= 63
    assert run_id_of_schema(schema) == run_id
    assert run_id_of_schema("public") is None
