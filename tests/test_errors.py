"""The one error table: every rebuildd error maps to exactly one HTTP status and fault name."""

from __future__ import annotations

import pytest

from rebuildd import errors


def _all_error_classes() -> list[type[errors.RebuilddError]]:
    seen: list[type[errors.RebuilddError]] = []
    stack: list[type[errors.RebuilddError]] = [errors.RebuilddError]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            seen.append(sub)
            stack.append(sub)
    return seen


@pytest.mark.parametrize("cls", _all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_class_has_an_http_mapping(cls: type[errors.RebuilddError]) -> None:
    """No error class can reach a client without a status and a Nova fault name."""
    instance = cls("message")
    status, name = errors.http_fault(instance)
    assert 400 <= status <= 503
    assert name in {
        "badRequest",
        "unauthorized",
        "forbidden",
        "itemNotFound",
        "notAcceptable",
        "conflictingRequest",
        "overLimit",
        "badMediaType",
        "computeFault",
        "serviceUnavailable",
    }


def test_the_base_class_itself_is_unmapped() -> None:
    """Raising the bare base class is a bug that the table refuses to hide."""
    with pytest.raises(LookupError):
        errors.http_fault(errors.RebuilddError("x"))


def test_messages_follow_nova() -> None:
    """Messages come from typed keyword arguments, in Nova's words."""
    assert (
        errors.InstanceInvalidState(
            action="rebuild", server_id="S", attr="task_state", state="rebuilding"
        ).message
        == "Cannot 'rebuild' instance S while it is in task_state rebuilding"
    )
    assert errors.ServerNotFound(server_id="S").message == "Instance S could not be found."
    assert errors.NoSuchAction(action="x").message == "There is no such action: x"
