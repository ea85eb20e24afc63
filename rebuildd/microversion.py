"""Compute API microversions: parsing, negotiation and comparison.

Owns the range this daemon serves and the two request headers clients use. "2.100" is
(2, 100), never a float. Pure: no HTTP objects here; the middleware in api.py applies it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from rebuildd import errors


@dataclass(frozen=True, order=True, slots=True)
class Version:
    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    def at_least(self, text: str) -> bool:
        return self >= parse(text)


MIN_VERSION: Final = Version(2, 1)
MAX_VERSION: Final = Version(2, 104)
# At most 9 digits a part (Nova's own pattern has no bound, but int() of thousands of digits
# is slow and, past 4,300, an error): longer is malformed, as any other bad format.
_FORMAT: Final = re.compile(r"^([1-9][0-9]{0,8})\.([1-9][0-9]{0,8}|0)$")
_MAX_LENGTH: Final = 64  # what parse() strips and matches, whitespace included
HEADER: Final = "openstack-api-version"
LEGACY_HEADER: Final = "x-openstack-nova-api-version"


def parse(text: str) -> Version:
    match = _FORMAT.match(text.strip()) if len(text) <= _MAX_LENGTH else None
    if match is None:
        shown = text if len(text) <= _MAX_LENGTH else f"{text[:_MAX_LENGTH]}..."
        raise errors.VersionInvalid(version=shown)
    return Version(int(match.group(1)), int(match.group(2)))


def requested(headers: dict[str, str]) -> str | None:
    """The version string a request asks for, from either header (the new one wins)."""
    value = headers.get(HEADER)
    if value is not None:
        for item in value.split(","):
            service, _, version = item.strip().partition(" ")
            if service.lower() == "compute" and version.strip():
                return version.strip()
    legacy = headers.get(LEGACY_HEADER)
    return legacy.strip() if legacy else None


def negotiate(text: str | None) -> Version:
    """Absent -> 2.1; "latest" -> the maximum; malformed -> 400; out of range -> 406."""
    if text is None:
        return MIN_VERSION
    if text.lower() == "latest":
        return MAX_VERSION
    version = parse(text)
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise errors.VersionNotAcceptable(
            version=text, min_version=str(MIN_VERSION), max_version=str(MAX_VERSION)
        )
    return version
