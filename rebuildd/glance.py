"""Glance v2 as rebuildd's image service, over one long-lived ``httpx.AsyncClient``.

Owns the conversation with Glance: image JSON parsed into :class:`~rebuildd.models.Image`
records at the edge (pydantic), ``GET /v2/images/{id}/file`` streamed to a file chunk by
chunk, listing for the read-only image API rebuildd serves in front of it, and the one
translation of every failure to talk to Glance into :class:`errors.ImageServiceUnavailable`
(:func:`map_glance_errors`). It does not verify image data: ``images.ImageCache`` checks the
hash of its own copy and inspects it (``imagecheck``) before any qemu process reads it, for
every backend. It does not own or close the client (the daemon does), and reads no settings.

Authentication is a seam: the client may carry an ``httpx.Auth`` (a Keystone token); without
one Glance must run unauthenticated (``[paste_deploy] flavor =``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import httpx
import pydantic
from pydantic import BaseModel, ConfigDict

from rebuildd import errors
from rebuildd.auth import image_visible
from rebuildd.models import Image, RequestContext
from rebuildd.storage import ImageFilters

M = TypeVar("M", bound=BaseModel)
CHUNK: Final = 1 << 20
# Keys of Glance's image schema that describe the record, not the image: never properties
# (Nova's _extract_attributes_v2 omits the same ones, and locations unless asked).
_NOT_PROPERTIES: Final = frozenset(
    {"self", "file", "schema", "tags", "os_hidden", "locations", "direct_url", "stores"}
)
_VERSION_SUFFIX: Final = re.compile(r"/v\d+(\.\d+)?/?$")


def endpoint(url: str) -> str:
    """Glance's root URL from an endpoint as a catalog or an operator writes it: a trailing
    ``/v2`` (or ``/v2.x``) and slash removed, as Nova does before it calls Glance."""
    return _VERSION_SUFFIX.sub("", url).rstrip("/")


def new_client(
    url: str,
    *,
    timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
    auth: httpx.Auth | None = None,
) -> httpx.AsyncClient:
    """The one client of a daemon's Glance (the caller owns it and closes it)."""
    return httpx.AsyncClient(
        base_url=endpoint(url),
        timeout=httpx.Timeout(timeout),
        transport=transport,
        auth=auth,
        headers={"Accept": "application/json"},
    )


