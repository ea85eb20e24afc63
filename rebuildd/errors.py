"""The one exception tree of rebuildd, and the one table that maps it to HTTP.

Owns error classes and their messages; it must not import FastAPI or anything that does I/O.
Messages come from typed keyword arguments and follow Nova's wording, so a client that matches
on Nova's messages keeps working.

    RebuilddError
    ├── Invalid                 400 badRequest
    │   ├── ValidationFailed, MalformedBody, NoSuchAction, VersionInvalid
    │   ├── ImageNotFoundForRebuild, ImageNotFoundForBuild, InvalidFlavorRef, ImageNotActive
    │   ├── FlavorMemoryTooSmall, FlavorDiskSmallerThanImage, FlavorDiskSmallerThanMinDisk
    │   ├── InvalidKeyName, ImageDataInvalid, InstanceUserDataMalformed, InvalidBDM
    │   ├── InvalidVolume, VolumeSizeTooSmall, InvalidDevicePath, DevicePathInUse
    ├── Unauthorized            401 unauthorized
    ├── Forbidden               403 forbidden
    ├── NotFound                404 itemNotFound
    │   └── ServerNotFound, FlavorNotFound, ImageNotFound, KeypairNotFound, ActionNotFound,
    │       DomainNotFound, VolumeNotFound, VolumeAttachmentNotFound, VolumeBDMNotFound
    ├── Conflict                409 conflictingRequest
    │   └── InstanceInvalidState, InstanceIsLocked, TaskStateConflict, Duplicate,
    │       AdoptionRefused
    ├── VersionNotAcceptable    406 notAcceptable
    ├── PayloadTooLarge         413 overLimit
    │   └── ImagePropertyLimitExceeded, ImageTagLimitExceeded, VolumeSizeExceedsLimit,
    │       InsufficientStorage
    ├── UnsupportedMediaType    415 badMediaType
    ├── ServiceUnavailable      503 serviceUnavailable (an upstream service rebuildd needs to
    │   ├── IdentityUnavailable                          answer the request is down)
    │   ├── ImageServiceUnavailable
    │   ├── VolumeServiceUnavailable
    │   ├── NameFilterBusy         (with Retry-After)
    │   ├── DatabaseUnavailable    (with Retry-After)
    │   └── HypervisorUnavailable
    └── OperationFailed         500 computeFault (a step of a pipeline failed; never a 500 to a
        ├── HypervisorError, DiskError, ImageFetchError      request, recorded as a fault)
        ├── VolumeNotCreated, VolumeNotDeleted
        └── ExternalEventTimeout, ExternalEventFailed
"""

from __future__ import annotations

import re
from typing import ClassVar, Final

# An absolute path of three or more components that no word, dot, colon or slash precedes
# (so a URL's path is left alone): a host path, e.g. in a tool's or libvirt's message.
_HOST_PATH: Final = re.compile(r"(?<![\w.~:/])/(?:[^\s'\"`:,/]+/){2,}([^\s'\"`:,/]*)")


class RebuilddError(Exception):
    """Base of every error rebuildd raises on purpose."""

    template: ClassVar[str] = "An unknown error occurred."

    def __init__(self, message: str | None = None, **kwargs: object) -> None:
        self.kwargs = kwargs
        self.message = message if message is not None else self.template.format(**kwargs)
        super().__init__(self.message)


class Invalid(RebuilddError):
    template = "Invalid input."


class ValidationFailed(Invalid):
    template = "Invalid input for field/attribute {field}. Value: {value}. {reason}"


class MalformedBody(Invalid):
    template = "Malformed request body"


class NoSuchAction(Invalid):
    template = "There is no such action: {action}"


class VersionInvalid(Invalid):
    template = (
        "API Version String {version} is of invalid format. Must be of format MajorNum.MinorNum."
    )


class ImageNotFoundForRebuild(Invalid):
    template = "Cannot find image for rebuild"


class ImageNotFoundForBuild(Invalid):
    template = "Can not find requested image"


class InvalidFlavorRef(Invalid):
    template = "Invalid flavorRef provided."


class ImageNotActive(Invalid):
    template = "Image {image_id} is not active."


class FlavorMemoryTooSmall(Invalid):
    template = "Flavor's memory is too small for requested image."


class FlavorDiskSmallerThanImage(Invalid):
    template = (
        "Flavor's disk is too small for requested image. Flavor disk is {flavor_size} bytes, "
        "image is {image_size} bytes."
    )


class FlavorDiskSmallerThanMinDisk(Invalid):
    template = (
        "Flavor's disk is smaller than the minimum size specified in image metadata. Flavor disk "
        "is {flavor_size} bytes, minimum size is {image_min_disk} bytes."
    )


class InvalidKeyName(Invalid):
    template = "Invalid key_name provided."


class AutoDiskConfigDisabledByImage(Invalid):
    template = "Requested image {image} has automatic disk resize disabled."


