"""A browser on the host cannot drive rebuildd, and its defaults are safe (issue 17, part 4).

A page can send a cross-site POST without a preflight only as text/plain, a form type or no
type, so every body must be JSON (or the upload's and JSON-patch's own types), as Nova's 415;
a page whose name resolves to this host (DNS rebinding) sends its own name as Host, so the Host
must be trusted. The start refuses what would be unsafe or mistyped, in one line.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live import LiveDaemon, start_live_daemon
from tests.process import BIN, DaemonProcess, free_port

ROOT = Path(__file__).parent.parent
UNSUPPORTED = {"badMediaType": {"code": 415, "message": "Unsupported Content-Type"}}
BAD_HOST = {"badRequest": {"code": 400, "message": "Invalid Host header."}}
SERVER = b'{"server": {"name": "csrf", "imageRef": "%s", "flavorRef": "1"}}'


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDaemon]:
    daemon = start_live_daemon(
        tmp_path_factory.mktemp("browser"), allowed_hosts=["api.example", ".cloud.example"]
    )
    yield daemon
    daemon.stop()


def _servers(live: LiveDaemon) -> list[str]:
    return [s["name"] for s in live.client.get("/v2.1/servers").json()["servers"]]


class TestMediaType:
    @pytest.mark.parametrize(
        "content_type",
        [
            "text/plain",
            "text/plain; charset=UTF-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            None,
        ],
    )
    def test_a_create_in_a_browser_simple_type_is_refused(
        self, live: LiveDaemon, content_type: str | None
    ) -> None:
        """A JSON body sent as a type a page may send cross-site creates nothing: 415."""
        headers = {"Content-Type": content_type} if content_type else {}
        response = live.client.post(
            "/v2.1/servers", content=SERVER % live.image_ids[0].encode(), headers=headers
        )
        if content_type is None:  # httpx adds no type of its own to raw content
            assert "content-type" not in response.request.headers
        assert response.status_code == 415, response.text
        assert response.json() == UNSUPPORTED
        assert "csrf" not in _servers(live)

    @pytest.mark.parametrize(
        ("method", "path", "content_type"),
        [
            ("POST", "/image/v2/images", "text/plain"),
            ("POST", "/volume/v3/demo/volumes", "text/plain"),
            ("POST", "/v2.1/os-keypairs", "text/plain"),
            ("POST", "/v2.1/os-server-external-events", "text/plain"),
            ("PUT", "/v2.1/servers/00000000-0000-0000-0000-000000000000", "text/plain"),
            ("PUT", "/image/v2/images/00000000-0000-0000-0000-000000000000/file", "text/plain"),
            ("PUT", "/image/v2/images/00000000-0000-0000-0000-000000000000/file", None),
            (
                "PATCH",
                "/image/v2/images/00000000-0000-0000-0000-000000000000",
                "application/json",
            ),
        ],
    )
    def test_every_api_refuses_a_body_of_another_type(
        self, live: LiveDaemon, method: str, path: str, content_type: str | None
    ) -> None:
        """Compute, image and volume routes read a body only in their own media type."""
        headers = {"Content-Type": content_type} if content_type else {}
        response = live.client.request(method, path, content=b"{}", headers=headers)
        assert response.status_code == 415, response.text
        assert response.json() == UNSUPPORTED

    @pytest.mark.parametrize(
        ("path", "content_type"),
        [
            ("/v2.1/servers", "application/json; charset=UTF-8"),
            ("/v2.1/servers", "Application/JSON"),
            ("/v2.1/servers", "application/vnd.openstack.compute+json"),
            ("/volume/v3/demo/volumes", "application/json;charset=utf-8"),
            ("/image/v2/images", "application/json; charset=UTF-8"),
        ],
    )
    def test_json_with_parameters_or_a_vendor_type_is_read(
        self, live: LiveDaemon, path: str, content_type: str
    ) -> None:
        """JSON with a charset, in any case, or Nova's vendor type, reaches the route."""
        response = live.client.post(path, content=b"[]", headers={"Content-Type": content_type})
        assert response.status_code == 400, response.text

    def test_an_upload_as_octet_stream_is_read(self, live: LiveDaemon) -> None:
        """The image upload takes application/octet-stream (Glance's one type for it)."""
        response = live.client.put(
            "/image/v2/images/00000000-0000-0000-0000-000000000000/file",
            content=b"x",
            headers={"Content-Type": "application/octet-stream"},
        )
        assert response.status_code == 404, response.text

    def test_a_post_without_a_body_needs_no_type(self, live: LiveDaemon) -> None:
        """An empty POST carries nothing to read: the route answers it (here 400)."""
        response = live.client.post("/v2.1/servers")
        assert response.status_code == 400, response.text


