"""The config drive: real ISO images built with pycdlib, read back, and checked with the
system's own tools (isoinfo from genisoimage, blkid)."""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import structlog

from rebuildd.configdrive import ConfigDriveData, Key, Nic, build_iso, read_iso
from rebuildd.errors import DiskError

SERVER_ID = "6f1c2a4e-8a53-4d3e-9b1f-2c7d9e0a1b23"
IMAGE_ID = "0b7c9d2e-4f61-4a8b-9c3d-5e6f7a8b9c0d"
ADMIN_PASS = "Pa55-w0rd-never-logged"
USER_DATA = b"#cloud-config\nruncmd: [echo user-data-never-logged]\n\xff\x00binary tail"
MOTD = b"personality-contents-never-logged\n"
KEY = Key(name="mykey", data="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample me@host")

# Nova's OPENSTACK_VERSIONS and latest: every one of them is a directory on the drive.
VERSIONS = [
    "2012-08-10",
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2017-02-22",
    "2018-08-27",
    "2020-10-14",
    "2025-04-04",
    "latest",
]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _data(**changes: Any) -> ConfigDriveData:
    full = ConfigDriveData(
        server_id=SERVER_ID,
        name="web 1",
        hostname="web-1",
        project_id="demo",
        image_id=IMAGE_ID,
        flavor_name="m1.small",
        key=KEY,
        metadata={"role": "web", "dsmode": "local"},
        admin_pass=ADMIN_PASS,
        user_data=_b64(USER_DATA),
        personality=(("/etc/motd", _b64(MOTD)), ("/root/a.txt", _b64(b"a"))),
        nics=(Nic(mac="52:54:00:AB:CD:EF", interface_type="bridge", source="br0"),),
    )
    return dataclasses.replace(full, **changes)


def _bare() -> ConfigDriveData:
    return _data(key=None, metadata={}, admin_pass=None, user_data=None, personality=(), nics=())


def _built(tmp_path: Path, data: ConfigDriveData, name: str = "disk.config") -> dict[str, bytes]:
    dest = tmp_path / name
    build_iso(data, dest)
    return read_iso(dest)


def _json(files: dict[str, bytes], path: str) -> Any:
    return json.loads(files[path])


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


class TestImage:
    def test_volume_label_is_config_2(self, tmp_path: Path) -> None:
        """blkid sees an iso9660 filesystem labelled config-2, the label cloud-init looks for."""
        dest = tmp_path / "disk.config"
        build_iso(_data(), dest)
        assert _run("blkid", "-o", "value", "-s", "TYPE", str(dest)).strip() == "iso9660"
        assert _run("blkid", "-o", "value", "-s", "LABEL", str(dest)).strip() == "config-2"

    def test_isoinfo_sees_the_volume_id_rock_ridge_and_joliet(self, tmp_path: Path) -> None:
        """isoinfo -d reports volume id config-2 with Joliet and Rock Ridge, as genisoimage
        -J -r -V config-2 makes it for Nova."""
        dest = tmp_path / "disk.config"
        build_iso(_data(), dest)
        lines = _run("isoinfo", "-d", "-i", str(dest)).splitlines()
        assert "Volume id: config-2" in lines
        assert "Joliet with UCS level 3 found" in lines
        assert any(line.startswith("Rock Ridge signatures") for line in lines)

    def test_isoinfo_lists_the_long_names(self, tmp_path: Path) -> None:
        """isoinfo lists the real (not 8.3) names through both Rock Ridge and Joliet."""
        dest = tmp_path / "disk.config"
        build_iso(_data(), dest)
        for extension in ("-R", "-J"):
            listed = set(_run("isoinfo", extension, "-f", "-i", str(dest)).split())
            assert {
                "/openstack/latest/meta_data.json",
                "/openstack/latest/network_data.json",
                "/openstack/latest/vendor_data2.json",
                "/openstack/2012-08-10/user_data",
                "/ec2/latest/meta-data.json",
                "/openstack/content/0000",
            } <= listed, extension

    def test_rock_ridge_modes_are_root_owned_and_read_only(self, tmp_path: Path) -> None:
        """Like genisoimage -r: files r--r--r--, directories r-xr-xr-x, owned by uid/gid 0."""
        dest = tmp_path / "disk.config"
        build_iso(_bare(), dest)
        entries = [
            line.split()
            for line in _run("isoinfo", "-R", "-l", "-i", str(dest)).splitlines()
            if line[:1] in ("d", "-") and not line.rstrip().endswith((" .", " .."))
        ]
        assert entries
        for mode, _links, uid, gid, *_ in entries:
            assert mode in ("dr-xr-xr-x", "-r--r--r--")
            assert (uid, gid) == ("0", "0")