class GlanceImage(BaseModel):
    """Glance v2's image object; every key it does not name is a custom property."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str
    name: str | None = None
    status: str
    disk_format: str | None = None
    container_format: str | None = None
    size: int | None = None
    virtual_size: int | None = None
    checksum: str | None = None
    os_hash_algo: str | None = None
    os_hash_value: str | None = None
    min_disk: int = 0
    min_ram: int = 0
    visibility: str = "shared"
    protected: bool = False
    owner: str | None = None
    created_at: dt.datetime
    updated_at: dt.datetime

    def to_image(self) -> Image:
        extra = self.model_extra or {}
        return Image(
            id=self.id,
            name=self.name,
            status=self.status,
            disk_format=self.disk_format,
            container_format=self.container_format,
            size=self.size,
            virtual_size=self.virtual_size,
            checksum=self.checksum,
            os_hash_algo=self.os_hash_algo,
            os_hash_value=self.os_hash_value,
            min_disk=self.min_disk,
            min_ram=self.min_ram,
            visibility=self.visibility,
            protected=self.protected,
            owner=self.owner,
            properties={k: v for k, v in extra.items() if k not in _NOT_PROPERTIES},
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


class GlanceImageList(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    images: list[GlanceImage]
    next: str | None = None


@contextlib.contextmanager
def map_glance_errors(url: str) -> Iterator[None]:
    """The one boundary: httpx's request errors (refused, reset, timed out, a broken
    stream) become ImageServiceUnavailable naming this Glance."""
    try:
        yield
    except httpx.RequestError as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise errors.ImageServiceUnavailable(url=url, reason=reason) from exc


def _uuid(image_id: str) -> str | None:
    """Glance ids are UUIDs; anything else is no image (and never reaches a URL)."""
    try:
        return str(uuid.UUID(image_id))
    except ValueError:
        return None


class GlanceImageService:
    """The ImageService port (and the image API's reads) over Glance v2."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.url = str(client.base_url).rstrip("/")

    # -- the ImageService port ----------------------------------------------------------------

    async def get(self, context: RequestContext | None, image_id: str) -> Image | None:
        """The image, or None when Glance has no such image (its 404)."""
        key = _uuid(image_id)
        if key is None:
            return None
        with map_glance_errors(self.url):
            response = await self.client.get(f"/v2/images/{key}")
        if response.status_code == 404:
            return None
        self._check(response)
        image = self._parse(GlanceImage, response).to_image()
        # rebuildd asks Glance as itself (a service user that may see every image): the
        # caller's own view is Glance's visibility applied here, as Glance would for its token.
        if context is not None and not image_visible(context, image):
            return None
        return image

    async def download(self, image_id: str, dest: Path) -> None:
        """Stream the image's data into the new file ``dest``, one chunk in memory at a time."""
        with map_glance_errors(self.url):
            # The file is opened only once Glance has answered 200.
            async with self._data(image_id) as response, await anyio.open_file(dest, "xb") as out:
                async for chunk in response.aiter_raw(CHUNK):
                    await out.write(chunk)

    # -- the image API's operations (reads answered from Glance; writes belong to Glance) ------

    async def list(self, filters: ImageFilters) -> list[Image]:
        """Glance's list with the same filters; without a limit, every page of it."""
        params: dict[str, str | int] = {}
        for name in ("name", "status", "visibility", "marker"):
            if (value := getattr(filters, name)) is not None:
                params[name] = value
        if filters.ids is not None:
            params["id"] = "in:" + ",".join(filters.ids)
        if filters.limit is not None:
            params["limit"] = filters.limit
        images: list[Image] = []
        path: str = "/v2/images"
        query: dict[str, str | int] | None = params
        while True:
            with map_glance_errors(self.url):
                response = await self.client.get(path, params=query)
            if response.status_code == 400:  # a bad filter or marker: Nova's Invalid
                raise errors.Invalid(f"Glance refused the image list: {response.text[:200]}")
            self._check(response)
            page = self._parse(GlanceImageList, response)
            images.extend(image.to_image() for image in page.images)
            if filters.limit is not None or page.next is None:
                return images
            # Glance's next link carries the query (params={} would drop it: None keeps it).
            path, query = page.next, None

    async def read(self, image_id: str) -> AsyncIterator[bytes]:
        """The image's data from Glance, chunk by chunk (for the download route)."""
        with map_glance_errors(self.url):
            async with self._data(image_id) as response:
                async for chunk in response.aiter_raw(CHUNK):
                    yield chunk

    async def create(self, context: RequestContext, fields: dict[str, Any]) -> Image:
        raise self._read_only()

    async def upload(self, image_id: str, chunks: AsyncIterator[bytes]) -> Image:
        raise self._read_only()

    async def delete(self, image_id: str) -> None:
        raise self._read_only()

    # -- helpers ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _data(self, image_id: str) -> AsyncIterator[httpx.Response]:
        """``GET /v2/images/{id}/file`` with its body still to be read: a 200, or an error
        (no such image or no data in Glance fails the fetch; anything else is Glance's)."""
        key = _uuid(image_id)
        if key is None:
            raise errors.ImageFetchError(image_id=image_id, reason="not a Glance image id")
        async with self.client.stream("GET", f"/v2/images/{key}/file") as response:
            if response.status_code in (204, 404):
                missing = "Glance has no such image" if response.status_code == 404 else ""
                raise errors.ImageFetchError(
                    image_id=image_id, reason=missing or "the image has no data in Glance"
                )
            if response.status_code != 200:
                await response.aread()
                self._check(response)
            yield response

    def _read_only(self) -> errors.Forbidden:
        return errors.Forbidden(
            f"rebuildd's image API is read-only with REBUILDD_IMAGE_BACKEND=glance: create, "
            f"upload and delete images in Glance at {self.url}."
        )

    def _check(self, response: httpx.Response) -> None:
        """Anything but a 200 here is Glance failing us (a 5xx, or an answer rebuildd did
        not ask for, such as a 401 from a Glance that wants a token)."""
        if response.status_code != 200:
            raise errors.ImageServiceUnavailable(
                url=self.url,
                reason=f"HTTP {response.status_code} from {response.request.url.path}: "
                f"{response.text[:200].strip()}",
            )

    def _parse(self, model: type[M], response: httpx.Response) -> M:
        try:
            return model.model_validate_json(response.content)
        except pydantic.ValidationError as exc:
            raise errors.ImageServiceUnavailable(
                url=self.url, reason=f"an answer rebuildd cannot read: {exc.errors()[:1]}"
            ) from exc