class TestHost:
    @pytest.mark.parametrize(
        "host", ["rebind.attacker.example", "rebind.attacker.example:8774", "127.0.0.1.nip.io", ""]
    )
    def test_an_untrusted_host_is_refused(self, live: LiveDaemon, host: str) -> None:
        """A Host that is not loopback nor configured (DNS rebinding) is 400, nothing echoed."""
        response = live.client.post(
            "/v2.1/servers",
            json={"server": {"name": "rebind", "imageRef": live.image_ids[0], "flavorRef": "1"}},
            headers={"Host": host},
        )
        assert response.status_code == 400, response.text
        assert response.json() == BAD_HOST
        assert "location" not in response.headers
        assert "rebind" not in _servers(live)

    @pytest.mark.parametrize(
        "host",
        [
            "localhost",
            "localhost:8774",
            "LOCALHOST.",
            "127.0.0.1",
            "127.0.0.1:1",
            "127.1.2.3:8774",
            "[::1]",
            "[::1]:8774",
            "api.example",
            "api.example:443",
            "cloud.example",
            "region.cloud.example:8774",
        ],
    )
    def test_loopback_and_configured_hosts_are_answered(self, live: LiveDaemon, host: str) -> None:
        """Loopback names and addresses and REBUILDD_ALLOWED_HOSTS, with a port or without."""
        response = live.client.get("/v2.1/servers", headers={"Host": host})
        assert response.status_code == 200, response.text

    def test_the_listen_address_and_public_url_are_trusted(self) -> None:
        """Besides loopback, the daemon's own names come from the settings it was given."""
        from rebuildd.api import TrustedHosts
        from rebuildd.settings import Settings

        settings = Settings(listen_host="10.1.2.3", public_url="https://compute.example/v2")
        hosts = TrustedHosts(settings.trusted_hosts)
        assert hosts.allows("10.1.2.3:8774") and hosts.allows("compute.example")
        assert not hosts.allows("10.1.2.4:8774")
        assert not TrustedHosts(Settings(listen_host="0.0.0.0").trusted_hosts).allows("0.0.0.0")

    def test_a_star_trusts_every_host(self) -> None:
        """REBUILDD_ALLOWED_HOSTS=* turns the check off (a proxy in front checks it)."""
        from rebuildd.api import TrustedHosts

        assert TrustedHosts(["*"]).allows("anything.example")


def _serve(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``rebuildd serve`` in a clean environment over a migrated database; a start that is not
    refused runs until the timeout (the test then fails on TimeoutExpired)."""
    base = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "REBUILDD_STATE_DIR": str(tmp_path),
        "REBUILDD_LISTEN_PORT": str(free_port()),
    }
    subprocess.run([str(BIN), "db", "upgrade"], env=base, capture_output=True, check=True)
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
    @pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "myhost.example"])
    def test_no_unauthenticated_api_beyond_loopback(self, tmp_path: Path, host: str) -> None:
        """With auth=none, serve refuses any listen address but loopback, in one line."""
        line = _refused(_serve(tmp_path, {}, "--host", host))
        assert "REBUILDD_AUTH=none" in line and "REBUILDD_ALLOW_INSECURE_LISTEN" in line

    def test_insecure_listen_when_told_so(self, tmp_path: Path) -> None:
        """REBUILDD_ALLOW_INSECURE_LISTEN=true serves auth=none on every interface, to the
        hosts of REBUILDD_ALLOWED_HOSTS (comma-separated) and loopback only."""
        daemon = DaemonProcess(
            tmp_path,
            listen_host="0.0.0.0",
            allow_insecure_listen="true",
            allowed_hosts="api.example, .cloud.example",
        )
        daemon.prepare()
        daemon.start()
        try:
            for host, status in [
                ("api.example:8774", 200),
                ("nova.cloud.example", 200),
                ("localhost", 200),
                ("rebind.attacker.example", 400),
            ]:
                response = httpx.get(
                    f"{daemon.url}/v2.1/flavors", headers={"Host": host}, timeout=30
                )
                assert response.status_code == status, (host, response.text)
        finally:
            daemon.stop()

    def test_the_container_default_is_not_an_open_admin_api(self, tmp_path: Path) -> None:
        """The Dockerfile's environment alone does not serve an unauthenticated API."""
        env = dict(re.findall(r"\b(REBUILDD_[A-Z_]+)=(\S+)", _runtime_env(ROOT / "Dockerfile")))
        assert env.get("REBUILDD_LISTEN_HOST") == "0.0.0.0", env
        env.pop("REBUILDD_STATE_DIR")
        line = _refused(_serve(tmp_path, env))
        assert "REBUILDD_TOKENS_FILE" in line or "REBUILDD_AUTH" in line, line

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
