"""The ``<domain type>`` a host can run (LibvirtHypervisor.choose_domain_type): ``auto`` takes
``kvm`` only when libvirt offers it and the KVM module is hardware virtualisation; a PVM
/dev/kvm (kvm_pvm: guest code emulated, a real OS pauses at once) gets TCG. The KVM modules
are read from a directory given to the probe, so both kinds of host are tried on this one."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from rebuildd.hypervisor import DomainTypeChoice, LibvirtHypervisor
from tests.conftest import require

libvirt = pytest.importorskip("libvirt")
URI = "qemu:///system"


def _modules(tmp_path: Path, *names: str) -> Path:
    for name in names:
        (tmp_path / name).mkdir()
    return tmp_path


def _choose(
    uri: str, setting: str, modules: Path
) -> tuple[DomainTypeChoice, list[MutableMapping[str, Any]]]:
    async def choose() -> DomainTypeChoice:
        hypervisor = LibvirtHypervisor(uri, threads=1)
        await hypervisor.open()
        try:
            return await hypervisor.choose_domain_type(setting, modules=modules)
        finally:
            await hypervisor.close()

    with structlog.testing.capture_logs() as logs:
        choice = asyncio.run(choose())
    return choice, logs


@pytest.fixture
def kvm_offered() -> None:
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        require("libvirtd with the QEMU driver", str(exc))
    try:
        conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
    except libvirt.libvirtError as exc:  # no /dev/kvm: a host kind, not a missing service
        pytest.skip(f"libvirt offers no kvm domain here: {exc}")
    finally:
        conn.close()


@pytest.mark.qemu
@pytest.mark.usefixtures("kvm_offered")
def test_auto_takes_kvm_on_hardware_virtualisation(tmp_path: Path) -> None:
    """auto chooses kvm where libvirt offers it and kvm_intel (or kvm_amd) is loaded, and logs
    it."""
    choice, logs = _choose(URI, "auto", _modules(tmp_path, "kvm", "kvm_intel"))
    assert choice.domain_type == "kvm"
    assert [(e["event"], e["domain_type"]) for e in logs] == [("domain_type_chosen", "kvm")]


@pytest.mark.qemu
@pytest.mark.usefixtures("kvm_offered")
def test_auto_takes_qemu_on_a_pvm_kvm(tmp_path: Path) -> None:
    """auto chooses qemu (TCG) where /dev/kvm is PVM's, and the log line says why."""
    choice, logs = _choose(URI, "auto", _modules(tmp_path, "kvm", "kvm_pvm"))
    assert choice.domain_type == "qemu"
    assert "kvm_pvm" in choice.reason and "emulation failure" in choice.reason
    assert logs[0]["event"] == "domain_type_chosen" and logs[0]["reason"] == choice.reason


@pytest.mark.qemu
@pytest.mark.usefixtures("kvm_offered")
def test_a_set_domain_type_is_taken_as_it_is(tmp_path: Path) -> None:
    """domain_type=kvm is obeyed even where auto would not choose it."""
    choice, _ = _choose(URI, "kvm", _modules(tmp_path, "kvm", "kvm_pvm"))
    assert choice.domain_type == "kvm"


def test_auto_on_the_test_driver_is_test(tmp_path: Path) -> None:
    """auto on test:/// chooses the test driver's own domain type."""
    choice, _ = _choose("test:///default", "auto", tmp_path)
    assert choice.domain_type == "test"
