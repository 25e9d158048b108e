"""Regression gate: the ratios measured in one benchmark run against the committed baseline.

    python -m benchmarks.gate --summary .state/bench/summary.json            # check (CI)
    python -m benchmarks.gate --summary .state/bench/summary.json --update   # new baseline

``benchmarks/baseline.json`` holds, per profile (``ci``: the small sizes CI runs, ``full``:
``make bench``), the ratios of one accepted run and which way each is better. Only ratios are
compared, never absolute times: ours against each peer, 2 Ray workers against 1, peak RSS at
the largest size against the next, and so on, all measured within one run on one machine.

A higher-is-better ratio fails when it falls below ``baseline * (1 - tolerance)``; a
lower-is-better one (peak RSS growth) when it rises above ``baseline * (1 + tolerance)``. A
ratio in the baseline that the run did not measure fails too (a skipped case must not pass
silently); a ratio the baseline does not hold yet is reported, not gated. ``--update``
rewrites the profile's ratios from the run and is never done automatically.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "benchmarks" / "baseline.json"
#: How this was chosen: docs/benchmarks-journal.md ("Baseline and gating"); the rule: benchmarks/README.md.
DEFAULT_TOLERANCE = 0.35


@dataclass(frozen=True)
class Finding:
    name: str
    measured: float | None
    baseline: float | None
    limit: float | None
    better: str
    status: str  # "ok", "regressed", "missing", "new"

    def line(self) -> str:
        if self.status == "missing":
            return f"MISSING   {self.name}: in the baseline ({self.baseline:.3f}) but not measured"
        if self.status == "new":
            return f"NEW       {self.name}: {self.measured:.3f} (not in the baseline, not gated)"
        sign = ">=" if self.better == "higher" else "<="
        word = "REGRESSED" if self.status == "regressed" else "ok       "
        return (f"{word} {self.name}: {self.measured:.3f} (baseline {self.baseline:.3f}, "
                f"limit {sign} {self.limit:.3f})")


def compare(measured: dict[str, dict], baseline: dict[str, dict], tolerance: float,
            tolerances: dict[str, float] | None = None) -> list[Finding]:
    """Each baseline ratio against the measured one; ``tolerances`` override per ratio."""
    findings = []
    for name, base in baseline.items():
        better = base.get("better", "higher")
        tol = (tolerances or {}).get(name, tolerance)
        limit = base["value"] * (1 - tol) if better == "higher" else base["value"] * (1 + tol)
        if name not in measured:
            findings.append(Finding(name, None, base["value"], limit, better, "missing"))
            continue
        value = measured[name]["value"]
        bad = value < limit if better == "higher" else value > limit
        findings.append(Finding(name, value, base["value"], limit, better, "regressed" if bad else "ok"))
    for name, ratio in measured.items():
        if name not in baseline:
            findings.append(Finding(name, ratio["value"], None, None, ratio.get("better", "higher"), "new"))
    return findings


def load_baseline(path: Path = BASELINE) -> dict:
    if not path.exists():
        return {"tolerance": DEFAULT_TOLERANCE, "profiles": {}}
    return json.loads(path.read_text())


def updated_baseline(current: dict, profile: str, measured: dict[str, dict], note: str) -> dict:
    """The baseline with ``profile``'s ratios replaced by the measured ones (others kept)."""
    profiles = dict(current.get("profiles", {}))
    profiles[profile] = {
        "note": note,
        "ratios": {name: {"value": round(r["value"], 4), "better": r.get("better", "higher")}
                   for name, r in sorted(measured.items())},
        "tolerances": profiles.get(profile, {}).get("tolerances", {}),
    }
    return {**current, "tolerance": current.get("tolerance", DEFAULT_TOLERANCE), "profiles": profiles}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", type=Path, default=REPO / ".state" / "bench" / "summary.json")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--profile", help="baseline profile (default: the summary's)")
    parser.add_argument("--tolerance", type=float, help="override the baseline's tolerance")
    parser.add_argument("--update", action="store_true",
                        help="write the measured ratios as the profile's new baseline")
    parser.add_argument("--note", default="", help="with --update: where and how it was measured")
    args = parser.parse_args(argv)

    summary = json.loads(args.summary.read_text())
    profile = args.profile or summary["profile"]
    measured = summary["ratios"]
    baseline = load_baseline(args.baseline)
    if args.update:
        if summary["profile"] != profile:
            print(f"gate: the summary is of profile {summary['profile']!r}, not {profile!r}; "
                  "refusing to record it as that profile's baseline", file=sys.stderr)
            return 2
        new = updated_baseline(baseline, profile, measured, args.note)
        args.baseline.write_text(json.dumps(new, indent=2) + "\n")
        print(f"baseline {args.baseline}: profile {profile!r} now holds {len(measured)} ratios")
        return 0
    if profile not in baseline.get("profiles", {}):
        print(f"gate: no baseline for profile {profile!r} in {args.baseline}; record one with "
              f"scripts/bench.sh --update-baseline", file=sys.stderr)
        return 2
    entry = baseline["profiles"][profile]
    tolerance = args.tolerance if args.tolerance is not None else baseline.get("tolerance",
                                                                                DEFAULT_TOLERANCE)
    findings = compare(measured, entry["ratios"], tolerance, entry.get("tolerances"))
    print(f"gate: profile {profile!r}, tolerance {tolerance:.0%} (per-ratio overrides: "
          f"{entry.get('tolerances') or 'none'})")
    for finding in findings:
        print("  " + finding.line())
    failed = [f for f in findings if f.status in ("regressed", "missing")]
    if failed:
        print(f"gate: FAILED, {len(failed)} ratio(s) below the baseline's tolerance or missing; "
              "if the change is deliberate, update the baseline (scripts/bench.sh --update-baseline) "
              "in the same commit and say why")
        return 1
    print("gate: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
