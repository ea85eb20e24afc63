"""Hostile input over HTTP: secrets are never echoed or logged, bodies that are not JSON objects
and parameters that do not validate are 400 Nova faults (never a 422 or a 500), and hostile
server names and metadata reach neither a file path nor libvirt's XML unescaped."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog.testing
from lxml import etree

from rebuildd import schemas
from tests.live import LiveDaemon
from tests.xmlutil import REBUILDD_NS

ADMIN_PASS = "Adm1nPa55-zq9XbW"
USER_DATA = "dXNlci1kYXRhLXNlY3JldC1xN3RWbQ=="
FILE_CONTENTS = "cGVyc29uYWxpdHktc2VjcmV0LWs4Zlo="
SECRETS = (ADMIN_PASS, USER_DATA, FILE_CONTENTS)
POST_ROUTES = (
    "/v2.1/servers",
    "/v2.1/servers/{server_id}/action",
    "/v2.1/flavors",
    "/v2.1/os-keypairs",
    "/image/v2/images",
)


def _message(response: httpx.Response) -> str:
    """The message of a Nova fault body (which must be one)."""
    ((_name, fault),) = response.json().items()
    assert fault["code"] == response.status_code, response.text
    message: str = fault["message"]
    return message


@contextmanager
def no_secret_logged() -> Iterator[list[MutableMapping[str, Any]]]:
    """Capture every structlog event (the live daemon runs in this process) and fail if any
    of them shows a secret."""
    with structlog.testing.capture_logs() as logs:
        yield logs
    for event in logs:
        for secret in SECRETS:
            assert secret not in repr(event), event


def _create_body(daemon: LiveDaemon, **extra: Any) -> dict[str, Any]:
    server = {"name": "s", "imageRef": daemon.image_ids[0], "flavorRef": "1"}
    return {"server": {**server, **extra}}


class TestSecretsAreNeverEchoed:
    @pytest.mark.parametrize(
        "server",
        [
            {"adminPass": ADMIN_PASS, "user_data": USER_DATA, "bogus": 1},
            {"adminPass": [ADMIN_PASS]},
            {"adminPass": {"nested": ADMIN_PASS}},
            {"user_data": [USER_DATA], "adminPass": ADMIN_PASS},
            {"user_data": USER_DATA * 3000, "adminPass": ADMIN_PASS},
            {"adminPass": ADMIN_PASS, "user_data": USER_DATA, "name": None},
            {"adminPass": ADMIN_PASS, "user_data": USER_DATA, "accessIPv4": "x"},
        ],
        ids=[
            "unknown-field",
            "adminPass-list",
            "adminPass-object",
            "user_data-list",
            "user_data-too-long",
            "null-name",
            "bad-ip",
        ],
    )
    def test_refused_create_shows_stars(self, daemon: LiveDaemon, server: dict[str, Any]) -> None:
        """A create refused for any reason names the field but shows secrets as ***."""
        with no_secret_logged() as logs:
            response = daemon.client.post("/v2.1/servers", json=_create_body(daemon, **server))
        assert response.status_code == 400, response.text
        message = _message(response)
        assert not any(secret in response.text for secret in SECRETS), message
        # The whole object is echoed for an unknown or missing key, the field's value else.
        whole_or_secret = "bogus" in server or "adminPass" in message or "user_data" in message
        assert ("***" in message) == whole_or_secret, message
        assert any(event["event"] == "request refused" for event in logs)

    def test_missing_server_key_shows_stars(self, daemon: LiveDaemon) -> None:
        """Even the whole body, echoed when 'server' is missing, is redacted."""
        with no_secret_logged():
            response = daemon.client.post(
                "/v2.1/servers", json={"sever": {"adminPass": ADMIN_PASS, "user_data": USER_DATA}}
            )
        assert response.status_code == 400
        assert "***" in _message(response) and ADMIN_PASS not in response.text

    @pytest.mark.parametrize(
        "rebuild",
        [
            {"adminPass": ADMIN_PASS, "bogus": True},
            {"adminPass": 12345678},
            {"adminPass": [ADMIN_PASS]},
            {"adminPass": ADMIN_PASS, "personality": [{"path": 5, "contents": FILE_CONTENTS}]},
            {"adminPass": ADMIN_PASS, "personality": [{"path": "/a", "contents": [FILE_CONTENTS]}]},
            {"personality": [{"path": "/a", "contents": FILE_CONTENTS, "mode": 1}]},
            {"adminPass": ADMIN_PASS, "name": " padded "},
        ],
        ids=[
            "unknown-field",
            "adminPass-int",
            "adminPass-list",
            "personality-bad-path",
            "personality-contents-list",
            "personality-unknown-field",
            "bad-name",
        ],
    )
    def test_refused_rebuild_shows_stars(self, daemon: LiveDaemon, rebuild: dict[str, Any]) -> None:
        """A rebuild refused for any reason never echoes adminPass or personality contents."""
        server_id = daemon.create_server()
        body = {"rebuild": {"imageRef": daemon.image_ids[1], **rebuild}}
        with no_secret_logged():
            response = daemon.client.post(f"/v2.1/servers/{server_id}/action", json=body)
        assert response.status_code == 400, response.text
        assert not any(secret in response.text for secret in SECRETS), response.text
        assert "12345678" not in response.text
        message = _message(response)
        starred = any(key in message for key in ("adminPass", "contents", "'mode'", "bogus"))
        assert ("***" in message) == starred, message

    def test_accepted_create_and_rebuild_never_log_secrets(self, daemon: LiveDaemon) -> None:
        """Valid requests carrying secrets run to ACTIVE with no secret in any log event, action
        event or notification payload; only the 202 itself returns adminPass, as Nova does."""
        with no_secret_logged() as logs:
            created = daemon.client.post(
                "/v2.1/servers",
                json=_create_body(daemon, adminPass=ADMIN_PASS, user_data=USER_DATA),
            )
            assert created.status_code == 202, created.text
            assert created.json()["server"]["adminPass"] == ADMIN_PASS
            server_id = created.json()["server"]["id"]
            daemon.wait_for(server_id, "ACTIVE")
            rebuild = {
                "rebuild": {
                    "imageRef": daemon.image_ids[1],
                    "adminPass": ADMIN_PASS,
                    "personality": [{"path": "/etc/motd", "contents": FILE_CONTENTS}],
                }
            }
            response = daemon.client.post(f"/v2.1/servers/{server_id}/action", json=rebuild)
            assert response.status_code == 202, response.text
            daemon.wait_for(server_id, "ACTIVE")
        assert len(logs) > 0, "the pipeline logged nothing: the capture is not working"
        actions = daemon.client.get(f"/v2.1/servers/{server_id}/os-instance-actions").json()
        for action in actions["instanceActions"]:
            detail = daemon.client.get(
                f"/v2.1/servers/{server_id}/os-instance-actions/{action['request_id']}",
                headers={"OpenStack-API-Version": "compute 2.84"},
            )
            assert not any(secret in detail.text for secret in SECRETS), detail.text
        notifications = daemon.run(daemon.daemon.store.list_notifications(server_id))
        assert notifications, "no notification was recorded"
        assert not any(secret in repr(notifications) for secret in SECRETS)


class TestShow:
    def test_redacts_at_any_depth(self) -> None:
        """Secret keys are starred wherever they nest; other values are kept."""
        value = {"a": [{"adminPass": "x", "b": {"user_data": "y", "contents": "z", "ok": 1}}]}
        assert schemas.show(value) == (
            "{'a': [{'adminPass': '***', 'b': {'user_data': '***', 'contents': '***', 'ok': 1}}]}"
        )

    def test_is_bounded(self) -> None:
        """A huge value is cut, so a 100 KiB body is not echoed (nor logged) whole."""
        assert len(schemas.show("x" * 100_000)) < 1100


class TestBodiesThatAreNotObjects:
    @pytest.mark.parametrize("route", POST_ROUTES)
    @pytest.mark.parametrize("body", [b"[]", b'"x"', b"5", b"null", b"true", b"[{}]"])
    def test_are_400(self, daemon: LiveDaemon, route: str, body: bytes) -> None:
        """Valid JSON that is not an object is a 400 badRequest on every POST route."""
        path = route.format(server_id=str(uuid.uuid4()))
        response = daemon.client.post(
            path, content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert "badRequest" in response.json()

    @pytest.mark.parametrize("route", POST_ROUTES)
    @pytest.mark.parametrize(
        "body",
        [
            b"{",
            b"",
            b"\xff\xfe",
            b'{"a": NaN}',
            b'{"a": Infinity}',
            b'{"a": 1e400}',
            b'{"a": "\\ud800"}',
            b'{"a": "nul \\u0000"}',
            b"[" * 50_000 + b"]" * 50_000,
        ],
        ids=[
            "truncated",
            "empty",
            "not-utf8",
            "nan",
            "infinity",
            "overflow",
            "surrogate",
            "nul",
            "deep",
        ],
    )
    def test_garbage_is_malformed(self, daemon: LiveDaemon, route: str, body: bytes) -> None:
        """Bodies no JSON parser, JSON encoder or database should accept are 400 Malformed."""
        path = route.format(server_id=str(uuid.uuid4()))
        response = daemon.client.post(
            path, content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert _message(response) == "Malformed request body"


class TestNever422:
    def test_openapi_documents_faults_not_422(self, daemon: LiveDaemon) -> None:
        """The document has no 422 and no FastAPI validation schema; errors are Fault bodies."""
        spec = daemon.client.get("/openapi.json").json()
        assert '"422"' not in daemon.client.get("/openapi.json").text
        assert "HTTPValidationError" not in spec["components"]["schemas"]
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                assert "400" in operation["responses"], (method, path)
                fault = operation["responses"]["400"]["content"]["application/json"]["schema"]
                assert fault == {"$ref": "#/components/schemas/Fault"}

    @pytest.mark.parametrize(
        ("path", "params"),
        [
            ("/v2.1/servers", {"limit": "abc"}),
            ("/v2.1/servers", {"limit": "-1"}),
            ("/v2.1/servers/detail", {"changes-since": "yesterday"}),
            ("/v2.1/servers/detail", {"changes-since": "31677246"}),
            ("/v2.1/servers/detail", {"changes-since": ""}),
            ("/v2.1/servers", {"limit": "1.0"}),
            ("/image/v2/images", {"limit": "0.0"}),
            ("/v2.1/servers/detail", {"changes-since": "9999-12-31T23:59:59-12:00"}),
            ("/image/v2/images", {"limit": "1.5"}),
            ("/v2.1/servers", {"image": "a\x00b"}),
        ],
    )
    def test_bad_query_parameters_are_400(
        self, daemon: LiveDaemon, path: str, params: dict[str, str]
    ) -> None:
        """A query parameter that does not validate is a Nova 400, never FastAPI's 422."""
        response = daemon.client.get(path, params=params)
        assert response.status_code == 400, response.text
        assert "badRequest" in response.json()

    def test_changes_since_takes_iso_8601(self, daemon: LiveDaemon) -> None:
        """A valid changes-since (with Z, an offset, or naive as UTC) still filters."""
        server_id = daemon.create_server()
        for since, listed in [
            ("2000-01-01T00:00:00Z", True),
            ("2000-01-01T00:00:00", True),
            ("9999-01-01T00:00:00+02:00", False),
        ]:
            response = daemon.client.get("/v2.1/servers", params={"changes-since": since})
            assert response.status_code == 200, response.text
            ids = [s["id"] for s in response.json()["servers"]]
            assert (server_id in ids) == listed, since

    def test_uncompilable_name_filter_matches_literally(self, daemon: LiveDaemon) -> None:
        """A name regex Python cannot compile (a repetition's bounds reversed) is matched
        literally."""
        response = daemon.client.get("/v2.1/servers", params={"name": "a{2,1}"})
        assert response.status_code == 200 and response.json()["servers"] == []

    def test_catastrophic_name_filter_is_a_400(self, daemon: LiveDaemon) -> None:
        """A name regex that backtracks without end over a server's name is Nova's 400 with
        a message, and the daemon answers the next request at once."""
        daemon.create_server("a" * 40 + "!")
        response = daemon.client.get("/v2.1/servers", params={"name": "(a|aa)+$"})
        assert response.status_code == 400
        assert "took too long" in response.json()["badRequest"]["message"]
        assert daemon.client.get("/v2.1/servers").status_code == 200

    def test_nul_in_path_is_404(self, daemon: LiveDaemon) -> None:
        """A NUL in a path names no resource."""
        response = daemon.client.get("/v2.1/flavors/a%00b")
        assert response.status_code == 404 and "itemNotFound" in response.json()


