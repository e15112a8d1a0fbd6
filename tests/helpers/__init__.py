"""Test helpers: tiny models named for the case they cover, hostile-file builders, paths."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"
