"""Which columns of a layer the joins load into PostGIS, and the check of a wide layer against
PostgreSQL's column limit before anything is transformed (issue 27)."""

from libs.manifest import SpatialJoin
from libs.postgis import MAX_TABLE_COLUMNS, join_load_problem, loaded_columns

WIDE = [f"c{i:04d}" for i in range(2_000)]


def _joins(left_columns: list[str] | None = None) -> list[SpatialJoin]:
    return [
        SpatialJoin(name="per_zone", left="zones", right="wide", aggregations=[
            {"function": "sum", "column": "c0007", "output": "s"},
            {"function": "count", "output": "n"}], left_columns=left_columns),
        SpatialJoin(name="nearest", left="wide", right="zones", predicate="nearest", k=1,
                    carry=["zone_id"], left_columns=["c0001", "c0002"]),
    ]


def test_a_right_layer_loads_only_what_its_joins_aggregate_or_carry():
    joins = _joins()
    assert loaded_columns(joins, "wide") == ["c0007", "c0001", "c0002"]
    assert loaded_columns(joins, "zones") is None  # left of per_zone, which keeps all
    assert loaded_columns(_joins(["name"]), "zones") == ["name", "zone_id"]
    assert loaded_columns(joins, "unjoined") == []


def test_a_wide_layer_fits_when_its_joins_name_what_they_need():
    assert join_load_problem(_joins(), "wide", WIDE) is None
    assert join_load_problem(_joins(), "unjoined", WIDE) is None  # never loaded


def test_a_wide_left_layer_read_whole_is_refused_naming_layer_count_and_fix():
    joins = [SpatialJoin(name="per_wide", left="wide", right="zones")]
    problem = join_load_problem(joins, "wide", WIDE)
    assert problem == (
        f"layer 'wide' has 2,000 attribute columns; a PostgreSQL table holds at most "
        f"{MAX_TABLE_COLUMNS:,} columns (2 of them the row id and the geometry), and join(s) "
        "['per_wide'] read all of them as their left layer. List the columns the join result "
        "needs in the join's 'left_columns' (the lake keeps every column of the layer either way)")
    # loaded: 1,598 + 2 fits; the result (1,598 + a count + 2) would not, below
    assert join_load_problem(joins, "wide", WIDE[:1_597]) is None
    assert join_load_problem(joins, "wide", WIDE[:1_599]).startswith("layer 'wide' has")
    assert join_load_problem(joins, "wide", WIDE[:1_598]).startswith("join 'per_wide'")


def test_columns_the_joins_name_that_the_layer_lacks_are_named():
    problem = join_load_problem(_joins(), "wide", ["c0001"])
    assert problem == ("layer 'wide': join(s) name columns it does not have ['per_zone: c0007', "
                       "'nearest: c0002'] (as left_columns, or aggregated or carried); its "
                       "columns are ['c0001']")


def test_a_join_result_wider_than_a_table_is_refused():
    joins = [SpatialJoin(name="per_wide", left="wide", right="zones", predicate="nearest", k=1,
                         carry=["a", "b", "c"])]
    assert join_load_problem(joins, "wide", WIDE[:1_594]) is None  # 1,594 + 4 + 2
    assert join_load_problem(joins, "wide", WIDE[:1_595]) == (
        "join 'per_wide': its result would have 1,601 columns (1,595 of left layer 'wide', 4 "
        "added by the join), more than the 1,600 a PostgreSQL table holds; list the left "
        "columns the result needs in the join's 'left_columns'")
