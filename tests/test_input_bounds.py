"""Everything a user sends is validated before the 202/201, as Nova, Glance and Cinder do: image
properties, accessIPv6, block-device names and sizes, create's user_data, microversions and
volume sizes are refused with the service's status and words, and nothing is left changed (no
server, image or volume made, none touched); nothing that could be refused fails later in a job,
in the XML writer or in the database."""

from __future__ import annotations

import base64
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree

from rebuildd import errors, imageprops, pipeline, schemas
from rebuildd.models import RequestContext
from tests.live import LiveDaemon, start_live_daemon
from tests.test_store import _server as _stored_server

V = "/volume/v3/demo/volumes"
IMAGES = "/image/v2/images"
LATEST = {"OpenStack-API-Version": "compute 2.94"}


def _fault(response: httpx.Response) -> tuple[int, str]:
    """(status, message) of a Nova-style fault body, which the answer must be."""
    ((_name, fault),) = response.json().items()
    assert fault["code"] == response.status_code, response.text
    return response.status_code, fault["message"]


def _server_ids(live: LiveDaemon) -> set[str]:
    return {s["id"] for s in live.client.get("/v2.1/servers").json()["servers"]}


def _image_ids(live: LiveDaemon) -> set[str]:
    return {i["id"] for i in live.client.get(IMAGES).json()["images"]}


def _volume_ids(live: LiveDaemon) -> set[str]:
    return {v["id"] for v in live.client.get(V).json()["volumes"]}


def _volume_files(live: LiveDaemon) -> list[Path]:
    directory = live.settings.state_dir / "volumes"
    return sorted(directory.iterdir()) if directory.exists() else []


def _create(live: LiveDaemon, **extra: Any) -> httpx.Response:
    server = {"name": "s", "imageRef": live.image_ids[0], "flavorRef": "1", **extra}
    return live.client.post("/v2.1/servers", json={"server": server}, headers=LATEST)


def _refused_create(live: LiveDaemon, **extra: Any) -> tuple[int, str]:
    """Create with ``extra``; assert no server and no volume came of it; the fault."""
    servers, volumes = _server_ids(live), _volume_ids(live)
    response = _create(live, **extra)
    assert _server_ids(live) == servers and _volume_ids(live) == volumes, response.text
    assert not _volume_files(live)
    return _fault(response)


def _volume_mapping(live: LiveDaemon, **entry: Any) -> list[dict[str, Any]]:
    """One volume made from the first image, beside the image boot."""
    volume = {"source_type": "image", "destination_type": "volume", "uuid": live.image_ids[0]}
    return [{**volume, "boot_index": 1, **entry}]


# -- image properties (Glance's rules, in schemas.ImageCreate) ----------------------------------


