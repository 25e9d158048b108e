"""Janitors: drop PostGIS schemas that outlived their run; record failed runs in the ledger;
remove what finished runs left in the staging bucket and the lake after a retention; remove
the local scratch of runs whose process is gone.

The staging janitor deletes with the pipeline's S3 identity, which may delete in
``etl-staging`` and ``data-lake`` and never in ``landing-zone``; it lists nothing there. Why
what it removes is safe to remove: docs/housekeeping.md. Sensors are evaluated by the code
server, the process that launches runs (DefaultRunLauncher): in compose the user-code
container, whose disk holds the runs' scratch, not the daemon's.
"""

import json
from datetime import UTC, datetime
from itertools import islice

from dagster import (
    DagsterInstance,
    DagsterRun,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRecord,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from etl_pipelines.resources import (
    LedgerResource,
    ObjectStoreResource,
    PostGISResource,
    RetentionResource,
    ScratchResource,
)
from libs import postgis
from libs.lake import (
    OP_OUTPUTS_FOLDER,
    RUNS_FOLDER,
    folders_of,
    staged_objects,
    unlisted_parts,
)
from libs.ledger import run_failure_cause, step_failure_cause
from libs.sharding import remove_dead_scratch

ROOT_RUN_ID_TAG = "dagster/root_run_id"  # Dagster's tag on every re-execution of a run
CURSOR_VERSION = 1


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        description="Drops etl_run_* schemas whose creating run process is gone.")
def postgis_schema_janitor(
    context: SensorEvaluationContext, postgis_db: PostGISResource
) -> SkipReason:
    """A run holds an advisory lock on its schema for as long as its process lives, so a free
    lock means the run finished without cleaning up or was killed: whatever Dagster instance
    it belonged to and whatever status that instance still shows, the schema is an orphan."""
    dropped = []
    with postgis_db.connect(autocommit=True) as conn:
        for schema in postgis.list_run_schemas(conn):
            if postgis.schema_in_use(conn, schema):
                continue
            run_id = postgis.run_id_of_schema(schema)
            run = context.instance.get_run_by_id(run_id) if run_id else None
            postgis.drop_schema(conn, schema)
            dropped.append(schema)
            context.log.info(f"dropped orphan schema {schema} (run {run_id}: "
                             f"{run.status.value if run else 'unknown to this instance'})")
    return SkipReason(f"dropped {len(dropped)} orphan schema(s): {dropped}" if dropped
                      else "no orphan run schema")


@run_failure_sensor(default_status=DefaultSensorStatus.RUNNING,
                    description="Marks failed runs as FAILURE in the ledger.")
def ledger_run_failure_sensor(context: RunFailureSensorContext, ledger: LedgerResource) -> None:
    """Also runs that run monitoring failed (lost process, max runtime exceeded): their process
    could not record anything, so this is where the ledger learns of them, with a cause."""
    run = context.dagster_run
    message = context.failure_event.message
    # A run stopped at its max runtime fails twice (the monitor's event, then its own
    # process's): a later failure without a monitoring cause must not erase the cause.
    cause = run_failure_cause(message)
    # else the first failed step and its error as the user reads it (not just "steps failed"),
    # unless a cause is recorded already (the monitor's, for the run's second failure)
    fields = {"cause": cause} if cause else _step_failure(context)
    if not cause and "cause" in (ledger.ledger.run(run.run_id) or {}):
        fields.pop("cause", None)
    ledger.ledger.record_run(run.run_id, status="FAILURE", batch_id=run.tags.get("batch_id"),
                             error=message, **fields)


def _step_failure(context: RunFailureSensorContext) -> dict[str, str]:
    """``failed_step`` and ``cause`` of the run's first step failure: what the op raised,
    under Dagster's wrapping error (``cause`` then holds the op's own error)."""
    failures = context.get_step_failure_events()
    if not failures:
        return {}
    error = failures[0].event_specific_data.error
    while error is not None and error.cause is not None and \
            error.cls_name == "DagsterExecutionStepExecutionError":
        error = error.cause
    return step_failure_cause(failures[0].step_key, error.message if error else None)


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        description="Removes the local scratch directories of runs whose process is gone.")
def scratch_janitor(context: SensorEvaluationContext, scratch: ScratchResource) -> SkipReason:
    """A run locks its scratch directory for as long as its process lives (libs.sharding.
    scratch): a free lock means the run ended without cleaning up, i.e. it was killed."""
    removed = remove_dead_scratch(scratch.root(), grace_seconds=scratch.grace_seconds)
    for run_id in removed:
        context.log.info(f"removed the scratch of run {run_id} (its process is gone)")
    return SkipReason(f"removed {len(removed)} dead run scratch dir(s) under {scratch.root()}"
                      if removed else f"no dead run scratch under {scratch.root()}")


@sensor(minimum_interval_seconds=600, default_status=DefaultSensorStatus.RUNNING,
        description="Removes finished runs' staging and unlisted lake parts after a retention.")
