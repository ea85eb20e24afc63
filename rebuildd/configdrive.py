"""The config drive: an ISO 9660 image labelled ``config-2`` that carries a server's metadata
laid out as Nova's libvirt driver writes it, so cloud-init (and cloudbase-init, afterburn...)
configures the guest from it.

Owns what is on the drive and the image format. The layout and every file's content follow
``nova.api.metadata.base.InstanceMetadata.metadata_for_config_drive`` with Nova's default
settings (``config_drive_skip_versions``, ``vendordata_providers = StaticJSON`` without a
file, ``dhcp_domain = novalocal``); the image follows ``nova.virt.configdrive``'s genisoimage
call: volume id ``config-2``, Rock Ridge with root-owned read-only modes (``-r``), Joliet.
ISO 9660 names are interchange level 3 (upper case, ``-`` read as ``_``); readers use the
Rock Ridge or Joliet names, which are the real ones.

Pure apart from writing one image (:func:`build_iso`) and reading one back (:func:`read_iso`):
no libvirt, no Store, no domain XML; the caller attaches the drive. Secrets (admin password,
user data, personality contents) are never logged and never in a ``repr``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import string
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Final

import pycdlib
import structlog
from pycdlib.pycdlibexception import PyCdlibException

from rebuildd import __version__
from rebuildd.errors import DiskError

log = structlog.get_logger("rebuildd.configdrive")

LABEL: Final = "config-2"

# nova.api.metadata.base.OPENSTACK_VERSIONS, oldest first; each adds to the ones before.
FOLSOM: Final = "2012-08-10"
GRIZZLY: Final = "2013-04-04"  # meta_data.json random_seed
HAVANA: Final = "2013-10-17"  # vendor_data.json
LIBERTY: Final = "2015-10-15"  # meta_data.json project_id; network_data.json
NEWTON_ONE: Final = "2016-06-30"  # meta_data.json devices
NEWTON_TWO: Final = "2016-10-06"  # vendor_data2.json
OCATA: Final = "2017-02-22"
ROCKY: Final = "2018-08-27"
VICTORIA: Final = "2020-10-14"  # meta_data.json dedicated_cpus
EPOXY: Final = "2025-04-04"
OPENSTACK_VERSIONS: Final = (
    FOLSOM,
    GRIZZLY,
    HAVANA,
    LIBERTY,
    NEWTON_ONE,
    NEWTON_TWO,
    OCATA,
    ROCKY,
    VICTORIA,
    EPOXY,
    "latest",
)
# nova.api.metadata.base.VERSIONS less Nova's default config_drive_skip_versions, plus latest.
EC2_VERSIONS: Final = ("2009-04-04", "latest")

# network_data.json link types: Nova shows a VIF's type when it is one of
# nova.network.model.LEGACY_EXPOSED_VIF_TYPES and "phy" otherwise. These are the libvirt
# <interface type=...> values whose Nova VIF type is exposed.
_LINK_TYPES: Final = {"bridge": "bridge", "ethernet": "tap", "vhostuser": "vhostuser"}
# Names the ids Nova takes from Neutron (ports, networks), which rebuildd does not have.
_NAMESPACE: Final = uuid.UUID("9b0c1cf6-7a4e-5d0c-9f5e-0c6f1f1b6f2e")
_RANDOM_SEED_BYTES: Final = 512
# genisoimage -r: everything owned by root, files r--r--r--, directories r-xr-xr-x.
_FILE_MODE: Final = 0o100444
_DIR_MODE: Final = 0o040555
_D_CHARS: Final = frozenset(string.ascii_uppercase + string.digits + "_")


@dataclass(frozen=True, slots=True, kw_only=True)
class Key:
    """The server's key pair, as Nova's ``instance.keypairs[0]``."""

    name: str
    data: str
    type: str = "ssh"


@dataclass(frozen=True, slots=True, kw_only=True)
class Nic:
    """One guest interface, as libvirt's domain XML describes it."""

    mac: str
    interface_type: str = "bridge"  # <interface type=...>
    source: str = ""  # the libvirt network or bridge it is plugged into
    target_dev: str | None = None  # <target dev=...>, Nova's VIF devname
    mtu: int | None = None  # Nova gives null when the subnet has a DHCP server


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigDriveData:
    """Everything the drive says about one server (Nova's instance, as the API stored it)."""

    server_id: str
    name: str
    hostname: str  # without a domain: dhcp_domain is appended, as Nova does
    project_id: str
    image_id: str | None  # None for a server booted from a volume
    flavor_name: str
    key: Key | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    admin_pass: str | None = field(default=None, repr=False)
    user_data: str | None = field(default=None, repr=False)  # base64, as the API stores it
    personality: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (path, base64)
    nics: tuple[Nic, ...] = ()
    availability_zone: str = "nova"
    root_device_name: str = "/dev/vda"
    dhcp_domain: str = "novalocal"

    def __post_init__(self) -> None:
        # A caller's later change to its dict must not change a drive built from it.
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))


