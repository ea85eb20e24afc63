"""A browser on the host cannot drive rebuildd, and its defaults are safe (issue 17, part 4).

A page can send a cross-site POST without a preflight only as text/plain, a form type or no
type, so every body must be JSON (or the upload's and JSON-patch's own types), as Nova's 415;
a page whose name resolves to this host (DNS rebinding) sends its own name as Host, so the Host
must be trusted. The start refuses what would be unsafe or mistyped, in one line.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.process import BIN, free_port

ROOT = Path(__file__).parent.parent


def _serve(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``rebuildd serve`` in a clean environment; a start that is not refused runs until the
    timeout (the test fails on TimeoutExpired)."""
    base = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "REBUILDD_STATE_DIR": str(tmp_path),
        "REBUILDD_LISTEN_PORT": str(free_port()),
    }
    return subprocess.run(
        [str(BIN), "serve", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _refused(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


class TestStart:
    @pytest.mark.parametrize(
        ("env", "expected"),
        [
            (
                {"REBUILDD_LIBVIRT_URL": "qemu:///system"},
                "unknown setting REBUILDD_LIBVIRT_URL; did you mean REBUILDD_LIBVIRT_URI?",
            ),
            (
                {"REBUILDD_TEST_KILL_AT": "rebuild:check_host:before"},
                "unknown setting REBUILDD_TEST_KILL_AT",
            ),
            (
                {"REBUILDD_CONFIG_FILE": "/nonexistent/rebuildd.toml"},
                "REBUILDD_CONFIG_FILE: /nonexistent/rebuildd.toml does not exist",
            ),
            (
                {"REBUILDD_LISTEN_PORT": "eighty"},
                "invalid setting REBUILDD_LISTEN_PORT",
            ),
            (
                {"REBUILDD_AUTH": "token", "REBUILDD_TOKENS_FILE": "/nonexistent/tokens.toml"},
                "REBUILDD_TOKENS_FILE: /nonexistent/tokens.toml does not exist",
            ),
        ],
    )
    def test_a_mistyped_setting_or_a_missing_file_stops_the_start(
        self, tmp_path: Path, env: dict[str, str], expected: str
    ) -> None:
        """The start stops with one line naming the setting (and the closest valid one)."""
        assert expected in _refused(_serve(tmp_path, env))

    def test_an_unknown_key_in_the_config_file_stops_the_start(self, tmp_path: Path) -> None:
        """A mistyped key of the TOML file is named with the closest valid key."""
        config = tmp_path / "rebuildd.toml"
        config.write_text('libvirt_url = "qemu:///system"\n')
        line = _refused(_serve(tmp_path, {"REBUILDD_CONFIG_FILE": str(config)}))
        assert f"unknown setting libvirt_url in {config}; did you mean libvirt_uri?" in line

    def test_the_test_suite_sets_no_variable_the_daemon_refuses(self) -> None:
        """Variables the test suite reads are not named REBUILDD_* (the daemons inherit them)."""
        from rebuildd.settings import Settings

        pattern = re.compile(r"\bREBUILDD_([A-Z][A-Z0-9_]*)\b")
        sources = [*ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"), ROOT / "Makefile"]
        sources += [*ROOT.glob("scripts/*"), ROOT / "Dockerfile", *ROOT.glob("packaging/*")]
        unknown = {
            f"{path.name}: REBUILDD_{name}"
            for path in sources
            if path.is_file() and path != Path(__file__)
            for name in pattern.findall(path.read_text())
            if name.lower() not in Settings.model_fields
            and name != "NS"  # tests/xmlutil.py's namespace constant
            and not name.endswith("_")  # a prefix in prose: REBUILDD_KEYSTONE_*
        }
        assert not unknown


def _runtime_env(dockerfile: Path) -> str:
    """The ENV instructions of the Dockerfile's last stage, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    last_stage = text.rsplit("\nFROM ", 1)[1]
    return "\n".join(line for line in last_stage.splitlines() if line.startswith("ENV "))
