"""Schemathesis over the live daemon's own ``/openapi.json``: thousands of generated requests,
valid and invalid, to every documented operation; none may answer 5xx, every error is a Nova
fault body, and every answer conforms to the status codes, media types and schemas documented.

Generation is derandomized (hypothesis picks the same examples on every run) and bounded by
``max_examples`` per operation and mode, so the test is reproducible and bounded: about 2,250
requests, most of its time spent waiting on the loopback (about 2 minutes on 2 cores).
Nothing is excluded: the image upload's binary body is fuzzed too (against a queued qcow2
image, so that qemu-img inspects every generated body).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.live import LiveDaemon

MIN_REQUESTS = 2000
EXAMPLES_PER_RUN = 70  # per operation and generation mode (and again with real ids in paths)

FUZZ = settings(
    max_examples=EXAMPLES_PER_RUN,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,  # what the document forbids, the API refuses
]
# Glance's image PATCH body is JSON under its own media type.
schemathesis.serializer.alias("application/openstack-images-v2.1-json-patch", "application/json")
# A body over REBUILDD_MAX_BODY_BYTES is refused with 413 before anything reads it.
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": [400, 403, 404, 406, 409, 413]}}}
)


def assert_nova_fault(response: schemathesis.Response) -> None:
    """An error answer is JSON of the shape ``{name: {"code": status, "message": str}}``."""
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), response.content[:200]
    body = json.loads(response.content)
    assert isinstance(body, dict) and len(body) == 1, body
    ((name, fault),) = body.items()
    assert isinstance(name, str) and name, body
    assert isinstance(fault, dict), body
    assert fault.get("code") == response.status_code, body
    assert isinstance(fault.get("message"), str), body


@dataclass(frozen=True)
class RealResources:
    """Things that exist, so that generated input also reaches the code behind the 404s."""

    path_parameters: dict[str, dict[str, str]]  # per operation id
    image_id: str

    def point_at_real_image(self, case: Case[Any]) -> Case[Any]:
        """A generated rebuild or create, with a real image (and flavor): it is accepted and
        the fuzzed name, metadata, adminPass... go all the way to libvirt's domain XML."""
        body = case.body
        if isinstance(body, dict):
            for key in ("rebuild", "server"):
                if isinstance(inner := body.get(key), dict):
                    inner["imageRef"] = self.image_id
                    if key == "server":
                        inner["flavorRef"] = "1"
        return case


def _real_resources(daemon: LiveDaemon) -> RealResources:
    server_id = daemon.create_server("fuzzed")
    actions = daemon.client.get(f"/v2.1/servers/{server_id}/os-instance-actions").json()
    request_id = actions["instanceActions"][0]["request_id"]
    keypair = daemon.client.post(
        "/v2.1/os-keypairs",
        json={"keypair": {"name": "fuzz-key", "public_key": "ssh-rsa AAAAB3NzaC1yc2E= fuzz"}},
    )
    assert keypair.status_code == 200, keypair.text
    queued = daemon.client.post(
        "/image/v2/images",
        json={"name": "fuzz-upload", "disk_format": "qcow2", "container_format": "bare"},
    ).json()["id"]
    server = {"server_id": server_id}
    image = {"image_id": daemon.image_ids[0]}
    return RealResources(
        path_parameters={
            "show_server": server,
            "server_action": server,
            "list_instance_actions": server,
            "show_instance_action": {**server, "request_id": request_id},
            "show_flavor": {"flavor_id": "1"},
            "show_keypair": {"name": "fuzz-key"},
            "show_image": image,
            "download_image": image,
            "upload_image": {"image_id": queued},
        },
        image_id=daemon.image_ids[1],
    )


@dataclass(frozen=True)
class Run:
    """One hypothesis run: an operation, a generation mode, and what is pinned to be real."""

    operation: APIOperation[Any, Any, Any, Any]
    mode: GenerationMode
    path_parameters: dict[str, str] | None = None
    real_image: bool = False


def _runs(operations: list[APIOperation[Any, Any, Any, Any]], real: RealResources) -> list[Run]:
    runs: list[Run] = []
    for operation in operations:
        runs += [Run(operation, GenerationMode.POSITIVE), Run(operation, GenerationMode.NEGATIVE)]
        if pinned := real.path_parameters.get(_name(operation)):
            runs += [
                Run(operation, GenerationMode.POSITIVE, pinned),
                Run(operation, GenerationMode.NEGATIVE, pinned),
            ]
        if _name(operation) in {"create_server", "server_action"}:
            runs.append(Run(operation, GenerationMode.POSITIVE, pinned, real_image=True))
    return runs


def _name(operation: APIOperation[Any, Any, Any, Any]) -> str:
    return str(operation.definition.raw.get("operationId", operation.label))


def _wait_until_settled(daemon: LiveDaemon) -> list[dict[str, Any]]:
    """Every server, once none has a task in flight any more."""
    deadline = time.monotonic() + 120
    while True:
        servers: list[dict[str, Any]] = daemon.client.get("/v2.1/servers/detail").json()["servers"]
        if all(s["OS-EXT-STS:task_state"] is None for s in servers):
            return servers
        assert time.monotonic() < deadline, [s["OS-EXT-STS:task_state"] for s in servers]
        time.sleep(0.2)


@pytest.mark.timeout(280)
def test_schemathesis_finds_no_5xx_and_no_schema_violation(daemon: LiveDaemon) -> None:
    """Over 2,000 generated requests: no 5xx, no 422, Nova faults, documented shapes only,
    schema-violating requests refused; and every server the fuzzing created or rebuilt
    settles, none in ERROR."""
    schema = schemathesis.openapi.from_url(f"{daemon.url}/openapi.json", config=CONFIG)
    real = _real_resources(daemon)
    statuses: Counter[int] = Counter()
    session = requests.Session()

    def count(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        statuses[response.status_code] += 1

    session.hooks["response"].append(count)

    def exercise(case: Case[Any]) -> None:
        response = case.call(base_url=daemon.url, session=session, timeout=30)
        case.validate_response(response, checks=CHECKS)
        assert response.status_code != 422, response.content[:200]
        if response.status_code >= 400:
            assert_nova_fault(response)

    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results) >= 20, "the document has invalid operations"
    unviolable: list[str] = []
    started = time.monotonic()
    for run in _runs(operations, real):
        strategy = run.operation.as_strategy(
            generation_mode=run.mode, path_parameters=run.path_parameters
        )
        if run.real_image:
            strategy = strategy.map(real.point_at_real_image)
        fuzz: Callable[[], None] = FUZZ(given(case=strategy)(exercise))
        try:
            fuzz()
        except Unsatisfiable:
            # Nothing can violate a schema that constrains nothing (GET / has no input, and
            # any string is a valid path parameter).
            assert run.mode is GenerationMode.NEGATIVE, _name(run.operation)
            unviolable.append(_name(run.operation))
    elapsed = time.monotonic() - started
    total = sum(statuses.values())
    summary = json.dumps(
        {
            "requests": total,
            "seconds": round(elapsed, 1),
            "statuses": dict(sorted(statuses.items())),
            "no negative cases": unviolable,
        }
    )
    print(f"schemathesis: {summary}")
    assert total >= MIN_REQUESTS, summary
    assert not [status for status in statuses if status >= 500], summary
    assert statuses[202] >= 10, "the real-image runs should have created and rebuilt servers"
    errored = [
        (s["name"], s.get("fault")) for s in _wait_until_settled(daemon) if s["status"] == "ERROR"
    ]
    assert not errored, errored
