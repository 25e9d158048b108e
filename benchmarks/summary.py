"""The benchmark session's results: cases, ratios, targets, the summary table and the chart.

Benchmarks record into this module while they run (``record_case`` for a whole pipeline run,
``record_ratio`` for a stage ratio such as 2 vs 1 Ray workers); ``collect`` turns that into
one JSON-able dict with the derived ratios (ours against each peer, lake path against
SedonaDB, peak RSS at the largest size against the next), each with its target and
PASS/MISS. Only ratios are ever compared with the committed baseline (``benchmarks.gate``):
absolute seconds move with the machine's load, ratios measured in one run much less.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: The pipelines that do the same PostGIS job as ours (issue 6's peers 1-3).
POSTGIS_PEERS = ("ogr2ogr", "geopandas", "dask_geopandas")
PEERS = (*POSTGIS_PEERS, "sedonadb")
OURS = "ours"
#: Stages every pipeline reports (where it has them), in the order they run.
STAGES = ("lake", "postgis", "export")
STAGE_LABELS = {"lake": "landed file → transformed", "postgis": "load + join (PostGIS or in memory)",
                "export": "export / publish", "total": "end to end"}


@dataclass
class CaseResult:
    """One timed pipeline run on one input size."""

    pipeline: str
    size: int  # points in the batch: the size label (lines and polygons are a tenth each)
    features: int  # every feature of every layer read, the countries included
    input_bytes: int
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds (STAGES)
    peak_rss_mib: float | None = None
    rss_parts_mib: dict[str, float] = field(default_factory=dict)
    check: dict = field(default_factory=dict)
    peak_pss_mib: float | None = None  # shared pages divided among their sharers (rss.py)
    pss_parts_mib: dict[str, float] = field(default_factory=dict)

    @property
    def features_per_s(self) -> float:
        return self.features / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / self.seconds


@dataclass
class Ratio:
    """A ratio measured in this run; ``better`` says which way is good for the gate."""

    name: str
    value: float
    better: str = "higher"  # or "lower"
    target: float | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        ok = self.value >= self.target if self.better == "higher" else self.value <= self.target
        return "PASS" if ok else "MISS"


_cases: list[CaseResult] = []
_ratios: dict[str, Ratio] = {}


def reset() -> None:
    _cases.clear()
    _ratios.clear()


def record_case(result: CaseResult) -> None:
    _cases.append(result)


def record_ratio(name: str, value: float, *, better: str = "higher", target: float | None = None,
                 note: str = "") -> None:
    _ratios[name] = Ratio(name, value, better, target, note)


def has_results() -> bool:
    return bool(_cases or _ratios)


def size_label(n: int) -> str:
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if n >= scale and n % (scale // 10) == 0:
            text = f"{n / scale:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return str(n)


def derived_ratios(cases: list[CaseResult]) -> list[Ratio]:
    """Ours against every peer at every size, the targets at the largest size measured."""
    by_key = {(c.pipeline, c.size): c for c in cases}
    sizes = sorted({c.size for c in cases if c.pipeline == OURS})
    ratios: list[Ratio] = []
    for size in sizes:
        ours = by_key[(OURS, size)]
        label = size_label(size)
        largest = size == sizes[-1]
        for peer in PEERS:
            other = by_key.get((peer, size))
            if other is not None:
                ratios.append(Ratio(f"e2e_vs_{peer}@{label}", ours.features_per_s / other.features_per_s))
        peers = [by_key[(p, size)] for p in POSTGIS_PEERS if (p, size) in by_key]
        if peers:
            fastest = max(peers, key=lambda c: c.features_per_s)
            ratios.append(Ratio(f"e2e_vs_fastest_postgis_peer@{label}",
                                ours.features_per_s / fastest.features_per_s,
                                target=3.0 if largest else None, note=f"fastest: {fastest.pipeline}"))
        sedona = by_key.get(("sedonadb", size))
        if sedona is not None and "lake" in ours.stages and "lake" in sedona.stages:
            ratios.append(Ratio(f"lake_vs_sedonadb@{label}",
                                sedona.stages["lake"] / ours.stages["lake"],
                                target=0.5 if largest else None,
                                note="throughput ratio, landed file → transformed GeoParquet"))
    if len(sizes) >= 2:
        small, large = by_key[(OURS, sizes[-2])], by_key[(OURS, sizes[-1])]
        if small.peak_rss_mib and large.peak_rss_mib:
            ratios.append(Ratio(f"rss_{size_label(large.size)}_vs_{size_label(small.size)}",
                                large.peak_rss_mib / small.peak_rss_mib, better="lower", target=1.25,
                                note="peak RSS of ours end to end, all processes (summed: "
                                     "shared pages counted once per process)"))
        if small.peak_pss_mib and large.peak_pss_mib:
            ratios.append(Ratio(f"pss_{size_label(large.size)}_vs_{size_label(small.size)}",
                                large.peak_pss_mib / small.peak_pss_mib, better="lower", target=1.25,
                                note="peak PSS of ours end to end, all processes (shared pages "
                                     "divided among their sharers)"))
    return ratios


def collect() -> dict:
    """Everything recorded so far plus the derived ratios, as one JSON-able dict."""
    ratios = {r.name: r for r in derived_ratios(_cases)}
    ratios.update(_ratios)
    return {
        "profile": os.environ.get("BENCH_PROFILE", "adhoc"),
        "cases": [{**asdict(c), "features_per_s": c.features_per_s, "mb_per_s": c.mb_per_s}
                  for c in _cases],
        "ratios": {name: {**asdict(r), "verdict": r.verdict} for name, r in ratios.items()},
    }


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def render_markdown(data: dict) -> str:
    """The compact summary: one row per pipeline run, then one row per ratio."""
    cases = data["cases"]
    lines = [f"profile: {data['profile']}", ""]
    if data["profile"] != "full":
        lines[-1:] = ["targets are issue 6's, set for the full sizes (10M vs 1M points): at these sizes "
                      "their PASS/MISS is informative only; the gate compares ratios with the "
                      "profile's own baseline", ""]
    if cases:
        ours = {c["size"]: c for c in cases if c["pipeline"] == OURS}
        lines += ["| pipeline | size | features | s | features/s | MB/s | peak RSS MiB | peak PSS MiB "
                  "| ours ÷ this |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in sorted(cases, key=lambda c: (c["size"], c["pipeline"] != OURS, c["pipeline"])):
            mine = ours.get(c["size"])
            vs = "" if c["pipeline"] == OURS or mine is None else \
                f"{mine['features_per_s'] / c['features_per_s']:.2f}x"
            lines.append(f"| {c['pipeline']} | {size_label(c['size'])} | {c['features']:,} | "
                         f"{c['seconds']:.2f} | {_fmt(c['features_per_s'])} | {_fmt(c['mb_per_s'], 1)} | "
                         f"{_fmt(c['peak_rss_mib'])} | {_fmt(c.get('peak_pss_mib'))} | {vs} |")
        lines.append("")
    lines += ["| ratio | value | better | target | result | note |", "| --- | --- | --- | --- | --- | --- |"]
    for r in data["ratios"].values():
        sign = ">=" if r["better"] == "higher" else "<="
        target = f"{sign} {r['target']}" if r["target"] is not None else ""
        lines.append(f"| {r['name']} | {r['value']:.3f} | {r['better']} | {target} | {r['verdict']} | "
                     f"{r['note']} |")
    return "\n".join(lines)


def render_chart(data: dict, path: Path) -> Path | None:
    """Throughput by stage at the largest size, and end to end by size, ours beside the peers."""
    cases = data["cases"]
    if not cases:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipelines = [p for p in (OURS, *PEERS) if any(c["pipeline"] == p for c in cases)]
    colours = dict(zip((OURS, *PEERS), ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"),
                       strict=True))
    largest = max(c["size"] for c in cases)
    fig, (by_stage, by_size) = plt.subplots(1, 2, figsize=(13, 5.2))

    stages = [*STAGES, "total"]
    width = 0.8 / len(pipelines)
    for i, pipeline in enumerate(pipelines):
        case = next((c for c in cases if c["pipeline"] == pipeline and c["size"] == largest), None)
        if case is None:
            continue
        values = [case["features"] / (case["seconds"] if s == "total" else case["stages"].get(s, 0) or 0)
                  if s == "total" or case["stages"].get(s) else 0 for s in stages]
        xs = [j + (i - (len(pipelines) - 1) / 2) * width for j in range(len(stages))]
        by_stage.bar(xs, values, width, label=pipeline, color=colours[pipeline])
    by_stage.set_xticks(range(len(stages)), [STAGE_LABELS[s].replace(" (", "\n(") for s in stages],
                        fontsize=8)
    by_stage.set_yscale("log")
    by_stage.set_ylabel("features/s (log)")
    by_stage.set_title(f"Throughput by stage, {size_label(largest)} points "
                       "(missing bar: stage not separable)", fontsize=10)
    by_stage.legend(fontsize=8)
    by_stage.grid(axis="y", alpha=0.3)

    for pipeline in pipelines:
        points = sorted((c["size"], c["features_per_s"]) for c in cases if c["pipeline"] == pipeline)
        by_size.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=pipeline,
                     color=colours[pipeline], linewidth=2.5 if pipeline == OURS else 1.5)
    by_size.set_xscale("log")
    by_size.set_yscale("log")
    sizes = sorted({c["size"] for c in cases})
    by_size.set_xticks(sizes, [size_label(s) for s in sizes])
    by_size.minorticks_off()
    by_size.set_xlabel("points in the batch (+10% lines, +10% polygons, 177 countries)")
    by_size.set_ylabel("features/s end to end (log)")
    by_size.set_title("End to end by size", fontsize=10)
    by_size.legend(fontsize=8)
    by_size.grid(alpha=0.3)
    fig.suptitle(f"Spatial ETL throughput, ours beside the peers (profile {data['profile']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = collect()
    written = [out_dir / "summary.json", out_dir / "summary.md"]
    written[0].write_text(json.dumps(data, indent=2) + "\n")
    written[1].write_text(render_markdown(data) + "\n")
    chart = render_chart(data, out_dir / "throughput.png")
    if chart is not None:
        written.append(chart)
    return written