class TestLayout:
    def test_every_openstack_version_and_ec2_2009_04_04_is_written(self, tmp_path: Path) -> None:
        """The drive has every dated directory Nova writes, each with the files that version
        had: vendor_data.json from 2013-10-17, network_data.json from 2015-10-15,
        vendor_data2.json from 2016-10-06; ec2 only for 2009-04-04 and latest."""
        files = _built(tmp_path, _data())
        assert sorted({p.split("/")[1] for p in files if p.startswith("openstack/")}) == sorted(
            [*VERSIONS, "content"]
        )
        assert sorted({p.split("/")[1] for p in files if p.startswith("ec2/")}) == [
            "2009-04-04",
            "latest",
        ]

        def names(version: str) -> set[str]:
            return {p.rsplit("/", 1)[1] for p in files if p.startswith(f"openstack/{version}/")}

        assert names("2012-08-10") == {"meta_data.json", "user_data"}
        assert names("2013-04-04") == {"meta_data.json", "user_data"}
        assert names("2013-10-17") == {"meta_data.json", "user_data", "vendor_data.json"}
        all_files = {
            "meta_data.json",
            "user_data",
            "vendor_data.json",
            "network_data.json",
            "vendor_data2.json",
        }
        assert names("2015-10-15") == all_files - {"vendor_data2.json"}
        assert names("2016-06-30") == all_files - {"vendor_data2.json"}
        for version in VERSIONS[5:]:
            assert names(version) == all_files, version
        assert {p for p in files if p.startswith("ec2/")} == {
            "ec2/2009-04-04/meta-data.json",
            "ec2/2009-04-04/user-data",
            "ec2/latest/meta-data.json",
            "ec2/latest/user-data",
        }

    def test_vendor_data_is_novas_default_static_provider(self, tmp_path: Path) -> None:
        """vendor_data.json is {} and vendor_data2.json is {"static": {}}, as Nova's default
        StaticJSON provider without a file gives them."""
        files = _built(tmp_path, _data())
        assert files["openstack/latest/vendor_data.json"] == b"{}"
        assert files["openstack/latest/vendor_data2.json"] == b'{"static": {}}'


