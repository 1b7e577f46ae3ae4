#!/usr/bin/env python3
"""Regenerate docs/config.md, the config reference, from the config dataclasses in lmforge/config.py.

    python3 scripts/gen_config_doc.py

A key's meaning is the `# comment` of its field in lmforge/config.py; tests/test_config.py fails
when docs/config.md differs from what this writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's lmforge, whatever copy is installed

from lmforge.config import reference_markdown
from lmforge.util import atomic_write_text

if __name__ == "__main__":
    target = REPO / "docs" / "config.md"
    atomic_write_text(target, reference_markdown())
    print(f"wrote {target.relative_to(REPO)}")
