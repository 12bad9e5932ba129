#!/usr/bin/env python3
"""Copy the alert rules and dashboards into the Helm chart (Helm can only read files inside a chart).

The single source stays at the repository root (``alerts/jobqueue-alerts.yaml``, ``dashboards/*.json``);
the chart reads byte-identical copies from ``helm/jobqueue-exporter/files/``. Run this after editing a
rules file or a dashboard, and before ``helm package``:

    python helm/sync_assets.py           # copy (and delete copies whose source is gone)
    python helm/sync_assets.py --check   # exit 1 listing every copy that differs from its source

``tests/test_helm.py`` fails while any copy differs, so a copy can never drift from its source.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART_FILES = ROOT / "helm" / "jobqueue-exporter" / "files"
# (source directory, glob, directory under the chart's files/)
ASSETS = [
    (ROOT / "alerts", "jobqueue-alerts.yaml", "alerts"),
    (ROOT / "dashboards", "*.json", "dashboards"),
]


def _rel(path: Path) -> str:
    """A path as shown in messages: relative to the repository when inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def expected() -> dict[Path, Path]:
    """Chart copy -> its source, for every asset."""
    pairs: dict[Path, Path] = {}
    for source_dir, pattern, target in ASSETS:
        for source in sorted(source_dir.glob(pattern)):
            pairs[CHART_FILES / target / source.name] = source
    return pairs


def stray() -> list[Path]:
    """Files under the chart's asset directories that have no source (a renamed or deleted asset)."""
    wanted = set(expected())
    found = []
    for _, _, target in ASSETS:
        directory = CHART_FILES / target
        if directory.is_dir():
            found += [p for p in sorted(directory.iterdir()) if p.is_file() and p not in wanted]
    return found


def differences() -> list[str]:
    """One line per copy that is missing, differs from its source, or has no source."""
    problems = []
    for copy, source in expected().items():
        rel_copy, rel_source = _rel(copy), _rel(source)
        if not copy.is_file():
            problems.append(f"{rel_copy} is missing (source: {rel_source})")
        elif copy.read_bytes() != source.read_bytes():
            problems.append(f"{rel_copy} differs from {rel_source}")
    problems += [f"{_rel(p)} has no source any more" for p in stray()]
    return problems


def sync() -> list[str]:
    """Make the chart's copies equal their sources; return what changed."""
    changed = []
    for copy, source in expected().items():
        data = source.read_bytes()
        if not copy.is_file() or copy.read_bytes() != data:
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(data)
            changed.append(f"copied {_rel(source)} -> {_rel(copy)}")
    for path in stray():
        path.unlink()
        changed.append(f"removed {_rel(path)}")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="only report differences; exit 1 if any"
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = differences()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run: python helm/sync_assets.py", file=sys.stderr)
            return 1
        print("chart assets are in sync with alerts/ and dashboards/")
        return 0
    for line in sync() or ["chart assets already in sync"]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