class TestImageProperties:
    def test_control_character_in_a_property_value_is_400(self, daemon: LiveDaemon) -> None:
        """A property value holding a control character is a 400 naming it; no image is made."""
        before = _image_ids(daemon)
        response = daemon.client.post(IMAGES, json={"name": "p", "foo": "a\x01b"})
        assert _fault(response) == (
            400,
            "Invalid input for field/attribute foo. Value: 'a\\x01b'. "
            "character '\\x01' is not allowed",
        )
        assert _image_ids(daemon) == before

    @pytest.mark.parametrize(
        ("body", "field", "char"),
        [
            ({"name": "p\x1b[2J"}, "name", "\\x1b"),
            ({"name": "p", "key\u202e": "v"}, "key\u202e", "\\u202e"),
            ({"name": "p", "k": "line\nbreak"}, "k", "\\n"),
            ({"name": "p", "k": "\ufffe"}, "k", "\\ufffe"),
        ],
        ids=["name-escape", "key-bidi", "value-newline", "value-noncharacter"],
    )
    def test_unprintable_names_keys_and_values_are_400(
        self, daemon: LiveDaemon, body: dict[str, Any], field: str, char: str
    ) -> None:
        """The name, property keys and values take no character XML or a log line cannot hold
        as it is; nothing is made."""
        before = _image_ids(daemon)
        status, message = _fault(daemon.client.post(IMAGES, json=body))
        assert status == 400
        assert message.startswith(f"Invalid input for field/attribute {field}. "), message
        assert f"character '{char}' is not allowed" in message
        assert _image_ids(daemon) == before

    def test_long_property_key_is_400_in_glances_words(self, daemon: LiveDaemon) -> None:
        """A property key over 255 characters is Glance's 400."""
        status, message = _fault(daemon.client.post(IMAGES, json={"name": "p", "k" * 256: "v"}))
        assert status == 400
        assert message.endswith("Custom property should not be greater than 255 characters.")

    @pytest.mark.parametrize("key", ["os_glance_import_task", "os_glance", "deleted", "deleted_at"])
    def test_reserved_attributes_are_403(self, daemon: LiveDaemon, key: str) -> None:
        """Glance's reserved attributes and its os_glance namespace are 403; nothing is made."""
        before = _image_ids(daemon)
        response = daemon.client.post(IMAGES, json={"name": "p", key: "x"})
        assert _fault(response) == (403, f"Attribute '{key}' is reserved.")
        assert _image_ids(daemon) == before

    def test_more_properties_than_glances_quota_is_413(self, daemon: LiveDaemon) -> None:
        """129 custom properties are Glance's 413 naming the quota; 128 are accepted."""
        before = _image_ids(daemon)
        properties = {f"k{i}": "v" for i in range(129)}
        response = daemon.client.post(IMAGES, json={"name": "p", **properties})
        assert _fault(response) == (
            413,
            "The limit has been exceeded on the number of allowed image properties. "
            "Attempted: 129, Maximum: 128",
        )
        assert _image_ids(daemon) == before
        del properties["k0"]
        assert daemon.client.post(IMAGES, json={"name": "p", **properties}).status_code == 201

    def test_more_tags_than_glances_quota_is_413(self, daemon: LiveDaemon) -> None:
        """129 tags are Glance's 413 naming the quota."""
        tags = [f"t{i}" for i in range(129)]
        response = daemon.client.post(IMAGES, json={"name": "p", "tags": tags})
        assert _fault(response) == (
            413,
            "The limit has been exceeded on the number of allowed image tags. "
            "Attempted: 129, Maximum: 128",
        )


class TestImageCreateModel:
    """What re-validates an image through schemas.ImageCreate (a patched image) gets the rules."""

    @pytest.mark.parametrize(
        ("data", "error"),
        [
            ({"foo": "a\x00b"}, errors.ValidationFailed),
            ({"foo": "a\x7fb"}, errors.ValidationFailed),
            ({"os_glance_x": "v"}, errors.Forbidden),
            ({"status": "active"}, errors.Forbidden),
            ({f"k{i}": "v" for i in range(129)}, errors.ImagePropertyLimitExceeded),
        ],
        ids=["nul", "del", "reserved", "read-only", "quota"],
    )
    def test_the_model_itself_refuses(self, data: dict[str, Any], error: type[Exception]) -> None:
        """schemas.validate(ImageCreate, ...) raises the mapped error, not a generic one."""
        with pytest.raises(error):
            schemas.validate(schemas.ImageCreate, {"name": "p", **data}, field="image")


