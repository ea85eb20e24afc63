"""The README's walk-through works verbatim against a live daemon; the docs document every
setting, and every link in them resolves inside the repository."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from rebuildd.settings import Settings
from tests.live import LiveDaemon

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _walkthrough() -> str:
    text = README.read_text()
    block = text.split("<!-- walkthrough -->", 1)[1].split("<!-- /walkthrough -->", 1)[0]
    match = re.search(r"```sh\n(.*?)```", block, re.S)
    assert match is not None
    return match.group(1)


def test_walkthrough_runs_verbatim(daemon: LiveDaemon) -> None:
    """Every command of the walk-through succeeds and prints what the README promises."""
    script = "set -euo pipefail\n" + _walkthrough()
    result = subprocess.run(
        ["bash", "-c", script],
        env={**os.environ, "API": daemon.url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert (
        "['demo-image-b', 'demo-image-a']" in lines or "['demo-image-a', 'demo-image-b']" in lines
    )
    assert "['m1.tiny', 'm1.small']" in lines
    assert "REBUILD" in lines
    assert f"('x', '{daemon.image_ids[1]}')" in lines
    assert "['rebuild', 'create']" in lines
    assert "[('rebuild_server', 'Success'), ('compute_rebuild_instance', 'Success')]" in lines


def test_every_setting_is_documented() -> None:
    """Each Settings field appears in docs/configuration.md as its environment variable."""
    text = CONFIGURATION.read_text()
    missing = [n for n in Settings.model_fields if f"`REBUILDD_{n.upper()}`" not in text]
    assert missing == []


def test_every_link_resolves_inside_the_repository() -> None:
    """Each relative link of the README and docs/ names a file of this repository, and none
    leaves it (a clone has nothing beside it)."""
    broken = []
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            path = (doc.parent / target).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{doc.name}: {target}")
        if "../shared" in text:
            broken.append(f"{doc.name}: ../shared")
    assert broken == []


def test_readme_is_short() -> None:
    """The README stays a five-minute read: reference material lives in docs/."""
    assert len(README.read_bytes()) < 10_000
