"""Issue 5's real-hypervisor comparison: rebuildd rebuilding an OS-less guest on libvirtd +
QEMU, against a bare script making the same libvirt and disk calls with no daemon, no
database and no HTTP, in the same run.

The bare script is the least a competent script would do for the same result: look the domain
up and read its state, destroy it (the guest has no OS, and both sides run with a shutdown
timeout of 0), take the root ``<disk>`` out of the persistent XML and re-define it, copy an
empty qcow2 overlay of the new image (made once by ``qemu-img create``, as rebuildd does), put
the disk back and re-define, start the domain, delete the old overlay. It edits the XML with
rebuildd's own pure lxml functions (rebuildd.domxml), so the XML work is the same on both sides.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import libvirt

from bench.daemon import BIN, Daemon
from rebuildd import domxml

URI = "qemu:///system"
PREFIX = "rebuildd-bench-"
FLAVOR = {"flavor": {"name": "b1.qemu", "id": "bench-qemu", "ram": 128, "vcpus": 1, "disk": 1}}


def reachable() -> str | None:
    """None when qemu:///system answers, else why not."""
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as exc:
        return str(exc)
    return None


async def scenario_qemu(api: Any, daemon: Daemon, n: int) -> dict[str, Any]:
    """``n`` rebuilds through rebuildd, then ``n`` by the bare script, of one guest each."""
    r = await api.c.post("/v2.1/flavors", json=FLAVOR)
    if r.status_code not in (200, 409):
        raise RuntimeError(f"flavor: {r.status_code} {r.text[:300]}")
    r = await api.c.post(
        "/v2.1/servers",
        json={
            "server": {
                "name": "bench-qemu",
                "imageRef": api.images["demo-image-a"],
                "flavorRef": FLAVOR["flavor"]["id"],
            }
        },
    )
    if r.status_code != 202:
        raise RuntimeError(f"create: {r.status_code} {r.text[:300]}")
    sid = str(r.json()["server"]["id"])
    try:
        await api.wait_active(sid, 0.05)
        images = [api.images["demo-image-b"], api.images["demo-image-a"]]
        daemon_ms = await _through_rebuildd(api, sid, images, n)
        bases = [daemon.state_dir / "_base" / image for image in images]
        domain = f"{PREFIX}{sid}"
        bare_ms = await asyncio.to_thread(_bare, domain, bases, n)
    finally:
        await api.c.delete(f"/v2.1/servers/{sid}")
    return {"n": n, "rebuildd_ms": daemon_ms, "bare_ms": bare_ms}


async def _through_rebuildd(api: Any, sid: str, images: list[str], n: int) -> list[float]:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        r = await api.rebuild(sid, images[i % 2])
        if r.status_code != 202:
            raise RuntimeError(f"rebuild {i}: {r.status_code} {r.text[:300]}")
        await api.wait_active(sid)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def _bare(template_domain: str, bases: list[Path], n: int) -> list[float]:
    """Rebuild a copy of rebuildd's guest ``n`` times with plain libvirt calls."""
    conn = libvirt.open(URI)
    work = Path(tempfile.mkdtemp(prefix="rebuildd-bench-bare-"))
    name = f"{PREFIX}bare-{uuid.uuid4().hex[:8]}"
    dom = None
    try:
        templates = [_template(base, work, i) for i, base in enumerate(bases)]
        root = domxml.parse(
            conn.lookupByName(template_domain).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        )
        root.find("name").text = name  # type: ignore[union-attr]
        root.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
        for interface in root.findall("devices/interface"):
            mac = interface.find("mac")
            if mac is not None:
                interface.remove(mac)  # libvirt gives the copy its own MAC
        disk = root.find("devices/disk")
        assert disk is not None
        target = str(disk.find("target").get("dev"))  # type: ignore[union-attr]
        current = work / "root-0.qcow2"
        shutil.copyfile(templates[1], current)
        disk.find("source").set("file", str(current))  # type: ignore[union-attr]
        dom = conn.defineXML(domxml.to_string(root))
        dom.create()
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            current = _bare_rebuild(conn, name, target, current, templates[i % 2], work, i)
            times.append((time.perf_counter() - t0) * 1000)
        return times
    finally:
        if dom is not None:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        conn.close()
        shutil.rmtree(work, ignore_errors=True)


def _bare_rebuild(
    conn: Any, name: str, target: str, old: Path, template: Path, work: Path, i: int
) -> Path:
    dom = conn.lookupByName(name)
    dom.state()
    if dom.isActive():
        dom.destroy()
    return swap_root_and_start(conn, dom, target, old, template, work / f"root-{i + 1}.qcow2")


def swap_root_and_start(
    conn: Any, dom: Any, target: str, old: Path, template: Path, new: Path
) -> Path:
    """The bare script's rebuild of a stopped domain, as rebuildd makes the same calls: the
    old root disk detached, a new one from ``template`` attached, the domain started."""
    root = domxml.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    domxml.remove_disk(root, target)
    conn.defineXML(domxml.to_string(root))
    shutil.copyfile(template, new)
    root = domxml.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    domxml.add_disk(root, domxml.DiskSpec(target=target, path=str(new)))
    conn.defineXML(domxml.to_string(root))
    dom.create()
    old.unlink()
    return new


def _template(base: Path, work: Path, i: int) -> Path:
    """An empty overlay of ``base``, made once by qemu-img (rebuildd copies one the same way)."""
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(base)], check=True, capture_output=True
    ).stdout
    fmt = "raw" if b'"format": "raw"' in info else "qcow2"
    path = work / f"template-{i}.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", fmt, str(path), "1G"],
        check=True,
    )
    return path


def start_daemon(state_dir: Path, binary: Path = BIN) -> Daemon:
    daemon = Daemon(state_dir, binary=binary)
    daemon.env.update(
        REBUILDD_LIBVIRT_URI=URI,
        REBUILDD_DOMAIN_NAME_PREFIX=PREFIX,
        REBUILDD_SHUTDOWN_TIMEOUT="0",  # an OS-less guest ignores ACPI: destroy at once
    )
    daemon.prepare()
    daemon.start()
    return daemon


async def run(n: int, binary: Path = BIN) -> dict[str, Any]:
    why = reachable()
    if why is not None:
        return {"skipped": f"{URI} unreachable: {why}"}
    with tempfile.TemporaryDirectory(prefix="rebuildd-bench-qemu-") as tmp:
        daemon = start_daemon(Path(tmp), binary)
        try:
            async with httpx.AsyncClient(base_url=daemon.url, timeout=120) as client:
                from bench.__main__ import Api

                api = Api(client)
                await api.load_images()
                return await scenario_qemu(api, daemon, n)
        finally:
            daemon.stop()