def staging_janitor(context: SensorEvaluationContext, object_store: ObjectStoreResource,
                    retention: RetentionResource) -> SensorResult:
    """At most ``max_deletions_per_tick`` staging objects and as many lake parts a tick, from
    the next page of the lake's keys (the cursor says where the last page ended)."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    if cursor.get("version") != CURSOR_VERSION:
        cursor = {}
    cutoff = datetime.now(UTC) - retention.retention
    budget = retention.max_deletions_per_tick
    staging = _clean_staging(context, object_store, cutoff, budget)
    parts, lake_after = _clean_lake(context, object_store, retention, cutoff, budget,
                                    cursor.get("lake_after", ""))
    return SensorResult(
        skip_reason=SkipReason(f"removed {staging} staging object(s) of finished runs and "
                               f"{parts} unlisted lake part(s) older than {cutoff:%Y-%m-%d %H:%M}"
                               " UTC"),
        cursor=json.dumps({"version": CURSOR_VERSION, "lake_after": lake_after}))


def _clean_staging(context: SensorEvaluationContext, object_store: ObjectStoreResource,
                   cutoff: datetime, budget: int) -> int:
    store, bucket = object_store.store, object_store.staging_bucket
    staged = staged_objects(store, bucket, [RUNS_FOLDER, OP_OUTPUTS_FOLDER])
    known = _run_records(context.instance, list(staged))
    group_ends = _group_ends(context.instance, {_root(r.dagster_run) for r in known.values()})
    doomed: list[str] = []
    folders: list[str] = []
    for run_id, objects in staged.items():
        if len(doomed) >= budget:
            break
        if run_id in known:
            run = known[run_id].dagster_run
            ended = group_ends.get(_root(run))
            why = (f"{run.status.value}, the last run of its re-execution group ended "
                   f"{ended:%Y-%m-%d %H:%M} UTC" if ended is not None and ended < cutoff
                   else None)
        else:  # another instance's, or deleted from this one: its objects' age alone
            newest = max((o.modified for o in objects if o.modified), default=None)
            why = (f"run unknown to this instance, nothing written since {newest:%Y-%m-%d %H:%M}"
                   if newest is not None and newest < cutoff else None)
        if why is None:
            continue
        keys = [o.key for o in objects][:budget - len(doomed)]
        doomed += keys
        folders += folders_of(keys) if len(keys) == len(objects) else []
        context.log.info(f"removing {len(keys)} of the {len(objects)} staging object(s) of run "
                         f"{run_id} ({why})")
    store.delete_many(bucket, doomed)
    store.delete_many(bucket, sorted(set(folders), key=lambda f: (-f.count("/"), f)))
    return len(doomed)


def _root(run: DagsterRun) -> str:
    return run.tags.get(ROOT_RUN_ID_TAG, run.run_id)


def _run_records(instance: DagsterInstance, run_ids: list[str]) -> dict[str, RunRecord]:
    """The records of the runs among ``run_ids`` this instance knows (a query per 500)."""
    found = {}
    for start in range(0, len(run_ids), 500):
        for record in instance.get_run_records(RunsFilter(run_ids=run_ids[start:start + 500])):
            found[record.dagster_run.run_id] = record
    return found


def _group_ends(instance: DagsterInstance, roots: set[str]) -> dict[str, datetime | None]:
    """For each root run, when the last run of its re-execution group (the root and every run
    tagged with it) ended; None while one of them is not finished. A re-execution reads the
    staged op outputs of the run that produced them, which may be any earlier run of the
    group: nothing of a group goes before all of it is finished and past the retention."""
    ordered = sorted(roots)
    records = list(_run_records(instance, ordered).values())
    for start in range(0, len(ordered), 500):
        records += instance.get_run_records(
            RunsFilter(tags={ROOT_RUN_ID_TAG: ordered[start:start + 500]}))
    ends: dict[str, datetime | None] = {}
    for record in records:
        root, run = _root(record.dagster_run), record.dagster_run
        if not run.is_finished or (root in ends and ends[root] is None):
            ends[root] = None
            continue
        ended = (datetime.fromtimestamp(record.end_time, UTC) if record.end_time
                 else record.update_timestamp.replace(tzinfo=record.update_timestamp.tzinfo or UTC))
        ends[root] = max(ended, ends.get(root) or ended)
    return ends


def _clean_lake(context: SensorEvaluationContext, object_store: ObjectStoreResource,
                retention: RetentionResource, cutoff: datetime, budget: int,
                after: str) -> tuple[int, str]:
    """Examine one page of lake keys; returns the parts removed and where the next page starts
    ('' once the scan reached the end of the bucket)."""
    store, bucket = object_store.store, object_store.lake_bucket
    page = store.list_page(bucket, after=after, limit=retention.lake_keys_per_tick)

    def run_is_live(run_id: str) -> bool:
        run = context.instance.get_run_by_id(run_id)
        return run is not None and not run.is_finished

    parts = list(islice(unlisted_parts(store, bucket, page, written_before=cutoff,
                                       run_is_live=run_is_live), budget + 1))
    store.delete_many(bucket, [info.key for info in parts[:budget]])
    for info in parts[:budget]:
        context.log.info(f"removed s3://{bucket}/{info.key}: no completion manifest lists it, "
                         f"written {info.modified:%Y-%m-%d %H:%M} UTC")
    if len(parts) > budget:  # out of budget: the next tick starts at the part left
        return budget, parts[budget - 1].key
    return len(parts), (page[-1].key if len(page) == retention.lake_keys_per_tick else "")