class InvalidArchitectureName(Invalid):
    template = "Architecture name '{arch}' is not recognised"


class PersonalityUndecodable(Invalid):
    template = "Personality content for {path} cannot be decoded"


class ImageDataInvalid(Invalid):
    template = "Image data is not a valid {disk_format} image: {reason}"


class InstanceUserDataMalformed(Invalid):
    template = "User data needs to be valid base 64."


class InvalidBDM(Invalid):
    template = "Block Device Mapping is Invalid: {reason}"


class ImageUnacceptable(Invalid):
    template = "Image {image_id} is unacceptable: {reason}"


class CertificateValidationFailed(Invalid):
    template = "{reason}"


class InvalidVolume(Invalid):
    """Cinder's InvalidVolume: a volume's status does not allow the request (Nova passes it
    on as a 400 too)."""

    template = "Invalid volume: {reason}"


class VolumeSizeTooSmall(Invalid):
    template = "Size of specified image {image_size}GB is larger than volume size {volume_size}GB."


class InvalidDevicePath(Invalid):
    template = "The supplied device path ({path}) is invalid."


class DevicePathInUse(Invalid):
    template = "The supplied device path ({path}) is in use."


class Unauthorized(RebuilddError):
    template = "The request you have made requires authentication."


class Forbidden(RebuilddError):
    template = "Policy doesn't allow {action} to be performed."


class MetadataLimitExceeded(Forbidden):
    template = "Maximum number of metadata items exceeds {allowed}"


class OnsetFileLimitExceeded(Forbidden):
    template = "Personality file limit exceeded"


class OnsetFilePathLimitExceeded(OnsetFileLimitExceeded):
    template = "Personality file path exceeds maximum {allowed}"


class OnsetFileContentLimitExceeded(OnsetFileLimitExceeded):
    template = "Personality file content exceeds maximum {allowed}"


class NotFound(RebuilddError):
    template = "Resource could not be found."


class ServerNotFound(NotFound):
    template = "Instance {server_id} could not be found."


class FlavorNotFound(NotFound):
    template = "Flavor {flavor_id} could not be found."


class ImageNotFound(NotFound):
    template = "Image {image_id} could not be found."


class KeypairNotFound(NotFound):
    template = "Keypair {name} not found for user {user_id}"


class ActionNotFound(NotFound):
    template = "Action {request_id} on instance {server_id} could not be found."


class DomainNotFound(NotFound):
    template = "Domain {domain} could not be found."


class VolumeNotFound(NotFound):
    template = "Volume {volume_id} could not be found."


class VolumeAttachmentNotFound(NotFound):
    template = "Volume attachment could not be found with filter: attachment_id = {attachment_id}."


class VolumeBDMNotFound(NotFound):
    """Nova's answer to a detach or show of a volume the server does not have."""

    template = "No volume Block Device Mapping with id {volume_id}."


class Conflict(RebuilddError):
    template = "There was a conflict when trying to complete your request."


class InstanceInvalidState(Conflict):
    template = "Cannot '{action}' instance {server_id} while it is in {attr} {state}"


class InstanceIsLocked(Conflict):
    template = "Instance {server_id} is locked"


class TaskStateConflict(Conflict):
    """The compare-and-swap on task_state lost a race (Nova answers 500 here; we answer 409)."""

    template = (
        "Cannot '{action}' instance {server_id}: its task_state changed concurrently "
        "(expected {expected}, found {actual})"
    )


class Duplicate(Conflict):
    template = "{kind} {name} already exists."


class AdoptionRefused(Conflict):
    """``rebuildd adopt`` will not register this domain (known already, or not rebuildable)."""

    template = "Cannot adopt domain {domain}: {reason}"


class VersionNotAcceptable(RebuilddError):
    template = (
        "Version {version} is not supported by the API. Minimum is {min_version} and maximum "
        "is {max_version}."
    )


class PayloadTooLarge(RebuilddError):
    template = "Request is too large."


class ImagePropertyLimitExceeded(PayloadTooLarge):
    """Glance's image_property_quota."""

    template = (
        "The limit has been exceeded on the number of allowed image properties. Attempted: "
        "{attempted}, Maximum: {maximum}"
    )


class ImageTagLimitExceeded(PayloadTooLarge):
    """Glance's image_tag_quota."""

    template = (
        "The limit has been exceeded on the number of allowed image tags. Attempted: "
        "{attempted}, Maximum: {maximum}"
    )


class VolumeSizeExceedsLimit(PayloadTooLarge):
    """Cinder's per-volume limit (here the ``max_volume_size_gb`` setting)."""

    template = "Requested volume size {size}G is larger than maximum allowed limit {limit}G."


class InsufficientStorage(PayloadTooLarge):
    """The host's filesystem refused the bytes (ENOSPC, EDQUOT, EFBIG): named without a path."""

    template = "Not enough space on this host to create {what} of {size} GiB: {reason}"