class TestMetaData:
    def test_meta_data_json_is_novas_for_the_input(self, tmp_path: Path) -> None:
        """latest/meta_data.json has exactly Nova's keys, in Nova's order, for the input."""
        files = _built(tmp_path, _data())
        md = _json(files, "openstack/latest/meta_data.json")
        seed = md.pop("random_seed")
        assert len(base64.b64decode(seed, validate=True)) == 512
        assert list(md) == [
            "uuid",
            "meta",
            "files",
            "admin_pass",
            "public_keys",
            "keys",
            "hostname",
            "name",
            "launch_index",
            "availability_zone",
            "project_id",
            "devices",
            "dedicated_cpus",
        ]
        assert md == {
            "uuid": SERVER_ID,
            "meta": {"role": "web", "dsmode": "local"},
            "files": [
                {"path": "/etc/motd", "content_path": "/content/0000"},
                {"path": "/root/a.txt", "content_path": "/content/0001"},
            ],
            "admin_pass": ADMIN_PASS,
            "public_keys": {"mykey": KEY.data},
            "keys": [{"name": "mykey", "type": "ssh", "data": KEY.data}],
            "hostname": "web-1.novalocal",
            "name": "web 1",
            "launch_index": 0,
            "availability_zone": "nova",
            "project_id": "demo",
            "devices": [],
            "dedicated_cpus": [],
        }

    def test_a_bare_server_has_only_the_keys_nova_always_writes(self, tmp_path: Path) -> None:
        """Without metadata, files, password or key there are no meta, files, admin_pass,
        public_keys or keys; an empty dhcp_domain leaves the hostname bare."""
        files = _built(tmp_path, dataclasses.replace(_bare(), dhcp_domain=""))
        md = _json(files, "openstack/latest/meta_data.json")
        del md["random_seed"]
        assert md == {
            "uuid": SERVER_ID,
            "hostname": "web-1",
            "name": "web 1",
            "launch_index": 0,
            "availability_zone": "nova",
            "project_id": "demo",
            "devices": [],
            "dedicated_cpus": [],
        }

    def test_admin_pass_is_present_only_when_given(self, tmp_path: Path) -> None:
        """No admin_pass key for no password or an empty one (Nova tests truthiness)."""
        for admin_pass in (None, ""):
            files = _built(tmp_path, _data(admin_pass=admin_pass), name=f"d{admin_pass!r}")
            for version in VERSIONS:
                assert "admin_pass" not in _json(files, f"openstack/{version}/meta_data.json")

    def test_older_versions_lack_the_keys_added_later(self, tmp_path: Path) -> None:
        """random_seed from 2013-04-04, project_id from 2015-10-15, devices from 2016-06-30,
        dedicated_cpus from 2020-10-14."""
        files = _built(tmp_path, _data())

        def keys(version: str) -> set[str]:
            return set(_json(files, f"openstack/{version}/meta_data.json"))

        later = {"random_seed", "project_id", "devices", "dedicated_cpus"}
        assert keys("2012-08-10") & later == set()
        assert keys("2013-10-17") & later == {"random_seed"}
        assert keys("2015-10-15") & later == {"random_seed", "project_id"}
        assert keys("2018-08-27") & later == {"random_seed", "project_id", "devices"}
        assert keys("2020-10-14") & later == later
        assert keys("2025-04-04") == keys("latest")

    def test_each_version_gets_its_own_random_seed(self, tmp_path: Path) -> None:
        """Nova draws a new random_seed for every meta_data.json it writes."""
        files = _built(tmp_path, _data())
        seeds = {_json(files, f"openstack/{v}/meta_data.json")["random_seed"] for v in VERSIONS[1:]}
        assert len(seeds) == len(VERSIONS) - 1

    def test_ec2_meta_data_is_novas_2009_04_04_shape(self, tmp_path: Path) -> None:
        """ec2 meta-data.json has Nova's keys, with ids in Nova's i-%08x / ami-%08x shape."""
        files = _built(tmp_path, _data())
        assert _json(files, "ec2/latest/meta-data.json") == {
            "ami-id": "ami-0b7c9d2e",
            "ami-launch-index": 0,
            "ami-manifest-path": "FIXME",
            "instance-id": "i-6f1c2a4e",
            "hostname": "web-1.novalocal",
            "local-ipv4": None,
            "reservation-id": "",
            "security-groups": ["default"],
            "public-keys": {"0": {"openssh-key": KEY.data}},
            "local-hostname": "web-1.novalocal",
            "public-hostname": "web-1.novalocal",
            "public-ipv4": "",
            "instance-type": "m1.small",
            "block-device-mapping": {"ami": "vda", "root": "/dev/vda"},
            "placement": {"availability-zone": "nova"},
            "instance-action": "none",
        }
        assert files["ec2/2009-04-04/meta-data.json"] == files["ec2/latest/meta-data.json"]


class TestUserData:
    def test_user_data_is_the_decoded_bytes(self, tmp_path: Path) -> None:
        """Every user_data (and ec2 user-data) file holds the base64-decoded bytes, not the
        base64 text the API stored."""
        files = _built(tmp_path, _data())
        written = {p: v for p, v in files.items() if p.endswith(("/user_data", "/user-data"))}
        assert len(written) == len(VERSIONS) + 2
        assert set(written.values()) == {USER_DATA}

    def test_no_user_data_file_without_user_data(self, tmp_path: Path) -> None:
        """A server without user data has no user_data or user-data file anywhere."""
        files = _built(tmp_path, _data(user_data=None))
        assert not [p for p in files if p.endswith(("/user_data", "/user-data"))]

    def test_empty_user_data_is_an_empty_file(self, tmp_path: Path) -> None:
        """User data of zero bytes is still written (Nova tests for None, not emptiness)."""
        files = _built(tmp_path, _data(user_data=""))
        assert files["openstack/latest/user_data"] == b""


