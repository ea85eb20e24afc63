"""Token authentication, Nova's policy rules, project isolation, and lock/unlock."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rebuildd import errors, migrations
from rebuildd.auth import Identity, TokensFileError, TokenTable, parse_tokens
from rebuildd.daemon import SettingsError, open_daemon
from rebuildd.settings import Settings
from tests.live import LiveDaemon, start_live_daemon

TOKENS = """
[tokens.admin-token]
user_id = "alice"
project_id = "demo"
roles = ["admin", "member", "reader"]

[tokens.member-token]
user_id = "bob"
project_id = "demo"
roles = ["member", "reader"]

[tokens.reader-token]
user_id = "dave"
project_id = "demo"
roles = ["reader"]

[tokens.other-token]
user_id = "carol"
project_id = "other"
roles = ["member", "reader"]
"""


def _start(tmp_path: Path, policy: str | None = None) -> LiveDaemon:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS)
    extra: dict[str, Any] = {"auth": "token", "tokens_file": tokens}
    if policy is not None:
        (tmp_path / "policy.toml").write_text(policy)
        extra["policy_file"] = tmp_path / "policy.toml"
    live = start_live_daemon(tmp_path / "state", **extra)
    live.client.headers["X-Auth-Token"] = "admin-token"  # the helpers' polling client
    return live


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[LiveDaemon]:
    live = _start(tmp_path)
    try:
        yield live
    finally:
        live.stop()


def _as(live: LiveDaemon, token: str, version: str = "2.1") -> httpx.Client:
    headers = {"X-Auth-Token": token, "OpenStack-API-Version": f"compute {version}"}
    return httpx.Client(base_url=live.url, headers=headers, timeout=30)


def _create(client: httpx.Client, live: LiveDaemon) -> str:
    body = {"server": {"name": "vm", "imageRef": live.image_ids[0], "flavorRef": "1"}}
    response = client.post("/v2.1/servers", json=body)
    assert response.status_code == 202, response.text
    server_id: str = response.json()["server"]["id"]
    live.poll(server_id, lambda s: s["status"] == "ACTIVE", "ACTIVE")
    return server_id


def _rebuild(client: httpx.Client, live: LiveDaemon, server_id: str) -> httpx.Response:
    return client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": live.image_ids[1]}}
    )


class TestAuthentication:
    def test_no_or_unknown_token_is_401(self, secured: LiveDaemon) -> None:
        """Without a known X-Auth-Token every API call is 401 unauthorized."""
        for headers in ({}, {"X-Auth-Token": "notused"}):
            response = httpx.get(f"{secured.url}/v2.1/servers", headers=headers)
            assert response.status_code == 401
            assert response.json()["unauthorized"]["code"] == 401
            assert httpx.get(f"{secured.url}/image/v2/images", headers=headers).status_code == 401

    def test_version_documents_need_no_token(self, secured: LiveDaemon) -> None:
        """Clients discover versions before they authenticate."""
        for path in ("/", "/v2.1", "/v2.1/", "/image", "/image/"):
            assert httpx.get(f"{secured.url}{path}").status_code == 200, path


class TestPolicy:
    def test_a_member_rebuilds_its_projects_server(self, secured: LiveDaemon) -> None:
        """The owner project's member may rebuild (Nova's PROJECT_MEMBER_OR_ADMIN)."""
        with _as(secured, "member-token") as member:
            server_id = _create(member, secured)
            assert _rebuild(member, secured, server_id).status_code == 202
            secured.wait_for(server_id, "ACTIVE")
            actions = member.get(f"/v2.1/servers/{server_id}/os-instance-actions").json()
            assert actions["instanceActions"][0]["user_id"] == "bob"

    def test_another_projects_server_is_404(self, secured: LiveDaemon) -> None:
        """A server of another project does not exist for the caller."""
        with _as(secured, "member-token") as member, _as(secured, "other-token") as other:
            server_id = _create(member, secured)
            assert other.get(f"/v2.1/servers/{server_id}").status_code == 404
            assert _rebuild(other, secured, server_id).status_code == 404
            assert other.get("/v2.1/servers").json()["servers"] == []

    def test_a_reader_may_not_rebuild(self, secured: LiveDaemon) -> None:
        """Without the member role the rebuild rule refuses with Nova's 403 message."""
        with _as(secured, "member-token") as member, _as(secured, "reader-token") as reader:
            server_id = _create(member, secured)
            response = _rebuild(reader, secured, server_id)
            assert response.status_code == 403
            assert response.json()["forbidden"]["message"] == (
                "Policy doesn't allow os_compute_api:servers:rebuild to be performed."
            )

    def test_admin_only_fields_only_for_admins(self, secured: LiveDaemon) -> None:
        """OS-EXT-SRV-ATTR:* appear for admins only."""
        with _as(secured, "member-token") as member, _as(secured, "admin-token") as admin:
            server_id = _create(member, secured)
            assert (
                "OS-EXT-SRV-ATTR:host"
                not in member.get(f"/v2.1/servers/{server_id}").json()["server"]
            )
            assert (
                "OS-EXT-SRV-ATTR:host" in admin.get(f"/v2.1/servers/{server_id}").json()["server"]
            )

    def test_flavor_create_is_admin_only(self, secured: LiveDaemon) -> None:
        """os-flavor-manage:create is admin-only by default."""
        flavor = {"flavor": {"name": "x", "ram": 64, "vcpus": 1, "disk": 1}}
        with _as(secured, "member-token") as member:
            assert member.post("/v2.1/flavors", json=flavor).status_code == 403

    def test_a_policy_file_overrides_a_rule(self, tmp_path: Path) -> None:
        """With rebuild set to admin, a member gets 403 and an admin 202."""
        live = _start(tmp_path, '[rules]\n"os_compute_api:servers:rebuild" = "admin"\n')
        try:
            with _as(live, "member-token") as member, _as(live, "admin-token") as admin:
                server_id = _create(member, live)
                assert _rebuild(member, live, server_id).status_code == 403
                assert _rebuild(admin, live, server_id).status_code == 202
        finally:
            live.stop()


