"""Version documents, microversion negotiation and headers, legacy paths, OpenAPI, images."""

from __future__ import annotations

import pytest

from rebuildd import errors, microversion
from tests.live import LiveDaemon


class TestMicroversionParsing:
    @pytest.mark.parametrize(
        ("header", "expected"),
        [
            (None, "2.1"),
            ("2.1", "2.1"),
            ("2.100", "2.100"),
            ("latest", "2.104"),
            ("LATEST", "2.104"),
        ],
    )
    def test_negotiate(self, header: str | None, expected: str) -> None:
        """Absent is 2.1, latest the maximum, and 2.100 is (2, 100), not a float."""
        assert str(microversion.negotiate(header)) == expected

    def test_versions_compare_as_integer_pairs(self) -> None:
        """2.100 is newer than 2.99."""
        assert microversion.parse("2.100") > microversion.parse("2.99")

    @pytest.mark.parametrize("header", ["2.105", "3.0", "1.9"])
    def test_out_of_range_is_not_acceptable(self, header: str) -> None:
        """Versions outside 2.1-2.104 are 406."""
        with pytest.raises(errors.VersionNotAcceptable):
            microversion.negotiate(header)

    @pytest.mark.parametrize("header", ["2", "2.a", "abc", "2.01", ""])
    def test_malformed_is_invalid(self, header: str) -> None:
        """Strings that are not MajorNum.MinorNum are 400."""
        with pytest.raises(errors.VersionInvalid):
            microversion.negotiate(header)

    def test_new_header_wins_over_legacy(self) -> None:
        """OpenStack-API-Version (service compute) takes precedence."""
        headers = {
            "openstack-api-version": "volume 3.5, compute 2.19",
            "x-openstack-nova-api-version": "2.3",
        }
        assert microversion.requested(headers) == "2.19"
        assert microversion.requested({"x-openstack-nova-api-version": "2.3"}) == "2.3"


class TestHeadersOverHttp:
    def test_echoes_the_negotiated_version(self, daemon: LiveDaemon) -> None:
        """Both version headers, Vary and the request id headers come back."""
        response = daemon.client.get(
            "/v2.1/flavors", headers={"OpenStack-API-Version": "compute 2.60"}
        )
        assert response.headers["openstack-api-version"] == "compute 2.60"
        assert response.headers["x-openstack-nova-api-version"] == "2.60"
        assert "OpenStack-API-Version" in response.headers["vary"]
        assert response.headers["x-compute-request-id"].startswith("req-")
        assert (
            response.headers["x-openstack-request-id"] == response.headers["x-compute-request-id"]
        )

    def test_no_openstack_request_id_below_2_46(self, daemon: LiveDaemon) -> None:
        """X-OpenStack-Request-ID appears from 2.46."""
        response = daemon.client.get("/v2.1/flavors")
        assert response.headers["x-openstack-nova-api-version"] == "2.1"
        assert "x-openstack-request-id" not in response.headers

    def test_out_of_range_is_406_json(self, daemon: LiveDaemon) -> None:
        """A version above the maximum is 406 with a JSON fault naming the range."""
        response = daemon.client.get(
            "/v2.1/servers", headers={"X-OpenStack-Nova-API-Version": "2.200"}
        )
        assert response.status_code == 406
        assert response.json()["notAcceptable"]["message"] == (
            "Version 2.200 is not supported by the API. Minimum is 2.1 and maximum is 2.104."
        )

    def test_malformed_is_400_json(self, daemon: LiveDaemon) -> None:
        """A malformed version is 400 badRequest."""
        response = daemon.client.get(
            "/v2.1/servers", headers={"OpenStack-API-Version": "compute two"}
        )
        assert response.status_code == 400
        assert "invalid format" in response.json()["badRequest"]["message"]

    def test_unknown_route_is_a_nova_404(self, daemon: LiveDaemon) -> None:
        """Unknown paths are itemNotFound JSON, not HTML."""
        response = daemon.client.get("/v2.1/servers/x/nothing-here")
        assert response.status_code == 404
        assert response.json()["itemNotFound"]["code"] == 404


class TestVersionDocuments:
    def test_root_lists_v2_1_current(self, daemon: LiveDaemon) -> None:
        """GET / lists v2.1 as CURRENT with its range and a self link."""
        (version,) = daemon.client.get("/").json()["versions"]
        assert (version["id"], version["status"]) == ("v2.1", "CURRENT")
        assert (version["min_version"], version["version"]) == ("2.1", "2.104")
        assert version["links"][0]["href"] == f"{daemon.url}/v2.1/"

    @pytest.mark.parametrize("path", ["/v2.1", "/v2.1/"])
    def test_v2_1_document(self, daemon: LiveDaemon, path: str) -> None:
        """GET /v2.1 and /v2.1/ return the version with links and media-types."""
        version = daemon.client.get(path).json()["version"]
        assert version["id"] == "v2.1" and version["status"] == "CURRENT"
        assert {link["rel"] for link in version["links"]} >= {"self"}
        assert version["media-types"][0]["base"] == "application/json"

    def test_image_version_document(self, daemon: LiveDaemon) -> None:
        """GET /image lists a CURRENT v2 version for the image clients."""
        (version,) = daemon.client.get("/image").json()["versions"]
        assert version["status"] == "CURRENT" and version["id"].startswith("v2")

    def test_openapi_names_operations(self, daemon: LiveDaemon) -> None:
        """The OpenAPI document has readable operation ids for the rebuild and server routes."""
        spec = daemon.client.get("/openapi.json").json()
        ids = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
        assert {"server_action", "show_server", "create_server", "list_images"} <= ids