class TestImagePropertiesFromElsewhere:
    def test_kept_properties_are_text_xml_can_hold(self) -> None:
        """Properties from an image service that allowed control characters are kept without
        them, so lxml can write them into the domain's XML."""
        kept = imageprops.kept({"os_\x01distro": "cir\x1bros\ufffe", "hw_disk_bus": "virtio"})
        assert kept == {"os_distro": "cirros", "hw_disk_bus": "virtio"}
        element = etree.Element("property")
        for key, value in kept.items():
            element.set("name", key)
            element.text = value  # raises ValueError on a character XML cannot hold

    @pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
    def test_a_shutdown_timeout_that_is_not_finite_falls_back(self, value: str) -> None:
        """An image's os_shutdown_timeout of inf or nan does not make a stop wait forever:
        the setting's timeout applies."""
        server = _stored_server(image_properties={"os_shutdown_timeout": value})
        assert pipeline.shutdown_timeout(server, 60.0) == 60.0

    def test_rebuild_onto_an_image_with_a_control_character_property(
        self, daemon: LiveDaemon
    ) -> None:
        """An image whose stored properties hold a control character (as a Glance may hand
        over) rebuilds a server to ACTIVE, instead of powering it off and failing in the XML
        writer."""
        data = daemon.client.get(f"{IMAGES}/{daemon.image_ids[0]}/file").content
        context = RequestContext(request_id="req-test", user_id="demo", project_id="demo")
        fields = {"name": "glance-like", "disk_format": "qcow2", "container_format": "bare"}
        image = daemon.run(
            daemon.daemon.services.images.create(context, {**fields, "os_distro": "a\x01b"})
        )
        upload = daemon.client.put(
            f"{IMAGES}/{image.id}/file",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert upload.status_code == 204, upload.text
        server_id = daemon.create_server()
        rebuild = {"rebuild": {"imageRef": image.id}}
        response = daemon.client.post(f"/v2.1/servers/{server_id}/action", json=rebuild)
        assert response.status_code == 202, response.text
        server = daemon.wait_for(server_id, "ACTIVE")
        assert server["image"]["id"] == image.id


# -- servers: create and rebuild fields ---------------------------------------------------------


class TestCreateUserData:
    @pytest.mark.parametrize("user_data", ["abc", "YWJjZA", "not base64!"])
    def test_user_data_that_is_not_base64_is_400(self, daemon: LiveDaemon, user_data: str) -> None:
        """Unpadded or otherwise undecodable user_data at create is Nova's 400 (it was a 202,
        then ERROR building the config drive); no server is made."""
        fault = _refused_create(daemon, user_data=user_data, config_drive=True)
        assert fault == (400, "User data needs to be valid base 64.")

    def test_padded_user_data_builds(self, daemon: LiveDaemon) -> None:
        """Valid base64 user_data still builds a server with a config drive."""
        user_data = base64.b64encode(b"#cloud-config\n").decode()
        response = _create(daemon, user_data=user_data, config_drive=True)
        assert response.status_code == 202, response.text
        daemon.wait_for(response.json()["server"]["id"], "ACTIVE")


class TestAccessIPv6:
    @pytest.mark.parametrize("address", ["fe80::1%eth0", "fe80::1%" + "x" * 60, "::1%1"])
    def test_a_zone_id_is_400_at_create(self, daemon: LiveDaemon, address: str) -> None:
        """accessIPv6 with a zone id is Nova's format error; no server is made."""
        shown = repr(address)
        fault = _refused_create(daemon, accessIPv6=address)
        assert fault == (
            400,
            f"Invalid input for field/attribute accessIPv6. Value: {shown}. "
            f"{shown} is not a 'ipv6'",
        )

    def test_a_zone_id_is_400_at_rebuild_and_the_server_is_untouched(
        self, daemon: LiveDaemon
    ) -> None:
        """A rebuild naming a zoned accessIPv6 is 400 and the server stays as it was."""
        server_id = daemon.create_server()
        before = daemon.wait_for(server_id, "ACTIVE")
        rebuild = {"rebuild": {"imageRef": daemon.image_ids[1], "accessIPv6": "fe80::1%eth0"}}
        response = daemon.client.post(f"/v2.1/servers/{server_id}/action", json=rebuild)
        assert _fault(response)[0] == 400
        after = daemon.server(server_id)
        for key in ("status", "image", "accessIPv6", "updated", "OS-EXT-STS:task_state"):
            assert after[key] == before[key], key

    def test_an_address_is_kept_in_its_compressed_form(self, daemon: LiveDaemon) -> None:
        """An uncompressed address is stored as Nova shows it, compressed and lower case."""
        response = _create(daemon, accessIPv6="2001:DB8:0:0:0:0:0:1")
        assert response.status_code == 202, response.text
        server = daemon.server(response.json()["server"]["id"])
        assert server["accessIPv6"] == "2001:db8::1"


def test_zoned_access_ipv6_is_400_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    """On PostgreSQL too a zoned accessIPv6 is a 400, never the database's 500."""
    live = start_live_daemon(tmp_path, database_url=postgres_url)
    try:
        fault = _refused_create(live, accessIPv6="fe80::1%" + "x" * 60)
        assert fault[0] == 400 and "is not a 'ipv6'" in fault[1]
    finally:
        live.stop()


class TestBlockDeviceMappings:
    @pytest.mark.parametrize(
        "name", ["vd\u0001", "/dev/../../x", "hda", "sdb", "/dev/vdb1", "xvda", "vdaa"]
    )
    def test_device_names_the_job_cannot_honour_are_400(
        self, daemon: LiveDaemon, name: str
    ) -> None:
        """A device_name that is not a virtio disk name is Nova's InvalidBDM 400 (it was a 202,
        then ERROR in the XML writer or libvirt); no server and no volume are made."""
        fault = _refused_create(
            daemon, block_device_mapping_v2=_volume_mapping(daemon, volume_size=1, device_name=name)
        )
        assert fault == (
            400,
            f"Block Device Mapping is Invalid: Device name {name!r} is not a virtio disk "
            "(vd[a-z] or /dev/vd[a-z]).",
        )

    @pytest.mark.parametrize(
        ("name", "details"),
        [("", "Device name empty or too long."), ("vd b", "Device name contains spaces.")],
    )
    def test_nova_device_name_rules(self, daemon: LiveDaemon, name: str, details: str) -> None:
        """Nova's validate_device_name: empty and spaced names, in its words."""
        fault = _refused_create(
            daemon, block_device_mapping_v2=_volume_mapping(daemon, volume_size=1, device_name=name)
        )
        assert fault == (400, f"Block Device Mapping is Invalid: {details}")

    @pytest.mark.parametrize("name", ["vdc", "/dev/vdc"])
    def test_a_virtio_name_is_honoured(self, daemon: LiveDaemon, name: str) -> None:
        """vdX and /dev/vdX are accepted and the volume is attached there."""
        response = _create(
            daemon, block_device_mapping_v2=_volume_mapping(daemon, volume_size=1, device_name=name)
        )
        assert response.status_code == 202, response.text
        server_id = response.json()["server"]["id"]
        daemon.wait_for(server_id, "ACTIVE")
        attachments = daemon.client.get(f"/v2.1/servers/{server_id}/os-volume_attachments")
        assert [a["device"] for a in attachments.json()["volumeAttachments"]] == ["/dev/vdc"]

    def test_boot_index_beyond_the_column_is_400(self, daemon: LiveDaemon) -> None:
        """A boot_index past a 32-bit integer is a 400 (it was a 500 from the database)."""
        status, message = _refused_create(
            daemon,
            block_device_mapping_v2=_volume_mapping(daemon, volume_size=1, boot_index=10**30),
        )
        assert status == 400
        assert message.startswith("Invalid input for field/attribute boot_index."), message

    def test_volume_size_beyond_the_limit_is_413(self, daemon: LiveDaemon) -> None:
        """A mapping's volume_size over max_volume_size_gb is Cinder's 413 naming the limit
        (it was a 202, then ERROR naming a host path)."""
        fault = _refused_create(
            daemon, block_device_mapping_v2=_volume_mapping(daemon, volume_size=16384)
        )
        assert fault == (
            413,
            "Requested volume size 16384G is larger than maximum allowed limit 1024G.",
        )

    @pytest.mark.parametrize("boot_index", [0, 1])
    def test_a_volume_smaller_than_its_image_is_400(
        self, daemon: LiveDaemon, boot_index: int
    ) -> None:
        """An image-to-volume mapping smaller than the image's min_disk is Cinder's 400 before
        the 202 (it was a 202, then ERROR making the volume)."""
        data = daemon.client.get(f"{IMAGES}/{daemon.image_ids[0]}/file").content
        fields = {"name": "big", "disk_format": "qcow2", "container_format": "bare"}
        image = daemon.client.post(IMAGES, json={**fields, "min_disk": 5}).json()
        upload = daemon.client.put(
            f"{IMAGES}/{image['id']}/file",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert upload.status_code == 204, upload.text
        mapping = _volume_mapping(daemon, uuid=image["id"], volume_size=1, boot_index=boot_index)
        image_ref = "" if boot_index == 0 else daemon.image_ids[0]
        fault = _refused_create(daemon, imageRef=image_ref, block_device_mapping_v2=mapping)
        assert fault == (400, "Size of specified image 5GB is larger than volume size 1GB.")

    def test_tag_with_a_slash_is_400(self, daemon: LiveDaemon) -> None:
        """A mapping's tag follows Nova's pattern (no ',' or '/')."""
        status, message = _refused_create(
            daemon, block_device_mapping_v2=_volume_mapping(daemon, volume_size=1, tag="a/b")
        )
        assert status == 400 and "field/attribute tag" in message


class TestOtherCreateFields:
    @pytest.mark.parametrize(
        ("field", "value"),
        [("description", "a\x01b"), ("availability_zone", "a\x01b"), ("availability_zone", "")],
    )
    def test_nova_text_rules(self, daemon: LiveDaemon, field: str, value: str) -> None:
        """description and availability_zone follow Nova's printable-text rules."""
        status, message = _refused_create(daemon, **{field: value})
        assert status == 400
        assert message.startswith(f"Invalid input for field/attribute {field}."), message

    def test_more_metadata_items_than_novas_quota_is_403(self, daemon: LiveDaemon) -> None:
        """129 metadata items at create are Nova's 403, as at rebuild."""
        metadata = {f"k{i}": "v" for i in range(129)}
        fault = _refused_create(daemon, metadata=metadata)
        assert fault == (403, "Maximum number of metadata items exceeds 128")


# -- numbers ------------------------------------------------------------------------------------


class TestMicroversion:
    @pytest.mark.parametrize("header", ["OpenStack-API-Version", "X-OpenStack-Nova-API-Version"])
    @pytest.mark.parametrize("version", ["2." + "9" * 5000, "9" * 5000 + ".1", "2.1000000000"])
    def test_a_huge_microversion_is_400(
        self, daemon: LiveDaemon, header: str, version: str
    ) -> None:
        """A version whose numbers run to thousands of digits is Nova's invalid-format 400
        (it was a 500), its echo bounded."""
        value = f"compute {version}" if header == "OpenStack-API-Version" else version
        status, message = _fault(daemon.client.get("/v2.1/servers", headers={header: value}))
        shown = version if len(version) <= 64 else f"{version[:64]}..."
        assert (status, message) == (
            400,
            f"API Version String {shown} is of invalid format. Must be of format "
            "MajorNum.MinorNum.",
        )


class TestQueryLimits:
    @pytest.mark.parametrize("limit", ["9" * 5000, str(10**20)])
    def test_a_huge_instance_actions_limit_is_capped(self, daemon: LiveDaemon, limit: str) -> None:
        """os-instance-actions' limit of thousands of digits is capped, as a large one is (it
        was a 500)."""
        server_id = daemon.create_server()
        response = daemon.client.get(
            f"/v2.1/servers/{server_id}/os-instance-actions",
            params={"limit": limit},
            headers={"OpenStack-API-Version": "compute 2.58"},
        )
        assert response.status_code == 200, response.text
        assert [a["action"] for a in response.json()["instanceActions"]] == ["create"]

    @pytest.mark.parametrize("path", ["/v2.1/servers", "/v2.1/servers/detail", IMAGES])
    def test_list_limits_are_capped_or_400(self, daemon: LiveDaemon, path: str) -> None:
        """A limit past any integer column is capped; one of thousands of digits is a 400."""
        assert daemon.client.get(path, params={"limit": str(10**20)}).status_code == 200
        status, message = _fault(daemon.client.get(path, params={"limit": "9" * 5000}))
        assert status == 400
        assert message.startswith("Invalid input for query parameters limit."), message


class TestVolumeSizes:
    @pytest.mark.parametrize(
        ("size", "reason"),
        [
            (10**20, "100000000000000000000 is greater than the maximum of 2147483647"),
            (2**63, "9223372036854775808 is greater than the maximum of 2147483647"),
            (2**31, "2147483648 is greater than the maximum of 2147483647"),
            ("9" * 30, f"'{'9' * 30}' is greater than the maximum of 2147483647"),
            ("9" * 5000, "is greater than the maximum of 2147483647"),
            (True, "True is not of type 'integer', 'string'"),
            (1.5, "1.5 is not of type 'integer', 'string'"),
            ("1.5", "'1.5' does not match '^[0-9]+$'"),
            ("\u00b2", "'\u00b2' does not match '^[0-9]+$'"),
        ],
        ids=[
            "1e20",
            "2^63",
            "2^31",
            "digits",
            "5000-digits",
            "bool",
            "float",
            "str",
            "superscript",
        ],
    )
    def test_sizes_outside_cinders_schema_are_400(
        self, daemon: LiveDaemon, size: Any, reason: str
    ) -> None:
        """Sizes Cinder's schema refuses are its 400 (they were 500s, or a reset connection),
        and no volume is made."""
        response = daemon.client.post(V, json={"volume": {"size": size}})
        status, message = _fault(response)
        assert status == 400
        assert message.startswith("Invalid input for field/attribute size. Value: "), message
        assert reason in message
        assert not _volume_ids(daemon) and not _volume_files(daemon)

    def test_a_size_over_the_limit_is_413(self, daemon: LiveDaemon) -> None:
        """A size over max_volume_size_gb is Cinder's VolumeSizeExceedsLimit 413; nothing is
        made."""
        response = daemon.client.post(V, json={"volume": {"size": 16384}})
        assert _fault(response) == (
            413,
            "Requested volume size 16384G is larger than maximum allowed limit 1024G.",
        )
        assert not _volume_ids(daemon) and not _volume_files(daemon)


@pytest.fixture
def unlimited(tmp_path: Path) -> Iterator[LiveDaemon]:
    """A daemon whose volume limit is above what its filesystem can hold in one file."""
    live = start_live_daemon(tmp_path, max_volume_size_gb=2147483647)
    try:
        yield live
    finally:
        live.stop()


def _filesystem_refuses(directory: Path, size: int) -> bool:
    probe = directory / f".probe-{uuid.uuid4().hex}"
    try:
        with probe.open("wb") as file:
            file.truncate(size)
    except OSError:
        return True
    finally:
        probe.unlink(missing_ok=True)
    return False


def test_a_volume_the_filesystem_cannot_hold_is_413_naming_no_path(
    unlimited: LiveDaemon,
) -> None:
    """EFBIG while making a volume file is a 413 that names no host path, and no volume or
    file is left (it was a 500 "File too large" with the path)."""
    size = 16384
    if not _filesystem_refuses(unlimited.settings.state_dir, size * 1024**3):
        pytest.skip("this filesystem holds a 16 TiB sparse file")
    response = unlimited.client.post(V, json={"volume": {"size": size}})
    status, message = _fault(response)
    assert status == 413, message
    assert message == f"Not enough space on this host to create a volume of {size} GiB: " + (
        os.strerror(errno.EFBIG)
    )
    assert str(unlimited.settings.state_dir) not in response.text
    assert not _volume_ids(unlimited) and not _volume_files(unlimited)
