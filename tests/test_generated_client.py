"""A Python client generated from /openapi.json by openapi-python-client creates a server,
rebuilds it and reads it back: the OpenAPI document is usable by code generators."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.live import LiveDaemon

GENERATOR = Path(sys.executable).parent / "openapi-python-client"


@pytest.fixture
def generated(daemon: LiveDaemon, tmp_path: Path) -> Any:
    if not GENERATOR.exists():
        require("openapi-python-client", f"{GENERATOR} is not installed")
    spec = tmp_path / "openapi.json"
    spec.write_text(daemon.client.get("/openapi.json").text)
    subprocess.run(
        [str(GENERATOR), "generate", "--path", str(spec), "--meta", "none",
         "--output-path", str(tmp_path / "rebuildd_client")],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("rebuildd_client")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("rebuildd_client")]:
            del sys.modules[name]
        shutil.rmtree(tmp_path / "rebuildd_client", ignore_errors=True)


def test_generated_client_rebuilds_a_server(daemon: LiveDaemon, generated: Any) -> None:
    """Create, rebuild and show through the generated client's typed calls and models."""
    servers = importlib.import_module("rebuildd_client.api.servers")
    models = importlib.import_module("rebuildd_client.models")
    create_server = importlib.import_module("rebuildd_client.api.servers.create_server")
    server_action = importlib.import_module("rebuildd_client.api.servers.server_action")
    show_server = importlib.import_module("rebuildd_client.api.servers.show_server")
    assert servers is not None
    client = generated.Client(base_url=daemon.url, raise_on_unexpected_status=True)

    body = models.CreateServerBody.from_dict(
        {"server": {"name": "gen", "imageRef": daemon.image_ids[0], "flavorRef": "1"}}
    )
    created = create_server.sync_detailed(client=client, body=body)
    assert created.status_code == 202
    server_id = created.parsed.server.id
    daemon.wait_for(server_id, "ACTIVE")

    rebuild = models.ServerActionBodyType0.from_dict(
        {"rebuild": {"imageRef": daemon.image_ids[1], "name": "generated"}}
    )
    answer = server_action.sync_detailed(server_id, client=client, body=rebuild)
    assert answer.status_code == 202

    deadline = time.monotonic() + 60
    while True:
        shown = show_server.sync(server_id, client=client)
        if shown.server.status == "ACTIVE" and shown.server.name == "generated":
            break
        assert time.monotonic() < deadline, shown
        time.sleep(0.05)
    assert shown.server.image.id == daemon.image_ids[1]