class TestLegacyProjectPaths:
    def test_project_id_in_path_routes_the_same(self, daemon: LiveDaemon) -> None:
        """/v2.1/{project_id}/servers/{id} is the same resource as /v2.1/servers/{id}."""
        server_id = daemon.create_server()
        response = daemon.client.get(f"/v2.1/6f70656e737461636b20342065766572/servers/{server_id}")
        assert response.status_code == 200
        assert response.json()["server"]["id"] == server_id


class TestServerList:
    def test_name_filter_and_paging(self, daemon: LiveDaemon) -> None:
        """?name= is a regex match; ?limit= pages with a next link carrying the marker."""
        ids = [daemon.create_server(f"web-{i}") for i in range(3)]
        daemon.create_server("db")
        names = [
            s["name"]
            for s in daemon.client.get("/v2.1/servers", params={"name": "^web"}).json()["servers"]
        ]
        assert sorted(names) == ["web-0", "web-1", "web-2"]
        page = daemon.client.get("/v2.1/servers/detail", params={"limit": 2}).json()
        assert len(page["servers"]) == 2
        next_href = page["servers_links"][0]["href"]
        rest = daemon.client.get(next_href).json()["servers"]
        seen = {s["id"] for s in page["servers"]} | {s["id"] for s in rest}
        assert set(ids) <= seen and len(seen) == 4

    def test_status_filter(self, daemon: LiveDaemon) -> None:
        """?status=SHUTOFF lists only stopped servers."""
        running = daemon.create_server("on")
        stopped = daemon.create_server("off")
        daemon.client.post(f"/v2.1/servers/{stopped}/action", json={"os-stop": None})
        daemon.wait_for(stopped, "SHUTOFF")
        listed = daemon.client.get("/v2.1/servers", params={"status": "SHUTOFF"}).json()["servers"]
        assert [s["id"] for s in listed] == [stopped]
        assert running not in [s["id"] for s in listed]


class TestImages:
    def test_create_upload_show_and_find_by_name(self, daemon: LiveDaemon) -> None:
        """An uploaded qcow2 becomes active with size and hashes; lookups by name work."""
        created = daemon.client.post(
            "/image/v2/images",
            json={"name": "mine", "disk_format": "qcow2", "container_format": "bare"},
        )
        assert created.status_code == 201
        image = created.json()
        assert image["status"] == "queued"
        data = (daemon.settings.state_dir / "images" / daemon.image_ids[0]).read_bytes()
        upload = daemon.client.put(
            f"/image/v2/images/{image['id']}/file",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert upload.status_code == 204
        shown = daemon.client.get(f"/image/v2/images/{image['id']}").json()
        assert (shown["status"], shown["size"], shown["os_hash_algo"]) == (
            "active",
            len(data),
            "sha512",
        )
        assert shown["virtual_size"] == 64 * 1024 * 1024
        assert daemon.client.get("/image/v2/images/mine").status_code == 404
        found = daemon.client.get("/image/v2/images", params={"name": "mine"}).json()["images"]
        assert [i["id"] for i in found] == [image["id"]]
        alias = daemon.client.get(f"/v2.1/v2/images/{image['id']}")
        assert alias.status_code == 200 and alias.json()["id"] == image["id"]
        assert daemon.client.get(f"/image/v2/images/{image['id']}/file").content == data

    def test_bytes_that_are_not_the_declared_format_are_refused(self, daemon: LiveDaemon) -> None:
        """Uploading raw bytes as qcow2 is 400, and the image stays queued."""
        image = daemon.client.post(
            "/image/v2/images",
            json={"name": "liar", "disk_format": "qcow2", "container_format": "bare"},
        ).json()
        upload = daemon.client.put(
            f"/image/v2/images/{image['id']}/file",
            content=b"\0" * 4096,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert upload.status_code == 400
        assert daemon.client.get(f"/image/v2/images/{image['id']}").json()["status"] == "queued"

    def test_list_pages_with_glance_next_links(self, daemon: LiveDaemon) -> None:
        """limit/marker paging follows Glance's 'next' link shape."""
        first = daemon.client.get("/image/v2/images", params={"limit": 1}).json()
        assert first["next"].startswith("/v2/images?marker=")
        second = daemon.client.get("/image" + first["next"]).json()
        assert {first["images"][0]["id"], second["images"][0]["id"]} == set(daemon.image_ids)

    def test_delete(self, daemon: LiveDaemon) -> None:
        """DELETE removes the record and then it 404s."""
        image = daemon.client.post("/image/v2/images", json={"name": "tmp"}).json()
        assert daemon.client.delete(f"/image/v2/images/{image['id']}").status_code == 204
        assert daemon.client.get(f"/image/v2/images/{image['id']}").status_code == 404