class TestNetworkData:
    def test_network_data_has_the_nics_mac_and_a_dhcp_network(self, tmp_path: Path) -> None:
        """network_data.json is Nova's: one link with the NIC's MAC, one ipv4_dhcp network on
        it, no services."""
        files = _built(tmp_path, _data())
        net = _json(files, "openstack/latest/network_data.json")
        [link] = net["links"]
        [network] = net["networks"]
        assert link["ethernet_mac_address"] == "52:54:00:ab:cd:ef"
        assert (link["id"], link["type"], link["mtu"]) == ("interface0", "bridge", None)
        assert set(link) == {"id", "vif_id", "type", "mtu", "ethernet_mac_address"}
        assert network["type"] == "ipv4_dhcp"
        assert (network["id"], network["link"]) == ("network0", "interface0")
        assert set(network) == {"id", "type", "link", "network_id"}
        assert net["services"] == []
        assert files["openstack/2015-10-15/network_data.json"] == json.dumps(net).encode()

    def test_links_follow_the_interfaces(self, tmp_path: Path) -> None:
        """Each NIC is its own link, named by its target dev when known; libvirt's ethernet
        is Nova's tap and types Nova does not expose are phy; ids stay put across builds."""
        nics = (
            Nic(mac="52:54:00:00:00:01", interface_type="ethernet", target_dev="tap0", mtu=1450),
            Nic(mac="52:54:00:00:00:02", interface_type="network", source="default"),
        )
        first = _json(_built(tmp_path, _data(nics=nics), "a"), "openstack/latest/network_data.json")
        again = _json(_built(tmp_path, _data(nics=nics), "b"), "openstack/latest/network_data.json")
        assert first == again
        assert [(x["id"], x["type"], x["mtu"]) for x in first["links"]] == [
            ("tap0", "tap", 1450),
            ("interface1", "phy", None),
        ]
        assert [(x["id"], x["link"]) for x in first["networks"]] == [
            ("network0", "tap0"),
            ("network1", "interface1"),
        ]
        assert len({x["vif_id"] for x in first["links"]}) == 2

    def test_no_nics_is_an_empty_object(self, tmp_path: Path) -> None:
        """Without network info Nova writes network_data.json as {}."""
        files = _built(tmp_path, _data(nics=()))
        assert files["openstack/latest/network_data.json"] == b"{}"


class TestPersonality:
    def test_personality_files_land_at_their_content_paths(self, tmp_path: Path) -> None:
        """Each personality file's decoded contents is at openstack/<content_path>, as the
        meta_data.json files list names it."""
        files = _built(tmp_path, _data())
        listed = _json(files, "openstack/latest/meta_data.json")["files"]
        by_path = {item["path"]: files["openstack" + item["content_path"]] for item in listed}
        assert by_path == {"/etc/motd": MOTD, "/root/a.txt": b"a"}
        assert sorted(p for p in files if p.startswith("openstack/content/")) == [
            "openstack/content/0000",
            "openstack/content/0001",
        ]

    def test_no_content_directory_without_personality(self, tmp_path: Path) -> None:
        """A server without personality files has no content directory and no files key."""
        files = _built(tmp_path, _data(personality=()))
        assert not [p for p in files if p.startswith("openstack/content")]
        assert "files" not in _json(files, "openstack/latest/meta_data.json")


class TestWriting:
    def test_an_existing_dest_is_never_overwritten(self, tmp_path: Path) -> None:
        """Building onto an existing path raises FileExistsError and leaves its bytes and
        the directory as they were."""
        dest = tmp_path / "disk.config"
        dest.write_bytes(b"somebody else's drive")
        with pytest.raises(FileExistsError):
            build_iso(_data(), dest)
        assert dest.read_bytes() == b"somebody else's drive"
        assert [p.name for p in tmp_path.iterdir()] == ["disk.config"]

    def test_a_built_drive_is_never_overwritten_by_a_second_build(self, tmp_path: Path) -> None:
        """A second build onto the first's path fails and the first drive still reads back."""
        dest = tmp_path / "disk.config"
        build_iso(_data(name="first"), dest)
        with pytest.raises(FileExistsError):
            build_iso(_data(name="second"), dest)
        assert _json(read_iso(dest), "openstack/latest/meta_data.json")["name"] == "first"

    def test_only_the_drive_is_left_and_only_its_owner_reads_it(self, tmp_path: Path) -> None:
        """No temporary file stays behind, and the drive (it holds the password) is 0600."""
        dest = tmp_path / "disk.config"
        build_iso(_data(), dest)
        assert [p.name for p in tmp_path.iterdir()] == ["disk.config"]
        assert dest.stat().st_mode & 0o777 == 0o600

    def test_the_mode_asked_for_is_the_drives(self, tmp_path: Path) -> None:
        """A caller whose QEMU cannot be given the file may ask for a wider mode."""
        dest = tmp_path / "disk.config"
        build_iso(_data(), dest, mode=0o644)
        assert dest.stat().st_mode & 0o777 == 0o644

    def test_a_failed_build_leaves_nothing(self, tmp_path: Path) -> None:
        """Writing into a missing directory is a DiskError and creates nothing."""
        with pytest.raises(DiskError, match="build config drive failed"):
            build_iso(_data(), tmp_path / "missing" / "disk.config")
        assert list(tmp_path.iterdir()) == []

    def test_a_rebuilt_drive_reads_back_the_new_values(self, tmp_path: Path) -> None:
        """After a rebuild with a new name, password, key, user data and metadata, the new
        drive carries the new values and none of the old."""
        old = _built(tmp_path, _data(), "disk.config.old")
        new_key = Key(name="newkey", data="ssh-ed25519 AAAAnew new@host")
        new = _built(
            tmp_path,
            _data(
                name="web 2",
                admin_pass="n3w-pass",
                key=new_key,
                user_data=_b64(b"#!/bin/sh\necho new\n"),
                metadata={"role": "db"},
            ),
        )
        md = _json(new, "openstack/latest/meta_data.json")
        assert (md["name"], md["admin_pass"], md["meta"]) == ("web 2", "n3w-pass", {"role": "db"})
        assert md["public_keys"] == {"newkey": new_key.data}
        assert new["openstack/latest/user_data"] == b"#!/bin/sh\necho new\n"
        assert _json(old, "openstack/latest/meta_data.json")["name"] == "web 1"