class TestPowerActions:
    @pytest.mark.parametrize("value", ["now", {}, 0, []])
    def test_a_value_other_than_null_is_400(self, daemon: LiveDaemon, value: Any) -> None:
        """os-stop and os-start take null, as Nova's schema says; anything else is a 400."""
        server_id = daemon.create_server()
        for action in ("os-stop", "os-start"):
            response = daemon.client.post(f"/v2.1/servers/{server_id}/action", json={action: value})
            assert response.status_code == 400, response.text
            assert "is not of type 'null'" in _message(response)
        assert daemon.server(server_id)["status"] == "ACTIVE"


class TestNumbersAndNames:
    def test_flavor_sizes_beyond_nova_bounds_are_400(self, daemon: LiveDaemon) -> None:
        """ram beyond Nova's 32-bit MAX_INT is a 400, not a database overflow."""
        body = {"flavor": {"name": "huge", "ram": 10**30, "vcpus": 1, "disk": 1}}
        response = daemon.client.post("/v2.1/flavors", json=body)
        assert response.status_code == 400 and "ram" in _message(response)

    @pytest.mark.parametrize("name", ["a\x01b", "tab\there", "line\u2028sep", "bidi\u202e"])
    def test_unprintable_names_are_400(self, daemon: LiveDaemon, name: str) -> None:
        """Names with control, format or separator characters are refused, as Nova does."""
        response = daemon.client.post("/v2.1/servers", json=_create_body(daemon, name=name))
        assert response.status_code == 400, response.text
        assert "name" in _message(response)

    def test_image_properties_must_be_strings(self, daemon: LiveDaemon) -> None:
        """Custom image properties are strings, as in Glance's schema."""
        response = daemon.client.post("/image/v2/images", json={"name": "x", "os": {"a": 1}})
        assert response.status_code == 400

    def test_read_only_image_attributes_are_403(self, daemon: LiveDaemon) -> None:
        """status, size, ... are Glance's to compute: naming one at create is 403."""
        response = daemon.client.post("/image/v2/images", json={"name": "x", "status": "active"})
        assert response.status_code == 403
        assert _message(response) == "Attribute 'status' is read-only."


