"""PostGIS resource: connections to ``spatial_compute`` with bounded statement and lock waits."""

from __future__ import annotations

import psycopg
from dagster import ConfigurableResource
from pydantic import Field

from libs.postgis import PostGISSettings, connect


class PostGISResource(ConfigurableResource):
    """The PostGIS database where each run gets a transient schema."""

    host: str = Field(description="host (POSTGRES_HOST)")
    port: int = Field(default=5432, description="port (POSTGRES_PORT)")
    user: str = Field(description="user (POSTGRES_USER)")
    password: str = Field(description="password (POSTGRES_PASSWORD)")
    database: str = Field(default="spatial_compute", description="database name")
    statement_timeout_ms: int = Field(
        default=600_000, description="statement_timeout of pipeline connections (ms)"
    )
    lock_timeout_ms: int = Field(default=30_000, description="lock_timeout (ms)")
    copy_parallelism: int = Field(
        default=2, ge=1, le=16,
        description="chunks of a layer COPYed at once, each on its own connection and in its own "
        "transaction (1-16; 2 suits a 2-core machine, beyond that about one per database core); "
        "a point layer the join probes with BRIN is COPYed by one connection, in chunk order, "
        "while the other layers load beside it",
    )

    def settings(self) -> PostGISSettings:
        return PostGISSettings(self.host, int(self.port), self.user, self.password, self.database,
                               self.statement_timeout_ms, self.lock_timeout_ms)

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection:
        return connect(self.settings(), autocommit=autocommit)