class TestReadIso:
    def test_read_iso_gives_the_long_names(self, tmp_path: Path) -> None:
        """read_iso names files by their real names (dashes, underscores, long extensions),
        not the upper-case ISO 9660 ones."""
        files = _built(tmp_path, _data())
        assert "openstack/latest/network_data.json" in files
        assert "ec2/2009-04-04/meta-data.json" in files
        assert not [p for p in files if p != p.lower() or ";" in p]

    def test_read_iso_falls_back_to_iso9660_names(self, tmp_path: Path) -> None:
        """An image without Rock Ridge or Joliet is read by its ISO 9660 names, less ';1'."""
        source = tmp_path / "src" / "openstack" / "latest"
        source.mkdir(parents=True)
        (source / "meta_data.json").write_bytes(b"{}")
        image = tmp_path / "plain.iso"
        subprocess.run(
            ["genisoimage", "-quiet", "-o", str(image), "-V", "config-2", str(tmp_path / "src")],
            check=True,
        )
        assert read_iso(image) == {"OPENSTAC/LATEST/META_DAT.JSO": b"{}"}

    def test_read_iso_of_something_else_is_a_disk_error(self, tmp_path: Path) -> None:
        """A file that is not an ISO image, or no file, is a DiskError, not a pycdlib or OS
        error."""
        junk = tmp_path / "junk"
        junk.write_bytes(b"\0" * 65536)
        with pytest.raises(DiskError, match="read config drive failed"):
            read_iso(junk)
        with pytest.raises(DiskError, match="read config drive failed"):
            read_iso(tmp_path / "missing.iso")


class TestSecrets:
    def test_secrets_are_not_in_the_repr(self) -> None:
        """repr() of the input shows neither the password, the user data nor file contents."""
        shown = repr(_data())
        for secret in (ADMIN_PASS, _b64(USER_DATA), _b64(MOTD)):
            assert secret not in shown
        assert SERVER_ID in shown

    def test_building_logs_no_secret(self, tmp_path: Path) -> None:
        """build_iso logs that it built a drive, and no secret in any form."""
        with structlog.testing.capture_logs() as logs:
            build_iso(_data(), tmp_path / "disk.config")
        assert [e["event"] for e in logs] == ["config drive built"]
        shown = repr(logs)
        for secret in (ADMIN_PASS, _b64(USER_DATA), "user-data-never-logged", _b64(MOTD)):
            assert secret not in shown


def test_force_config_drive_gives_every_new_server_one(tmp_path: Path) -> None:
    """With REBUILDD_FORCE_CONFIG_DRIVE a server created without asking gets a config drive
    (an iso9660 cdrom labelled config-2), and the view says so."""
    from tests.live import start_live_daemon
    from tests.xmlutil import disk_sources, parse

    live = start_live_daemon(tmp_path, force_config_drive=True)
    try:
        server_id = live.create_server()
        assert live.server(server_id)["config_drive"] == "True"
        xml = live.run(live.daemon.hypervisor.domain_xml(f"rebuildd-{server_id}"))
        iso = disk_sources(parse(xml))["hdd"]
        meta = read_iso(iso)["openstack/latest/meta_data.json"]
        assert server_id.encode() in meta
    finally:
        live.stop()
