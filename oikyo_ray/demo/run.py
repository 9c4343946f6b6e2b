"""Where the demo's embedded config lives (`oikyo demo` = `oikyo finetune` on it)."""

from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