class UnsupportedMediaType(RebuilddError):
    """A body in a media type the route does not read (Nova's words for every API)."""

    template = "Unsupported Content-Type"


class ServiceUnavailable(RebuilddError):
    template = "The server is currently unavailable. Please try again at a later time."
    retry_after: ClassVar[int | None] = None  # seconds: the 503's Retry-After, if any


class NameFilterBusy(ServiceUnavailable):
    """Too many name-filtered listings already wait for the one regex worker (namefilter.py):
    refused at once rather than queued behind them."""

    template = (
        "Too many listings filtered by a name pattern are waiting; try again in a moment or "
        "filter by an exact name."
    )
    retry_after: ClassVar[int | None] = 1


class IdentityUnavailable(ServiceUnavailable):
    """Keystone did not answer a token validation (keystonemiddleware's 503 and words)."""

    template = "The Keystone service is temporarily unavailable."


class ImageServiceUnavailable(ServiceUnavailable):
    """Glance could not be reached, timed out, failed (5xx) or answered what rebuildd cannot
    read. Nova raises GlanceConnectionFailed here and its API answers 500 "Unexpected API
    Error" (not one of the rebuild's expected errors); rebuildd answers 503 before the 202,
    and records it as the fault of a rebuild it fails after the 202."""

    template = "The image service (Glance at {url}) failed: {reason}"


class VolumeServiceUnavailable(ServiceUnavailable):
    """Cinder could not be reached, timed out, failed (5xx), refused rebuildd's credentials
    or answered what rebuildd cannot read. A 503 before the 202; the named fault of a job
    that fails after it."""

    template = "The volume service (Cinder at {url}) failed: {reason}"


class DatabaseUnavailable(ServiceUnavailable):
    """rebuildd's own database did not answer: SQLite locked by another process, its disk
    full or failing; PostgreSQL unreachable or the connection dropped. Nothing of the request
    was written (or, for a job's bookkeeping, it is written again once the database answers)."""

    template = "The database is unavailable ({reason}); try again later."
    retry_after: ClassVar[int | None] = 2


class HypervisorUnavailable(ServiceUnavailable):
    """The connection to libvirt is down (libvirtd restarted or not answering) and is being
    reopened: a 503 before the 202, the named fault of a job that fails after it."""

    template = "The hypervisor (libvirt at {uri}) is unavailable: {reason}. Try again shortly."


class OperationFailed(RebuilddError):
    template = "{step} failed: {reason}"


class HypervisorError(OperationFailed):
    template = "libvirt {call} failed: {reason}"


class DiskError(OperationFailed):
    template = "{command} failed: {reason}"


class ImageFetchError(OperationFailed):
    template = "Fetching image {image_id} failed: {reason}"


class VolumeNotCreated(OperationFailed):
    template = (
        "Volume {volume_id} did not finish being created even after we waited {seconds} "
        "seconds. And its status is {volume_status}."
    )


class VolumeNotDeleted(OperationFailed):
    template = "Volume {volume_id} was not deleted within {seconds} seconds."


class ExternalEventTimeout(OperationFailed):
    template = "Timed out after {timeout} s waiting for {events} of instance {server_id}"


class ExternalEventFailed(OperationFailed):
    """An awaited external event came with status ``failed`` (Nova's default error callback)."""

    template = "Instance event {event} of instance {server_id} failed"


# The one table: category -> (HTTP status, Nova fault name). Every class above resolves to
# exactly one entry through its MRO; tests/test_errors.py fails if one does not.
HTTP_FAULTS: dict[type[RebuilddError], tuple[int, str]] = {
    Invalid: (400, "badRequest"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    NotFound: (404, "itemNotFound"),
    VersionNotAcceptable: (406, "notAcceptable"),
    Conflict: (409, "conflictingRequest"),
    PayloadTooLarge: (413, "overLimit"),
    UnsupportedMediaType: (415, "badMediaType"),
    ServiceUnavailable: (503, "serviceUnavailable"),
    OperationFailed: (500, "computeFault"),
}


def without_host_paths(message: str) -> str:
    """``message`` with every host path cut to its last component (a user reads it)."""
    return _HOST_PATH.sub(r"\1", message)


def user_message(error: RebuilddError) -> str:
    """What a user may read of ``error``: libvirt's and the host tools' words lose their host
    paths; other messages (an upstream service's URL paths, the caller's own input) are kept."""
    if isinstance(error, (HypervisorError, DiskError)):
        return without_host_paths(error.message)
    return error.message


def http_fault(error: RebuilddError) -> tuple[int, str]:
    """The (status, fault name) for an error, from the one table."""
    for cls in type(error).__mro__:
        if cls in HTTP_FAULTS:
            return HTTP_FAULTS[cls]
    raise LookupError(f"{type(error).__name__} has no HTTP mapping")
