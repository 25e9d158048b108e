"""The benchmark summary (ratios, targets, table, chart) and the regression gate.

Pure code over recorded numbers: no service, no timing. The numbers are made up to give
known ratios; what is checked is the arithmetic, the direction of each comparison and what
the gate does with missing or new ratios.
"""

import json
import tomllib
from pathlib import Path

import pytest

from benchmarks import gate, summary

REPO = Path(__file__).resolve().parents[2]


def _case(pipeline: str, size: int, seconds: float, *, lake: float | None = None,
          rss: float | None = None, pss: float | None = None) -> summary.CaseResult:
    stages = {"lake": lake} if lake is not None else {}
    return summary.CaseResult(pipeline=pipeline, size=size, features=size, input_bytes=size * 100,
                              seconds=seconds, stages=stages, peak_rss_mib=rss, peak_pss_mib=pss)


@pytest.fixture(autouse=True)
def fresh_summary():
    summary.reset()
    yield
    summary.reset()


def test_size_labels():
    assert [summary.size_label(n) for n in (20_000, 100_000, 1_000_000, 10_000_000, 2_500_000, 123)] == \
        ["20k", "100k", "1M", "10M", "2.5M", "123"]


def test_ratios_against_each_peer_and_targets_at_the_largest_size():
    cases = [
        _case("ours", 1_000_000, 10.0, lake=4.0, rss=800.0, pss=500.0),
        _case("ogr2ogr", 1_000_000, 40.0),
        _case("geopandas", 1_000_000, 20.0),
        _case("sedonadb", 1_000_000, 2.0, lake=1.0),
        _case("ours", 10_000_000, 50.0, lake=20.0, rss=900.0, pss=700.0),
        _case("ogr2ogr", 10_000_000, 400.0),
        _case("dask_geopandas", 10_000_000, 100.0),
        _case("sedonadb", 10_000_000, 20.0, lake=8.0),
    ]
    ratios = {r.name: r for r in summary.derived_ratios(cases)}
    assert ratios["e2e_vs_ogr2ogr@10M"].value == pytest.approx(8.0)
    assert ratios["e2e_vs_dask_geopandas@10M"].value == pytest.approx(2.0)
    fastest = ratios["e2e_vs_fastest_postgis_peer@10M"]
    assert fastest.value == pytest.approx(2.0) and fastest.note == "fastest: dask_geopandas"
    assert (fastest.target, fastest.verdict) == (3.0, "MISS")
    # smaller sizes are reported but carry no target
    assert ratios["e2e_vs_fastest_postgis_peer@1M"].value == pytest.approx(2.0)
    assert ratios["e2e_vs_fastest_postgis_peer@1M"].target is None
    # the lake path is a throughput ratio: SedonaDB's seconds over ours
    assert ratios["lake_vs_sedonadb@10M"].value == pytest.approx(0.4)
    assert ratios["lake_vs_sedonadb@10M"].verdict == "MISS"
    rss = ratios["rss_10M_vs_1M"]
    assert rss.value == pytest.approx(1.125) and rss.better == "lower" and rss.verdict == "PASS"
    pss = ratios["pss_10M_vs_1M"]
    assert pss.value == pytest.approx(1.4) and pss.better == "lower" and pss.verdict == "MISS"


def test_the_sampler_reads_rss_and_pss_of_a_process_tree():
    import os

    from benchmarks.rss import ProcessTreeSampler

    with ProcessTreeSampler(os.getpid(), interval_s=0.01) as sampler:
        ballast = bytearray(64 * 2**20)  # touched: 64 MiB of private pages
        ballast[::4096] = b"x" * len(ballast[::4096])
    peak = sampler.peak
    assert peak.samples >= 1 and peak.total_mib >= 64
    # private pages count whole in both; shared library pages only partly in PSS
    assert 64 <= peak.pss_mib <= peak.total_mib
    assert peak.pss_parts_mib["tree"] == pytest.approx(peak.pss_mib, abs=0.1)


def test_recorded_stage_ratios_join_the_summary_and_the_table():
    summary.record_case(_case("ours", 100_000, 5.0))
    summary.record_case(_case("geopandas", 100_000, 2.5))
    summary.record_ratio("transform_2w_vs_1w", 1.6, target=1.7)
    data = summary.collect()
    assert data["ratios"]["transform_2w_vs_1w"]["verdict"] == "MISS"
    assert data["ratios"]["e2e_vs_geopandas@100k"]["value"] == pytest.approx(0.5)
    table = summary.render_markdown(data)
    assert "| transform_2w_vs_1w | 1.600 | higher | >= 1.7 | MISS |" in table
    assert "| geopandas | 100k | 100,000 | 2.50 | 40,000 | 4.0 |" in table
    assert "0.50x" in table  # ours ÷ geopandas on the geopandas row


