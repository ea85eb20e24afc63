"""Issue 19's real end-to-end time: rebuildd rebuilding the tiny real guest of
scripts/tinyguest.sh on libvirtd + QEMU, from the POST to the guest's ``TINYGUEST READY`` line
on its serial console (REBUILDD_CONSOLE_LOG_DIR), against a bare libvirt-python script making
the same calls on a copy of the same domain, timed from its first call to the same line.

The structure is bench/qemu.py's; what differs is the guest. It runs an OS that answers ACPI,
so both sides shut it down cleanly (``shutdown``, then wait for shut off; destroy only after
the same timeout rebuildd has), and both wait for the new image's guest to boot to READY.
The bare script does what bench/qemu.py's does (new root overlay copied from one made once by
``qemu-img create``, the disk taken out of the persistent XML and put back, start, old overlay
deleted) and keeps its config drive as it is: rebuildd writes a new one on every rebuild, an
extra the script does not pay. One guest boots at a time; the other side's guest idles at READY
meanwhile (at most two guests up, as tests/test_real_guest.py). The two sides take turns, one
rebuild each, so a change in the machine's speed falls on both.
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
from bench.qemu import PREFIX, URI, reachable, swap_root_and_start
from bench.qemu import _template as template
from rebuildd import domxml

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "tinyguest.sh"
FLAVOR = {"flavor": {"name": "b1.guest", "id": "bench-guest", "ram": 128, "vcpus": 1, "disk": 1}}
MV = {"X-OpenStack-Nova-API-Version": "2.90"}
SHUTDOWN_TIMEOUT = 60.0  # rebuildd's default; the guest powers off in well under a second
BOOT_LIMIT = 240.0  # a hung boot under TCG on a busy 2-core host, not a speed bound
POLL = 0.02  # the console log is read this often, on both sides


def build_images() -> tuple[Path, Path] | str:
    """The tiny guest's images A and B (scripts/tinyguest.sh, cached), or why not."""
    try:
        built = subprocess.run(
            [str(BUILD)], check=False, capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scripts/tinyguest.sh: {exc}"
    if built.returncode != 0:
        return f"scripts/tinyguest.sh failed: {built.stderr.strip()[-300:]}"
    out = Path(built.stdout.strip().splitlines()[-1])
    return out / "tinyguest-A.raw", out / "tinyguest-B.raw"


class Console:
    """A serial console log QEMU appends to: count the guest's boots that reached READY."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        text = self.path.read_bytes().decode(errors="replace") if self.path.exists() else ""
        found = (raw[raw.find("TINYGUEST ") :] for raw in text.splitlines())
        return [line.strip("\r\x00 ") for line in found if line.startswith("TINYGUEST ")]

    def ready_count(self) -> int:
        return sum(line.startswith("TINYGUEST READY") for line in self.lines())

    def ready_uptime(self, count: int) -> float:
        """The guest's own uptime, s, at its ``count``-th READY: its boot, without the host's
        part (the shutdown before it, the disk work, QEMU's start)."""
        ready = [line for line in self.lines() if line.startswith("TINYGUEST READY")]
        return float(ready[count - 1].split("t=")[1].split()[0])

    def clean_shutdowns(self) -> int:
        return sum(line.startswith("TINYGUEST POWEROFF by=acpi") for line in self.lines())

    def booted_tags(self) -> list[str]:
        return [
            line.split("tag=")[1].split()[0]
            for line in self.lines()
            if line.startswith("TINYGUEST BOOTED ")
        ]

    def wait_ready(self, count: int) -> None:
        """Until the ``count``-th READY line (each boot prints one)."""
        deadline = time.monotonic() + BOOT_LIMIT
        while self.ready_count() < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.path}: READY {count} never came: {self.lines()[-5:]}")
            time.sleep(POLL)


async def upload(client: httpx.AsyncClient, name: str, path: Path) -> str:
    """An image created and uploaded through rebuildd's image API, as any user would."""
    r = await client.post(
        "/image/v2/images", json={"name": name, "disk_format": "raw", "container_format": "bare"}
    )
    if r.status_code != 201:
        raise RuntimeError(f"image {name}: {r.status_code} {r.text[:300]}")
    image_id = str(r.json()["id"])
    r = await client.put(
        f"/image/v2/images/{image_id}/file",
        content=await asyncio.to_thread(path.read_bytes),
        headers={"Content-Type": "application/octet-stream"},
    )
    if r.status_code != 204:
        raise RuntimeError(f"upload {name}: {r.status_code} {r.text[:300]}")
    return image_id


async def scenario_guest(
    api: Any, daemon: Daemon, consoles: Path, images: tuple[Path, Path], n: int
) -> dict[str, Any]:
    """``n`` rebuilds of one tiny guest through rebuildd and ``n`` of its copy by the bare
    script, interleaved (this machine's speed moves within minutes)."""
    ids = [
        await upload(api.c, f"tinyguest-{tag}", path)
        for tag, path in zip("AB", images, strict=True)
    ]
    r = await api.c.post("/v2.1/flavors", json=FLAVOR)
    if r.status_code not in (200, 409):
        raise RuntimeError(f"flavor: {r.status_code} {r.text[:300]}")
    body = {
        "server": {
            "name": "bench-guest",
            "imageRef": ids[0],
            "flavorRef": FLAVOR["flavor"]["id"],
            "config_drive": True,
            "networks": "none",
        }
    }
    r = await api.c.post("/v2.1/servers", json=body, headers=MV)
    if r.status_code != 202:
        raise RuntimeError(f"create: {r.status_code} {r.text[:300]}")
    sid = str(r.json()["server"]["id"])
    domain = f"{PREFIX}{sid}"
    order = [ids[1], ids[0]]  # B, A, B, ...
    bare = Bare(domain, [daemon.state_dir / "_base" / image for image in order])
    active_ms: list[float] = []
    ready_ms: list[float] = []
    bare_ms: list[float] = []
    try:
        await api.wait_active(sid, 0.05)
        console = Console(consoles / f"{domain}.log")
        await asyncio.to_thread(console.wait_ready, 1)
        for i in range(n):
            active, ready = await _through_rebuildd(api, sid, console, order[i % 2], i)
            active_ms.append(active)
            ready_ms.append(ready)
            if i == 0:  # B's base is in rebuildd's image cache now: the copy can start
                await asyncio.to_thread(bare.boot)
            bare_ms.append(await asyncio.to_thread(bare.rebuild, i))
        ours = _outcome(console, ready_ms)
        theirs = _outcome(bare.console, bare_ms)
    finally:
        await asyncio.to_thread(bare.close)
        await api.c.delete(f"/v2.1/servers/{sid}")
    return {
        "n": n,
        "rebuildd_ready_ms": ready_ms,
        "rebuildd_active_ms": active_ms,
        "bare_ready_ms": bare_ms,
        "rebuildd_host_ms": ours.pop("host_ms"),
        "bare_host_ms": theirs.pop("host_ms"),
        "rebuildd_guest": ours,
        "bare_guest": theirs,
    }


async def _through_rebuildd(
    api: Any, sid: str, console: Console, image: str, i: int
) -> tuple[float, float]:
    """The ``i``-th rebuild: ms from the POST to ACTIVE, and to the new boot's READY."""
    t0 = time.perf_counter()
    r = await api.rebuild(sid, image)
    if r.status_code != 202:
        raise RuntimeError(f"rebuild {i}: {r.status_code} {r.text[:300]}")
    await api.wait_active(sid, POLL)
    active = (time.perf_counter() - t0) * 1000
    await asyncio.to_thread(console.wait_ready, i + 2)
    return active, (time.perf_counter() - t0) * 1000


def _outcome(console: Console, ready_ms: list[float]) -> dict[str, Any]:
    """What the guest says of the rebuilds: clean shutdowns, the tags it booted, and each
    rebuild's time less the guest's own boot (the host's part: TCG boots vary by seconds)."""
    return {
        "clean_shutdowns": console.clean_shutdowns(),
        "tags": console.booted_tags(),
        "host_ms": [ms - console.ready_uptime(i + 2) * 1000 for i, ms in enumerate(ready_ms)],
    }


class Bare:
    """A copy of rebuildd's guest (its own root overlay, config drive copy and console log),
    rebuilt with plain libvirt calls."""

    def __init__(self, template_domain: str, bases: list[Path]) -> None:
        self.template_domain = template_domain
        self.bases = bases
        self.conn: Any = None
        self.work = Path(tempfile.mkdtemp(prefix="rebuildd-bench-guest-"))
        self.name = f"{PREFIX}bare-{uuid.uuid4().hex[:8]}"
        self.console = Console(self.work / "console.log")
        self.templates: list[Path] = []
        self.target = ""
        self.current = self.work / "root-0.qcow2"
        self.dom: Any = None

    def boot(self) -> None:
        """Define the copy from rebuildd's domain, start it, wait for its READY."""
        self.conn = libvirt.open(URI)
        self.templates = [template(base, self.work, i) for i, base in enumerate(self.bases)]
        xml = self.conn.lookupByName(self.template_domain).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        root = domxml.parse(xml)
        root.find("name").text = self.name  # type: ignore[union-attr]
        root.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
        for interface in root.findall("devices/interface"):
            mac = interface.find("mac")
            if mac is not None:
                interface.remove(mac)  # libvirt gives the copy its own MAC
        log = root.find("devices/serial/log")
        assert log is not None, "rebuildd's domain has no console log"
        log.set("file", str(self.console.path))
        drive = root.find("devices/disk[@device='cdrom']/source")
        if drive is not None:  # the copy's own config drive (QEMU may lock the original)
            copy = self.work / "config-drive.iso"
            shutil.copyfile(str(drive.get("file")), copy)
            drive.set("file", str(copy))
        disk = root.find("devices/disk[@device='disk']")
        assert disk is not None
        self.target = str(disk.find("target").get("dev"))  # type: ignore[union-attr]
        shutil.copyfile(self.templates[1], self.current)
        disk.find("source").set("file", str(self.current))  # type: ignore[union-attr]
        self.dom = self.conn.defineXML(domxml.to_string(root))
        self.dom.create()
        self.console.wait_ready(1)

    def rebuild(self, i: int) -> float:
        """The ``i``-th rebuild: ms from its first libvirt call to the new boot's READY."""
        t0 = time.perf_counter()
        self.current = _bare_rebuild(
            self.conn, self.name, self.target, self.current, self.templates[i % 2], self.work, i
        )
        self.console.wait_ready(i + 2)
        return (time.perf_counter() - t0) * 1000

    def close(self) -> None:
        try:
            if self.dom is not None:
                if self.dom.isActive():
                    self.dom.destroy()
                self.dom.undefine()
        finally:
            if self.conn is not None:
                self.conn.close()
            shutil.rmtree(self.work, ignore_errors=True)


def _bare_rebuild(
    conn: Any, name: str, target: str, old: Path, template: Path, work: Path, i: int
) -> Path:
    dom = conn.lookupByName(name)
    dom.state()
    if dom.isActive():
        dom.shutdown()  # ACPI: the guest powers off by itself
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        while dom.isActive() and time.monotonic() < deadline:
            time.sleep(POLL)
        if dom.isActive():
            dom.destroy()
    return swap_root_and_start(conn, dom, target, old, template, work / f"root-{i + 1}.qcow2")


def start_daemon(state_dir: Path, consoles: Path, binary: Path = BIN) -> Daemon:
    state_dir.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(state_dir, binary=binary)
    daemon.env.update(
        REBUILDD_LIBVIRT_URI=URI,
        REBUILDD_DOMAIN_NAME_PREFIX=PREFIX,
        REBUILDD_DOMAIN_TYPE="auto",  # TCG where /dev/kvm cannot run a real OS
        REBUILDD_CONSOLE_LOG_DIR=str(consoles),
        REBUILDD_SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT),
    )
    daemon.prepare()
    daemon.start()
    return daemon


async def run(n: int, binary: Path = BIN) -> dict[str, Any]:
    why = reachable()
    if why is not None:
        return {"skipped": f"{URI} unreachable: {why}"}
    images = await asyncio.to_thread(build_images)
    if isinstance(images, str):
        return {"skipped": images}
    with tempfile.TemporaryDirectory(prefix="rebuildd-bench-guest-") as tmp:
        consoles = Path(tmp) / "consoles"
        consoles.mkdir()
        daemon = start_daemon(Path(tmp) / "state", consoles, binary)
        try:
            async with httpx.AsyncClient(base_url=daemon.url, timeout=120) as client:
                from bench.__main__ import Api

                api = Api(client)
                return await scenario_guest(api, daemon, consoles, images, n)
        finally:
            daemon.stop()
