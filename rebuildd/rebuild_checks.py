"""The api stage's checks of a rebuild (and of a create's image), in Nova's order.

Owns Nova's ``compute.api.API`` validation that needs no I/O: the server's lock and states,
the image's properties (architecture, auto disk config), the metadata and personality quotas,
and whether the image fits the flavor. Each failure is the error Nova raises, with its
message; pure functions over records, no ports.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import TYPE_CHECKING, Final

from rebuildd import errors
from rebuildd.models import Flavor, Image, RequestContext, Server
from rebuildd.states import VmState

if TYPE_CHECKING:
    from rebuildd.pipeline import RebuildSpec

GiB: Final = 1024**3
REBUILDABLE_VM_STATES: Final = (VmState.ACTIVE, VmState.STOPPED, VmState.ERROR)


def check_rebuildable(server: Server, request: RequestContext) -> None:
    """Lock, vm_state, task_state and launched checks, in Nova's order (all 409)."""
    if server.locked and not request.is_admin:
        raise errors.InstanceIsLocked(server_id=server.id)
    if server.vm_state not in REBUILDABLE_VM_STATES:
        raise errors.InstanceInvalidState(
            action="rebuild", server_id=server.id, attr="vm_state", state=server.vm_state
        )
    if server.task_state is not None:
        raise errors.InstanceInvalidState(
            action="rebuild", server_id=server.id, attr="task_state", state=server.task_state
        )
    if server.launched_at is None:
        raise errors.InstanceInvalidState(
            action="rebuild", server_id=server.id, attr="launched_at", state="None"
        )


# Nova's canonical architecture names (nova.objects.fields.Architecture) and its aliases.
ARCHITECTURES: Final = frozenset(
    {
        "alpha",
        "armv6",
        "armv7l",
        "armv7b",
        "aarch64",
        "cris",
        "i686",
        "ia64",
        "lm32",
        "m68k",
        "microblaze",
        "microblazeel",
        "mips",
        "mipsel",
        "mips64",
        "mips64el",
        "openrisc",
        "parisc",
        "parisc64",
        "ppc",
        "ppcle",
        "ppc64",
        "ppc64le",
        "ppcemb",
        "s390",
        "s390x",
        "sh4",
        "sh4eb",
        "sparc",
        "sparc64",
        "unicore32",
        "x86_64",
        "xtensa",
        "xtensaeb",
    }
)
_ARCH_ALIASES: Final = {"i386": "i686", "i486": "i686", "i586": "i686", "x86_32": "i686",
                        "x86_32p": "i686", "amd64": "x86_64"}  # fmt: skip
# Nova's default quotas for what a rebuild may carry.
METADATA_ITEMS: Final = 128
INJECTED_FILES: Final = 5
INJECTED_FILE_PATH_LENGTH: Final = 255
INJECTED_FILE_CONTENT_BYTES: Final = 10240


def check_image_properties(image: Image, *, auto_disk_config: bool | None) -> None:
    """Nova's _check_auto_disk_config and _check_image_arch (400)."""
    disabled = str(image.properties.get("auto_disk_config", "")).strip().lower() == "disabled"
    if auto_disk_config and disabled:
        raise errors.AutoDiskConfigDisabledByImage(image=image.id)
    arch = image.properties.get("architecture")
    if arch is not None:
        name = str(arch).lower()
        if _ARCH_ALIASES.get(name, name) not in ARCHITECTURES:
            raise errors.InvalidArchitectureName(arch=arch)


def check_quotas(spec: RebuildSpec) -> None:
    """Nova's metadata and injected-file quotas (403), and undecodable personality (400)."""
    if spec.metadata is not None and len(spec.metadata) > METADATA_ITEMS:
        raise errors.MetadataLimitExceeded(allowed=METADATA_ITEMS)
    if len(spec.personality) > INJECTED_FILES:
        raise errors.OnsetFileLimitExceeded()
    for path, contents in spec.personality:
        try:
            # Nova's _decode_base64 ignores whitespace (its own samples contain some).
            decoded = base64.b64decode(re.sub(r"\s", "", contents), validate=True)
        except (binascii.Error, ValueError):
            raise errors.PersonalityUndecodable(path=path) from None
        if len(path) > INJECTED_FILE_PATH_LENGTH:
            raise errors.OnsetFilePathLimitExceeded(allowed=INJECTED_FILE_PATH_LENGTH)
        if len(decoded) > INJECTED_FILE_CONTENT_BYTES:
            raise errors.OnsetFileContentLimitExceeded(allowed=INJECTED_FILE_CONTENT_BYTES)


def check_image_fits(image: Image, flavor: Flavor, *, volume_backed: bool = False) -> None:
    """Nova's ``_check_requested_image``: active, RAM, and root disk size checks (400); a
    volume-backed server's root is its volume, so the flavor's disk is not checked."""
    if image.status != "active":
        raise errors.ImageNotActive(image_id=image.id)
    if flavor.ram < image.min_ram:
        raise errors.FlavorMemoryTooSmall()
    if flavor.disk == 0 or volume_backed:
        return  # the root disk takes the image's size
    flavor_bytes = flavor.disk * GiB
    image_bytes = max(image.size or 0, image.virtual_size or 0)
    if image_bytes > flavor_bytes:
        raise errors.FlavorDiskSmallerThanImage(flavor_size=flavor_bytes, image_size=image_bytes)
    if image.min_disk * GiB > flavor_bytes:
        raise errors.FlavorDiskSmallerThanMinDisk(
            flavor_size=flavor_bytes, image_min_disk=image.min_disk * GiB
        )
