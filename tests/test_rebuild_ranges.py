"""The rebuild body's later microversion ranges: user_data (2.57), trusted_image_certificates
(2.63), hostname (2.90 label, 2.94 FQDN), as Nova's request schemas define them."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from tests.live import LiveDaemon


def _rebuild(daemon: LiveDaemon, server_id: str, version: str, **fields: Any) -> httpx.Response:
    body = {"rebuild": {"imageRef": daemon.image_ids[1], **fields}}
    return daemon.client.post(
        f"/v2.1/servers/{server_id}/action",
        json=body,
        headers={"OpenStack-API-Version": f"compute {version}"},
    )


def _shown(daemon: LiveDaemon, server_id: str, version: str) -> dict[str, Any]:
    daemon.wait_for(server_id, "ACTIVE")
    return daemon.server(server_id, **{"OpenStack-API-Version": f"compute {version}"})


class TestUserData:
    def test_user_data_is_set_kept_when_omitted_and_cleared_by_null(
        self, daemon: LiveDaemon
    ) -> None:
        """2.57: user_data replaces the stored value, omitting it keeps it, null clears it."""
        server_id = daemon.create_server()
        data = base64.b64encode(b"#!/bin/sh\necho hi\n").decode()
        first = _rebuild(daemon, server_id, "2.57", user_data=data)
        assert first.status_code == 202, first.text
        assert first.json()["server"]["user_data"] == data
        assert _shown(daemon, server_id, "2.57")["OS-EXT-SRV-ATTR:user_data"] == data
        kept = _rebuild(daemon, server_id, "2.57")
        assert kept.json()["server"]["user_data"] == data
        _shown(daemon, server_id, "2.57")
        cleared = _rebuild(daemon, server_id, "2.57", user_data=None)
        assert cleared.json()["server"]["user_data"] is None

    def test_user_data_must_be_base64(self, daemon: LiveDaemon) -> None:
        """A user_data that is not base64 is a 400 that does not echo it."""
        server_id = daemon.create_server()
        response = _rebuild(daemon, server_id, "2.57", user_data="not base64!")
        assert response.status_code == 400, response.text
        assert "not base64!" not in response.text

    def test_user_data_is_unknown_before_2_57(self, daemon: LiveDaemon) -> None:
        """At 2.56 user_data is not a rebuild field."""
        server_id = daemon.create_server()
        response = _rebuild(daemon, server_id, "2.56", user_data="aGk=")
        assert response.status_code == 400
        assert "'user_data' was unexpected" in response.text


class TestTrustedCertificates:
    def test_duplicate_certificates_are_refused(self, daemon: LiveDaemon) -> None:
        """2.63: trusted_image_certificates must be unique."""
        server_id = daemon.create_server()
        response = _rebuild(daemon, server_id, "2.63", trusted_image_certificates=["a", "a"])
        assert response.status_code == 400, response.text

    def test_certificates_are_unknown_before_2_63(self, daemon: LiveDaemon) -> None:
        """At 2.62 trusted_image_certificates is not a rebuild field."""
        server_id = daemon.create_server()
        response = _rebuild(daemon, server_id, "2.62", trusted_image_certificates=["a"])
        assert response.status_code == 400
        assert "'trusted_image_certificates' was unexpected" in response.text


class TestHostname:
    def test_label_is_set_at_2_90(self, daemon: LiveDaemon) -> None:
        """2.90: a hostname label is stored and shown as OS-EXT-SRV-ATTR:hostname."""
        server_id = daemon.create_server()
        response = _rebuild(daemon, server_id, "2.90", hostname="new-host")
        assert response.status_code == 202, response.text
        assert _shown(daemon, server_id, "2.90")["OS-EXT-SRV-ATTR:hostname"] == "new-host"

    def test_fqdn_is_refused_at_2_90_and_accepted_at_2_94(self, daemon: LiveDaemon) -> None:
        """A dotted hostname is a 400 at 2.90-2.93 and a 202 from 2.94."""
        server_id = daemon.create_server()
        refused = _rebuild(daemon, server_id, "2.93", hostname="a.example.com")
        assert refused.status_code == 400, refused.text
        accepted = _rebuild(daemon, server_id, "2.94", hostname="a.example.com")
        assert accepted.status_code == 202, accepted.text
        assert _shown(daemon, server_id, "2.94")["OS-EXT-SRV-ATTR:hostname"] == "a.example.com"