class TestLock:
    def test_a_locked_server_refuses_members_but_not_admins(self, secured: LiveDaemon) -> None:
        """Locked: a member's rebuild is 409 'is locked'; an admin's goes ahead (Nova)."""
        with _as(secured, "member-token", "2.73") as member, _as(secured, "admin-token") as admin:
            server_id = _create(member, secured)
            lock = {"lock": {"locked_reason": "maintenance"}}
            assert member.post(f"/v2.1/servers/{server_id}/action", json=lock).status_code == 202
            shown = member.get(f"/v2.1/servers/{server_id}").json()["server"]
            assert (shown["locked"], shown["locked_reason"]) == (True, "maintenance")
            refused = _rebuild(member, secured, server_id)
            assert refused.status_code == 409
            assert (
                refused.json()["conflictingRequest"]["message"] == f"Instance {server_id} is locked"
            )
            assert _rebuild(admin, secured, server_id).status_code == 202
            secured.wait_for(server_id, "ACTIVE")
            unlock = member.post(f"/v2.1/servers/{server_id}/action", json={"unlock": None})
            assert unlock.status_code == 202
            assert member.get(f"/v2.1/servers/{server_id}").json()["server"]["locked"] is False

    def test_only_an_admin_lifts_an_admins_lock(self, secured: LiveDaemon) -> None:
        """A lock set by an admin of another project needs unlock_override to lift."""
        # alice is an admin of project 'demo'; carol's server is in project 'other'.
        with _as(secured, "other-token") as other, _as(secured, "admin-token") as admin:
            server_id = _create(other, secured)
            assert (
                admin.post(f"/v2.1/servers/{server_id}/action", json={"lock": None}).status_code
                == 202
            )
            refused = other.post(f"/v2.1/servers/{server_id}/action", json={"unlock": None})
            assert refused.status_code == 403
            assert (
                admin.post(f"/v2.1/servers/{server_id}/action", json={"unlock": None}).status_code
                == 202
            )

    def test_lock_reason_needs_2_73(self, secured: LiveDaemon) -> None:
        """Below 2.73 the lock body must be null."""
        with _as(secured, "member-token") as member:
            server_id = _create(member, secured)
            body = {"lock": {"locked_reason": "x"}}
            assert member.post(f"/v2.1/servers/{server_id}/action", json=body).status_code == 400


class TestTokensFile:
    @pytest.mark.parametrize(
        ("text", "reason"),
        [
            ('[tokens.""]\nuser_id = "u"\nproject_id = "p"\nroles = ["admin"]\n', "empty token"),
            ('[tokens."  "]\nuser_id = "u"\nproject_id = "p"\nroles = ["member"]\n', "empty"),
            ('[tokens.t]\nuser_id = "u"\nproject_id = "p"\nroles = []\n', "must not be empty"),
            ('[tokens.t]\nuser_id = "u"\nproject_id = "p"\nroles = "admin"\n', "must be a list"),
            ('[tokens.t]\nuser_id = "u"\nproject_id = "p"\nroles = [""]\n', "must be a list"),
            ('[tokens.t]\nuser_id = ""\nproject_id = "p"\n', "user_id"),
            ('[tokens.t]\nuser_id = "u"\n', "project_id"),
            ("[tokens\n", "not TOML"),
        ],
    )
    def test_a_token_that_would_let_anyone_in_is_refused_at_load(
        self, text: str, reason: str
    ) -> None:
        """An empty token, an empty or non-list role list, or a missing id stops the load."""
        with pytest.raises(TokensFileError, match=reason):
            parse_tokens(text)

    def test_roles_imply_the_lesser_ones(self) -> None:
        """As Keystone's default implied roles: admin -> member -> reader."""
        tokens = parse_tokens('[tokens.t]\nuser_id = "u"\nproject_id = "p"\nroles = ["admin"]\n')
        assert tokens["t"].roles == ("admin", "member", "reader")

    def test_the_daemon_does_not_start_with_an_empty_token(self, tmp_path: Path) -> None:
        """``[tokens.""]`` stops the start with one line naming the file."""
        tokens = tmp_path / "tokens.toml"
        tokens.write_text('[tokens.""]\nuser_id = "u"\nproject_id = "p"\nroles = ["admin"]\n')
        settings = Settings(state_dir=tmp_path / "state", auth="token", tokens_file=tokens)
        settings.state_dir.mkdir()
        migrations.upgrade(settings.effective_database_url)
        with pytest.raises(SettingsError, match=f"{tokens}: tokens.'': an empty token"):
            asyncio.run(open_daemon(settings))

    async def test_no_token_is_not_the_empty_token(self) -> None:
        """A request without a token never matches any entry."""
        table = TokenTable({"x": Identity("u", "p", ("reader",))})
        for token in (None, ""):
            with pytest.raises(errors.Unauthorized):
                await table.authenticate(token)
