"""The small built-in demo: five public-domain photos with captions and masks (see ATTRIBUTION.md)."""
from pathlib import Path

DEMO_DATASET_DIR = Path(__file__).parent / "dataset"