def drive_files(data: ConfigDriveData) -> dict[str, bytes]:
    """Every file of the drive, path (relative, ``/``-separated) to content, in Nova's order."""
    files: dict[str, bytes] = {}
    user_data = _decode(data.user_data) if data.user_data is not None else None
    ec2 = _json(_ec2_meta_data(data))
    for version in EC2_VERSIONS:
        if user_data is not None:
            files[f"ec2/{version}/user-data"] = user_data
        files[f"ec2/{version}/meta-data.json"] = ec2
    network = _json(network_data(data))
    for version in OPENSTACK_VERSIONS:
        base = f"openstack/{version}"
        files[f"{base}/meta_data.json"] = _json(meta_data(data, version))
        if user_data is not None:
            files[f"{base}/user_data"] = user_data
        if _since(HAVANA, version):
            files[f"{base}/vendor_data.json"] = _json({})
        if _since(LIBERTY, version):
            files[f"{base}/network_data.json"] = network
        if _since(NEWTON_TWO, version):
            # The StaticJSON provider's data sits under "static" here, not in vendor_data.json.
            files[f"{base}/vendor_data2.json"] = _json({"static": {}})
    for index, (_, contents) in enumerate(data.personality):
        files[f"openstack/{_content_path(index).lstrip('/')}"] = _decode(contents)
    return files


def meta_data(data: ConfigDriveData, version: str = "latest") -> dict[str, object]:
    """``openstack/<version>/meta_data.json``, keys in Nova's order; ``random_seed`` is new
    on every call, as it is for every version Nova writes."""
    md: dict[str, object] = {"uuid": data.server_id}
    if data.metadata:
        md["meta"] = dict(data.metadata)
    if data.personality:
        md["files"] = [
            {"path": path, "content_path": _content_path(index)}
            for index, (path, _) in enumerate(data.personality)
        ]
    if data.admin_pass:
        md["admin_pass"] = data.admin_pass
    if data.key is not None:
        md["public_keys"] = {data.key.name: data.key.data}
        md["keys"] = [{"name": data.key.name, "type": data.key.type, "data": data.key.data}]
    md["hostname"] = _hostname(data)
    md["name"] = data.name
    md["launch_index"] = 0
    md["availability_zone"] = data.availability_zone
    if _since(GRIZZLY, version):
        seed = os.urandom(_RANDOM_SEED_BYTES)
        md["random_seed"] = base64.b64encode(seed).decode("ascii")
    if _since(LIBERTY, version):
        md["project_id"] = data.project_id
    if _since(NEWTON_ONE, version):
        md["devices"] = []  # rebuildd keeps no device tags
    if _since(VICTORIA, version):
        md["dedicated_cpus"] = []  # nor a NUMA topology with pinned CPUs
    return md


def network_data(data: ConfigDriveData) -> dict[str, object]:
    """``network_data.json``: one link and one IPv4 DHCP network per NIC, as
    ``nova.virt.netutils.get_network_metadata`` gives them; ``{}`` without NICs."""
    if not data.nics:
        return {}
    links: list[dict[str, object]] = []
    networks: list[dict[str, object]] = []
    for index, nic in enumerate(data.nics):
        link_id = nic.target_dev or f"interface{index}"
        mac = nic.mac.lower()
        links.append(
            {
                "id": link_id,
                "vif_id": str(uuid.uuid5(uuid.UUID(data.server_id), mac)),
                "type": _LINK_TYPES.get(nic.interface_type, "phy"),
                "mtu": nic.mtu,
                "ethernet_mac_address": mac,
            }
        )
        networks.append(
            {
                "id": f"network{index}",
                "type": "ipv4_dhcp",
                "link": link_id,
                "network_id": str(uuid.uuid5(_NAMESPACE, f"{nic.interface_type}:{nic.source}")),
            }
        )
    return {"links": links, "networks": networks, "services": []}


def build_iso(data: ConfigDriveData, dest: Path, *, mode: int = 0o600) -> None:
    """Write the drive to ``dest``, which must not exist: made under a temporary name in its
    directory and linked into place, so ``dest`` is either absent or whole. An existing
    ``dest`` is never replaced (:class:`FileExistsError`); a re-run may take it as done.

    ``mode`` is 0600 because the drive holds the admin password and user data; libvirt's
    dynamic ownership hands the file to QEMU. Blocking: run it in a worker thread."""
    files = drive_files(data)
    try:
        _write_new(files, dest, mode)
    except FileExistsError:
        raise
    except OSError as exc:  # its strerror: the file name is a host path
        reason = exc.strerror or type(exc).__name__
        raise DiskError(command="build config drive", reason=reason) from exc
    except PyCdlibException as exc:
        raise DiskError(command="build config drive", reason=str(exc)) from exc
    log.info("config drive built", server_id=data.server_id, path=str(dest), files=len(files))


def read_iso(path: Path) -> dict[str, bytes]:
    """Every file on a config drive (or any ISO 9660 image), path to content, by its Rock
    Ridge names, else its Joliet names, else its ISO 9660 names less the ``;1``."""
    iso = pycdlib.PyCdlib()
    try:
        iso.open(str(path))
        try:
            return dict(_read_all(iso))
        finally:
            iso.close()
    except (OSError, PyCdlibException) as exc:
        raise DiskError(command="read config drive", reason=str(exc)) from exc


