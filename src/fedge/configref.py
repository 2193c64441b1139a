"""``docs/CONFIG.md``: the reference of hub.toml and agent.toml, generated from the config definitions.

``python -m fedge.configref`` rewrites it; ``tests/layout/test_config_reference.py`` fails when the file and
the code disagree, so the reference cannot drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedge.edge_agent.config import reference_sections as agent_sections
from fedge.hub.config import reference_sections as hub_sections
from fedge.protocol.configdoc import markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"

INTRO = """# Configuration reference

Generated from the config definitions by `python -m fedge.configref` (do not edit by hand). Both files are
TOML; relative paths resolve against the folder of the file. A malformed file is refused with an error that
names the key (`config field 'rounds.deadline_s': must be > 0, got -1`). Starter files with every key:
`fedge hub init` and `fedge-agent init`; check a file without starting anything: `fedge hub serve --check`
and `fedge-agent run --check`.
"""


def render() -> str:
    return "\n".join([
        INTRO,
        markdown("hub.toml", "The hub daemon: `fedge hub serve --config hub.toml`.", hub_sections()),
        markdown("agent.toml", "An edge agent: `fedge-agent run --config agent.toml`.", agent_sections()),
    ]).rstrip() + "\n"


def main() -> int:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(render(), encoding="utf-8")
    print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