def test_outputs_are_written(tmp_path):
    summary.record_case(_case("ours", 20_000, 4.0, lake=2.0, rss=900.0))
    summary.record_case(_case("sedonadb", 20_000, 0.2, lake=0.1))
    summary.record_case(_case("ours", 100_000, 8.0, lake=3.0, rss=1000.0))
    written = summary.write_outputs(tmp_path)
    assert [p.name for p in written] == ["summary.json", "summary.md", "throughput.png"]
    ratios = json.loads(written[0].read_text())["ratios"]
    assert ratios["rss_100k_vs_20k"]["value"] == pytest.approx(1000 / 900)
    assert written[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _measured(**values: float) -> dict:
    return {name: {"value": v, "better": "lower" if name.startswith("rss") else "higher"}
            for name, v in values.items()}


def test_gate_fails_only_below_the_tolerance_in_the_bad_direction():
    baseline = _measured(load_vs_ogr2ogr=5.0, rss_1M_vs_100k=1.1)
    ok = gate.compare(_measured(load_vs_ogr2ogr=3.8, rss_1M_vs_100k=1.35), baseline, 0.25)
    assert [f.status for f in ok] == ["ok", "ok"]  # 3.8 >= 3.75 and 1.35 <= 1.375
    bad = gate.compare(_measured(load_vs_ogr2ogr=3.7, rss_1M_vs_100k=1.4), baseline, 0.25)
    assert [f.status for f in bad] == ["regressed", "regressed"]
    better = gate.compare(_measured(load_vs_ogr2ogr=50.0, rss_1M_vs_100k=0.5), baseline, 0.25)
    assert [f.status for f in better] == ["ok", "ok"]


def test_gate_per_ratio_tolerance_missing_and_new():
    baseline = _measured(a=1.0, b=1.0)
    findings = {f.name: f for f in gate.compare(_measured(a=0.6, c=2.0), baseline, 0.25, {"a": 0.5})}
    assert findings["a"].status == "ok"  # its own 50% tolerance
    assert findings["b"].status == "missing"
    assert findings["c"].status == "new"


def test_gate_cli_update_then_check(tmp_path, capsys):
    summary_file = tmp_path / "summary.json"
    baseline_file = tmp_path / "baseline.json"
    summary_file.write_text(json.dumps({"profile": "ci", "ratios": _measured(x=2.0)}))
    assert gate.main(["--summary", str(summary_file), "--baseline", str(baseline_file)]) == 2
    assert gate.main(["--summary", str(summary_file), "--baseline", str(baseline_file), "--update"]) == 0
    assert json.loads(baseline_file.read_text())["profiles"]["ci"]["ratios"]["x"]["value"] == 2.0
    assert gate.main(["--summary", str(summary_file), "--baseline", str(baseline_file)]) == 0
    summary_file.write_text(json.dumps({"profile": "ci", "ratios": _measured(x=1.2)}))
    assert gate.main(["--summary", str(summary_file), "--baseline", str(baseline_file)]) == 1
    assert "REGRESSED x: 1.200" in capsys.readouterr().out
    # a ci run is never recorded as the full baseline by mistake
    assert gate.main(["--summary", str(summary_file), "--baseline", str(baseline_file), "--update",
                      "--profile", "full"]) == 2
    assert "full" not in json.loads(baseline_file.read_text())["profiles"]


def test_committed_baseline_holds_ratios_only():
    data = json.loads((REPO / "benchmarks" / "baseline.json").read_text())
    assert 0 < data["tolerance"] < 1
    assert {"ci", "full"} <= set(data["profiles"])
    for profile in data["profiles"].values():
        for name, ratio in profile["ratios"].items():
            assert set(ratio) == {"value", "better"}, name
            assert ratio["better"] in ("higher", "lower") and ratio["value"] > 0, name
            assert "seconds" not in name and "_per_s" not in name, f"{name}: absolute, not a ratio"


def test_default_pytest_run_does_not_collect_the_benchmarks():
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["testpaths"] == ["tests"]
    assert not list((REPO / "tests").rglob("bench_*.py"))