def _master(files: Mapping[str, bytes], out: io.BufferedWriter) -> None:
    iso = pycdlib.PyCdlib()
    iso.new(
        interchange_level=3,
        vol_ident=LABEL,
        pub_ident_str=f"rebuildd {__version__}",
        rock_ridge="1.09",
        joliet=3,
    )
    try:
        _add_all(iso, files)
        iso.write_fp(out)
    finally:
        iso.close()


def _add_all(iso: pycdlib.PyCdlib, files: Mapping[str, bytes]) -> None:
    directories: set[PurePosixPath] = set()
    for name, content in sorted(files.items()):
        path = PurePosixPath(name)
        for parent in reversed(path.parents[:-1]):
            if parent not in directories:
                iso.add_directory(
                    iso_path=_iso_path(parent, directory=True),
                    rr_name=parent.name,
                    joliet_path=f"/{parent}",
                    file_mode=_DIR_MODE,
                )
                directories.add(parent)
        iso.add_fp(
            io.BytesIO(content),
            len(content),
            iso_path=_iso_path(path, directory=False),
            rr_name=path.name,
            joliet_path=f"/{path}",
            file_mode=_FILE_MODE,
        )


def _write_new(files: Mapping[str, bytes], dest: Path, mode: int) -> None:
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    partial = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            _master(files, out)
            out.flush()
            os.fsync(out.fileno())
        partial.chmod(mode)
        os.link(partial, dest)  # unlike a rename, never replaces dest
        _fsync_dir(dest.parent)
    finally:
        partial.unlink(missing_ok=True)


def _read_all(iso: pycdlib.PyCdlib) -> Iterator[tuple[str, bytes]]:
    if iso.has_rock_ridge():
        kind = "rr_path"
    elif iso.has_joliet():
        kind = "joliet_path"
    else:
        kind = "iso_path"
    for directory, _, names in iso.walk(**{kind: "/"}):
        for name in names:
            where = f"{directory.rstrip('/')}/{name}"
            buffer = io.BytesIO()
            iso.get_file_from_iso_fp(buffer, **{kind: where})
            shown = where.removesuffix(";1").removesuffix(".") if kind == "iso_path" else where
            yield shown.lstrip("/"), buffer.getvalue()


def _iso_path(path: PurePosixPath, *, directory: bool) -> str:
    """The interchange-level-3 name: d-characters (A-Z, 0-9, _) and one dot in a file name."""
    parts = [_d_chars(part) for part in path.parts]
    if not directory:
        stem, dot, ext = path.name.rpartition(".")
        stem, ext = (stem, ext) if dot else (ext, "")
        parts[-1] = f"{_d_chars(stem)}.{_d_chars(ext)};1"
    return "/" + "/".join(parts)


def _d_chars(name: str) -> str:
    return "".join(c if c in _D_CHARS else "_" for c in name.upper())


def _since(first: str, version: str) -> bool:
    return OPENSTACK_VERSIONS.index(version) >= OPENSTACK_VERSIONS.index(first)


def _hostname(data: ConfigDriveData) -> str:
    return f"{data.hostname}.{data.dhcp_domain}" if data.dhcp_domain else data.hostname


def _content_path(index: int) -> str:
    return f"/content/{index:04d}"


def _decode(value: str) -> bytes:
    # As Nova's: not strict, so what its API accepted decodes the same here.
    return base64.b64decode(value)


def _json(value: object) -> bytes:
    # oslo's jsonutils.dump_as_bytes: json.dumps defaults (ASCII, ", " and ": "), UTF-8.
    return json.dumps(value).encode("utf-8")


def _ec2_meta_data(data: ConfigDriveData) -> dict[str, object]:
    """``ec2/<version>/meta-data.json`` for 2009-04-04 (and latest), keys in Nova's order.
    rebuildd has no EC2 id mapping: ``i-``/``ami-`` ids are the first 8 hex digits of the
    server's and the image's uuid, in Nova's ``%08x`` shape; reservation id, security groups
    and the root device are what rebuildd's server view shows."""
    hostname = _hostname(data)
    md: dict[str, object] = {
        "ami-id": f"ami-{uuid.UUID(data.image_id).hex[:8]}" if data.image_id else None,
        "ami-launch-index": 0,
        "ami-manifest-path": "FIXME",  # sic, Nova's
        "instance-id": f"i-{uuid.UUID(data.server_id).hex[:8]}",
        "hostname": hostname,
        "local-ipv4": None,  # addresses come from DHCP; Nova gives None without a fixed IP
        "reservation-id": "",
        "security-groups": ["default"],
    }
    if data.key is not None:
        md["public-keys"] = {"0": {"openssh-key": data.key.data}}
    md["local-hostname"] = hostname
    md["public-hostname"] = hostname
    md["public-ipv4"] = ""
    md["instance-type"] = data.flavor_name
    md["block-device-mapping"] = {
        "ami": data.root_device_name.removeprefix("/dev/"),
        "root": data.root_device_name,
    }
    md["placement"] = {"availability-zone": data.availability_zone}
    md["instance-action"] = "none"
    return md


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
