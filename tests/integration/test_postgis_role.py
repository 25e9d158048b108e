"""The pipeline's PostGIS role (POSTGRES_USER) is no superuser and creates, changes and drops
only its own run schemas; what the pipeline does in them still works (deploy/postgis/
pipeline-role.psql is the admin step that makes it so, in both stacks)."""

import uuid

import psycopg
import pytest
from psycopg import errors

from devstack.postgis import Postgres
from libs.postgis import connect, create_schema, drop_schema, run_schema_name

pytestmark = pytest.mark.integration


@pytest.fixture
def admin(stack_env) -> Postgres:
    return Postgres(stack_env)


def denied(conn: psycopg.Connection, statement: str) -> str:
    """Run ``statement``, expect a refusal, return its message."""
    with pytest.raises(errors.InsufficientPrivilege) as refused:
        conn.execute(statement)
    return str(refused.value)


def test_the_pipeline_role_is_no_superuser(pg, stack_env):
    row = pg.execute(
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    assert row == (False, False, False, False)
    assert pg.execute("SELECT current_user").fetchone()[0] == stack_env["POSTGRES_USER"]
    owner = pg.execute(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
    ).fetchone()[0]
    assert owner != stack_env["POSTGRES_USER"], "the database (and so public) is the admin's"


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE public.intruder (id int)",
        "CREATE TABLE intruder (id int)",  # search_path: public
        "CREATE TEMP TABLE intruder (id int)",
        "CREATE EXTENSION hstore",  # a trusted extension: CREATE on the database would do
        "CREATE EXTENSION postgis_raster",
        "CREATE SCHEMA not_a_run_schema",
        "CREATE SCHEMA etl_run_short",
        "CREATE DATABASE intruder",
        "CREATE ROLE intruder",
        "ALTER SYSTEM SET work_mem = '1GB'",
        "SET session_replication_role = replica",
        "DROP TABLE public.spatial_ref_sys",
        "DROP EVENT TRIGGER spatial_etl_guard_ddl",
        "COPY spatial_ref_sys FROM '/etc/passwd'",
    ],
)
def test_outside_its_run_schemas_the_role_is_refused(pg, statement):
    denied(pg, statement)


def test_it_cannot_rename_a_run_schema_out_of_the_pattern(pg):
    schema = run_schema_name(str(uuid.uuid4()))
    create_schema(pg, schema)
    try:
        assert "run schemas" in denied(pg, f'ALTER SCHEMA "{schema}" RENAME TO kept_forever')
    finally:
        drop_schema(pg, schema)


def test_it_cannot_touch_another_roles_run_schema(pg, admin):
    """A schema named like a run schema but owned by someone else: no use, no DDL, no drop."""
    schema = run_schema_name(str(uuid.uuid4()))
    admin.admin_sql(f'CREATE SCHEMA "{schema}"; CREATE TABLE "{schema}".kept (id int);')
    try:
        denied(pg, f'CREATE TABLE "{schema}".intruder (id int)')
        denied(pg, f'SELECT * FROM "{schema}".kept')
        denied(pg, f'DROP TABLE "{schema}".kept')
        with pytest.raises(errors.InsufficientPrivilege):
            drop_schema(pg, schema)
    finally:
        admin.admin_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE;')


def test_in_its_run_schema_it_does_what_the_pipeline_does(postgis_settings):
    """Schema, unlogged and logged tables, COPY BINARY, indexes, ANALYZE, the GUCs the loader
    and the join set, a CTAS, then the drop (the full runs are in the other tests)."""
    schema = run_schema_name(str(uuid.uuid4()))
    with connect(postgis_settings, autocommit=True) as conn:
        create_schema(conn, schema)
        try:
            for guc in (
                "work_mem = '64MB'",
                "maintenance_work_mem = '128MB'",
                "max_parallel_workers_per_gather = 2",
                "synchronous_commit = off",
                "jit = off",
                "statement_timeout = 60000",
                "lock_timeout = 5000",
            ):
                conn.execute(f"SET {guc}")
            q = f'"{schema}"'
            conn.execute(
                f"CREATE UNLOGGED TABLE {q}.pts (_row_id bigint, geom geometry(Point, 4326))"
                " WITH (autovacuum_enabled = false)"
            )
            with conn.cursor().copy(f"COPY {q}.pts (_row_id, geom) FROM STDIN") as copy:
                for i in range(100):
                    copy.write_row((i, f"SRID=4326;POINT({i % 10} {i // 10})"))
            conn.execute(f"CREATE INDEX ON {q}.pts USING gist (geom)")
            conn.execute(f"ALTER TABLE {q}.pts ADD PRIMARY KEY (_row_id)")
            conn.execute(f"ALTER TABLE {q}.pts SET (parallel_workers = 2)")
            conn.execute(f"ANALYZE {q}.pts")
            with conn.transaction():
                conn.execute("SET LOCAL jit = off")
                conn.execute(
                    f"CREATE TABLE {q}.joined AS SELECT a._row_id, count(*) AS n "
                    f"FROM {q}.pts a JOIN {q}.pts b ON ST_DWithin(a.geom, b.geom, 1.0) "
                    "GROUP BY a._row_id"
                )
            assert conn.execute(f"SELECT sum(n) FROM {q}.joined").fetchone()[0] > 100
        finally:
            drop_schema(conn, schema)
        assert (
            conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()[0] == 0
        )
