"""The README stays true to the code: every metric family the exporter serves is in the metrics reference,
every configuration key of a target in the configuration reference, every preset in the presets table."""

from __future__ import annotations

from pathlib import Path

from jobqueue_exporter.config import Target, known_presets
from jobqueue_exporter.metrics import FAMILIES

README = (Path(__file__).parent.parent / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def test_every_metric_family_is_in_the_metrics_reference() -> None:
    reference = section("Metrics reference")
    missing = [f.sample_name for f in FAMILIES if f"`{f.sample_name}`" not in reference]
    assert missing == [], f"add to the README's metrics reference: {missing}"


def test_every_target_key_is_in_the_configuration_reference() -> None:
    reference = section("Configuration reference")
    keys = [field.alias or name for name, field in Target.model_fields.items()]
    missing = [key for key in keys if f"`{key}`" not in reference]
    assert missing == [], f"add to the README's configuration reference: {missing}"


def test_every_preset_is_in_the_presets_table() -> None:
    reference = section("Configuration reference")
    missing = [name for name in known_presets() if f"| `{name}`" not in reference]
    assert missing == [], f"add to the README's presets table: {missing}"
