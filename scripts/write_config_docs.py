"""Regenerate docs/configuration.md from the config dataclasses."""

from pathlib import Path

from spine_ttrl.config import configuration_markdown

path = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
path.write_text(configuration_markdown())
print(f"wrote {path}")
