"""Settings come from REBUILDD_* variables and an optional TOML file; the environment wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from rebuildd.settings import Settings


def test_environment_and_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TOML file fills in settings; an environment variable overrides the file."""
    config = tmp_path / "rebuildd.toml"
    config.write_text('libvirt_uri = "qemu:///system"\nlisten_port = 9000\n')
    monkeypatch.setenv("REBUILDD_CONFIG_FILE", str(config))
    monkeypatch.setenv("REBUILDD_LISTEN_PORT", "9100")
    monkeypatch.setenv("REBUILDD_STATE_DIR", str(tmp_path))
    settings = Settings()
    assert settings.libvirt_uri == "qemu:///system"
    assert settings.listen_port == 9100
    assert settings.effective_database_url == f"sqlite+aiosqlite:///{tmp_path}/rebuildd.db"


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    """A misspelt setting is an error, not silently ignored."""
    with pytest.raises(ValueError, match="libvirt_urii"):
        Settings(state_dir=tmp_path, libvirt_urii="x")  # type: ignore[call-arg]
