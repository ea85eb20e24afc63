"""KeystoneAuthenticator against a fake Keystone behind httpx.MockTransport: the service token's
life, the cache's two bounds, and every failure of Keystone as 401 or 503."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field

import httpx
import pytest

from rebuildd import errors
from rebuildd.auth import Identity
from rebuildd.keystone import KeystoneAuthenticator, KeystoneConfig

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
CONFIG = KeystoneConfig(
    url="http://keystone.test/v3", username="rebuildd", password="pw", project_name="service"
)


def _stamp(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.000000Z")


@dataclass
class FakeKeystone:
    """Keystone's two token calls, with users' tokens and a clock the test moves."""

    now: dt.datetime = T0
    service_lifetime: dt.timedelta = dt.timedelta(hours=1)
    tokens: dict[str, tuple[str | None, dt.datetime]] = field(default_factory=dict)
    issued: list[str] = field(default_factory=list)
    validations: int = 0
    revoked_service: set[str] = field(default_factory=set)
    down: bool = False

    def handler(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        assert request.url.path == "/v3/auth/tokens"
        if request.method == "POST":
            auth = json.loads(request.content)["auth"]
            assert auth["identity"]["password"]["user"] == {
                "name": "rebuildd",
                "domain": {"name": "Default"},
                "password": "pw",
            }
            token = f"service-{len(self.issued)}"
            self.issued.append(token)
            body = self._body("rebuildd", "service", ["service"], self.now + self.service_lifetime)
            return httpx.Response(201, json=body, headers={"X-Subject-Token": token})
        self.validations += 1
        service = request.headers["X-Auth-Token"]
        if service not in self.issued or service in self.revoked_service:
            return httpx.Response(401, json={"error": {"code": 401}})
        subject = self.tokens.get(request.headers["X-Subject-Token"])
        if subject is None or subject[1] <= self.now:
            return httpx.Response(404, json={"error": {"code": 404}})
        return httpx.Response(
            200, json=self._body("u1", subject[0], ["member", "reader"], subject[1])
        )

    @staticmethod
    def _body(
        user: str, project: str | None, roles: list[str], expires: dt.datetime
    ) -> dict[str, object]:
        token: dict[str, object] = {
            "expires_at": _stamp(expires),
            "user": {"id": user, "name": user},
            "roles": [{"id": f"id-{r}", "name": r} for r in roles],
        }
        if project is not None:
            token["project"] = {"id": project, "name": project}
        return {"token": token}


def _authenticator(fake: FakeKeystone, *, cache_seconds: float = 300) -> KeystoneAuthenticator:
    return KeystoneAuthenticator(
        dataclasses.replace(CONFIG, cache_seconds=cache_seconds),
        transport=httpx.MockTransport(fake.handler),
        clock=lambda: fake.now,
    )


class TestKeystoneAuthenticator:
    async def test_a_valid_token_becomes_its_identity(self) -> None:
        """Keystone's user, project and role names become the Identity."""
        fake = FakeKeystone(tokens={"t": ("demo", T0 + dt.timedelta(hours=1))})
        identity = await _authenticator(fake).authenticate("t")
        assert identity == Identity(user_id="u1", project_id="demo", roles=("member", "reader"))

    async def test_a_validated_token_is_cached_for_cache_seconds(self) -> None:
        """Within cache_seconds Keystone is not asked again; after them it is."""
        fake = FakeKeystone(tokens={"t": ("demo", T0 + dt.timedelta(hours=1))})
        auth = _authenticator(fake, cache_seconds=300)
        await auth.authenticate("t")
        fake.now += dt.timedelta(seconds=299)
        await auth.authenticate("t")
        assert fake.validations == 1
        fake.now += dt.timedelta(seconds=2)
        await auth.authenticate("t")
        assert fake.validations == 2

    async def test_the_cache_never_outlives_the_token(self) -> None:
        """A token expiring before cache_seconds is refused from its expiry on."""
        fake = FakeKeystone(tokens={"t": ("demo", T0 + dt.timedelta(seconds=60))})
        auth = _authenticator(fake, cache_seconds=300)
        await auth.authenticate("t")
        fake.now += dt.timedelta(seconds=61)
        with pytest.raises(errors.Unauthorized):
            await auth.authenticate("t")

    async def test_cache_seconds_0_asks_keystone_every_time(self) -> None:
        """With cache_seconds 0 every request is validated."""
        fake = FakeKeystone(tokens={"t": ("demo", T0 + dt.timedelta(hours=1))})
        auth = _authenticator(fake, cache_seconds=0)
        for _ in range(3):
            await auth.authenticate("t")
        assert fake.validations == 3

    async def test_an_unknown_or_missing_token_is_unauthorized(self) -> None:
        """Keystone's 404, and no token at all, are Unauthorized (401)."""
        auth = _authenticator(FakeKeystone())
        with pytest.raises(errors.Unauthorized):
            await auth.authenticate("nope")
        with pytest.raises(errors.Unauthorized):
            await auth.authenticate(None)

    async def test_a_token_without_a_project_is_unauthorized(self) -> None:
        """An unscoped (or domain-scoped) token names no project: Unauthorized."""
        fake = FakeKeystone(tokens={"t": (None, T0 + dt.timedelta(hours=1))})
        with pytest.raises(errors.Unauthorized):
            await _authenticator(fake).authenticate("t")

    async def test_the_service_token_is_reused_then_renewed_before_expiry(self) -> None:
        """One password auth serves many validations; near its expiry a new one is made."""
        fake = FakeKeystone(
            tokens={"t": ("demo", T0 + dt.timedelta(days=1))},
            service_lifetime=dt.timedelta(minutes=10),
        )
        auth = _authenticator(fake, cache_seconds=0)
        await auth.authenticate("t")
        await auth.authenticate("t")
        assert fake.issued == ["service-0"]
        fake.now += dt.timedelta(minutes=9, seconds=45)
        await auth.authenticate("t")
        assert fake.issued == ["service-0", "service-1"]

    async def test_keystone_401_on_the_service_token_reauthenticates(self) -> None:
        """When Keystone refuses the service token (revoked), rebuildd gets a new one and the
        caller's token is still validated."""
        fake = FakeKeystone(tokens={"t": ("demo", T0 + dt.timedelta(hours=1))})
        auth = _authenticator(fake, cache_seconds=0)
        await auth.authenticate("t")
        fake.revoked_service.add("service-0")
        assert (await auth.authenticate("t")).project_id == "demo"
        assert fake.issued == ["service-0", "service-1"]

    async def test_keystone_down_is_identity_unavailable(self) -> None:
        """A Keystone that does not answer is IdentityUnavailable (503), not a crash."""
        fake = FakeKeystone(down=True)
        with pytest.raises(errors.IdentityUnavailable):
            await _authenticator(fake).authenticate("t")
        assert errors.http_fault(errors.IdentityUnavailable()) == (503, "serviceUnavailable")

    async def test_service_credentials_refused_is_identity_unavailable(self) -> None:
        """If Keystone keeps refusing rebuildd's own token, callers get 503, not 401."""
        fake = FakeKeystone(tokens={"t": ("demo", T0 + dt.timedelta(hours=1))})
        fake.revoked_service.update({"service-0", "service-1"})
        with pytest.raises(errors.IdentityUnavailable):
            await _authenticator(fake).authenticate("t")

    def test_the_challenge_names_keystone(self) -> None:
        """WWW-Authenticate is keystonemiddleware's: Keystone uri="<identity url>"."""
        auth = _authenticator(FakeKeystone())
        assert auth.challenge == 'Keystone uri="http://keystone.test/v3"'