class TestImageUploads:
    @pytest.mark.parametrize(
        "data",
        [b"QFI\xfb\x00\x00\x00\x03" + b"\xff" * 200, b"\0" * 4096, b""],
        ids=["broken-qcow2-header", "zeros", "empty"],
    )
    def test_bytes_qemu_img_rejects_are_400(self, daemon: LiveDaemon, data: bytes) -> None:
        """Bytes that are not a qcow2 image (even ones qemu-img cannot open) are a 400 that
        names no host path, and the image stays queued for a retry."""
        image = daemon.client.post(
            "/image/v2/images", json={"name": "bad", "disk_format": "qcow2"}
        ).json()
        response = daemon.client.put(
            f"/image/v2/images/{image['id']}/file",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert response.status_code == 400, response.text
        message = _message(response)
        assert message.startswith("Image data is not a valid qcow2 image")
        assert str(daemon.settings.state_dir) not in message
        assert daemon.client.get(f"/image/v2/images/{image['id']}").json()["status"] == "queued"


# -- names and ids never reach a file path or XML unescaped -------------------------------------

HOSTILE_NAMES = (
    "../../etc/passwd",
    "<disk>&\"'",
    ("<&>'\"ü𝔘€/.." * 30)[:255],
)
HOSTILE_METADATA = {"xml": "</metadata><disk type='file'>&amp;&", "path": "../../../../tmp/x"}
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _tree(root: Path) -> set[Path]:
    return {path.relative_to(root) for path in root.rglob("*")}


def _assert_only_uuid_paths(state_dir: Path, new: set[Path], server_id: str) -> None:
    """New files are the database's, cached images (named by uuid), overlay templates (named
    by their base's uuid and a digest), or this server's root disks under
    instances/<uuid>/root-*.qcow2; nothing else, anywhere."""
    for path in new:
        parts = path.parts
        if parts[0].startswith("rebuildd.db"):
            continue
        if parts[0] == "_base":
            assert len(parts) == 2 and UUID_RE.match(parts[1]), path
            continue
        if parts[:2] == ("instances", "_templates"):  # overlay templates: base uuid + digest
            assert len(parts) == 2 or re.fullmatch(
                r"[0-9a-f-]{36}-[0-9a-f]{24}\.qcow2", parts[2]
            ), path
            continue
        assert parts[:2] == ("instances", server_id), path
        if len(parts) == 3:
            assert re.fullmatch(r"root-[0-9a-f]+\.qcow2", parts[2]), path
        else:
            assert len(parts) == 2, path


def _assert_xml_escapes(daemon: LiveDaemon, server: dict[str, Any], name: str) -> None:
    """The domain's XML parses, holds the name only as text, and gained no element from it."""
    domain = server["OS-EXT-SRV-ATTR:instance_name"]
    xml: str = daemon.run(daemon.daemon.hypervisor.domain_xml(domain))
    root = etree.fromstring(xml.encode())
    assert root.findtext("name") == domain == f"rebuildd-{server['id']}"
    assert root.findtext(f"metadata/{{{REBUILDD_NS}}}instance/{{{REBUILDD_NS}}}name") == name
    if "<" in name or "&" in name:
        assert name not in xml
        assert name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in xml
    assert len(root.findall("devices/disk")) == 1
    assert root.find(".//metadata/disk") is None


def test_hostile_names_reach_no_path_and_no_xml_unescaped(daemon: LiveDaemon) -> None:
    """A server created and rebuilt under hostile names and metadata goes ACTIVE each time;
    its files are named by uuids only, under instances/<uuid>/, and libvirt's XML escapes the
    name."""
    state_dir = daemon.settings.state_dir
    before = _tree(state_dir)
    parent_before = set(state_dir.parent.iterdir())
    first, *others = HOSTILE_NAMES
    created = daemon.client.post(
        "/v2.1/servers", json=_create_body(daemon, name=first, metadata=HOSTILE_METADATA)
    )
    assert created.status_code == 202, created.text
    server_id = created.json()["server"]["id"]
    server = daemon.wait_for(server_id, "ACTIVE")
    assert server["name"] == first and server["metadata"] == HOSTILE_METADATA
    _assert_xml_escapes(daemon, server, first)
    for image, name in enumerate(others, start=1):
        metadata = {**HOSTILE_METADATA, "name": name}
        body = {
            "rebuild": {"imageRef": daemon.image_ids[image % 2], "name": name, "metadata": metadata}
        }
        response = daemon.client.post(f"/v2.1/servers/{server_id}/action", json=body)
        assert response.status_code == 202, response.text
        server = daemon.wait_for(server_id, "ACTIVE")
        assert server["name"] == name and server["metadata"] == metadata
        _assert_xml_escapes(daemon, server, name)
    _assert_only_uuid_paths(state_dir, _tree(state_dir) - before, server_id)
    disks = list((state_dir / "instances" / server_id).iterdir())
    assert len(disks) == 1 and disks[0].name.startswith("root-"), disks
    assert set(state_dir.parent.iterdir()) == parent_before
    assert not [p for p in state_dir.rglob("*") if "passwd" in p.name]


def test_next_link_encodes_filter_values(daemon: LiveDaemon) -> None:
    """A name filter holding '&' and '#' comes back encoded in the next link, not as new
    query parameters."""
    for _ in range(2):
        daemon.create_server("a&b #1")
    page = daemon.client.get("/v2.1/servers", params={"name": "a&b #", "limit": 1}).json()
    href = page["servers_links"][0]["href"]
    assert "name=a%26b+%23" in href
    rest = daemon.client.get(href).json()["servers"]
    assert [s["name"] for s in rest] == ["a&b #1"]
