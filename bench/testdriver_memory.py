"""How much memory libvirt's ``test:///default`` driver itself takes for N domains.

The test driver runs inside the client process, so on it rebuildd's RSS includes every domain
libvirt keeps (on QEMU they live in libvirtd). This defines N domains shaped like rebuildd's
(the same devices and metadata as a server of the demo flavor and image), running, in a bare
process and reports the RSS growth, so the benchmark can say how much of the daemon's peak RSS
is the hypervisor's rather than rebuildd's. The calls run on a pool of as many threads as the
daemon's libvirt pool (REBUILDD_LIBVIRT_THREADS' default), as glibc gives each thread that
allocates its own arena, and so the domains' memory lies the way it does in the daemon.

    python -m bench.testdriver_memory 10000
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import libvirt

from rebuildd import domxml, novameta
from rebuildd.lifecycle import new_mac
from rebuildd.settings import Settings


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def domain_xml() -> str:
    server_id = str(uuid.uuid4())
    image_id = str(uuid.uuid4())
    spec = domxml.DomainSpec(
        name=f"rebuildd-{server_id}",
        uuid=server_id,
        domain_type="test",
        memory_mib=512,
        vcpus=1,
        disks=(domxml.DiskSpec(target="vda", path=f"/var/lib/x/{server_id}/root.qcow2"),),
        interface="user",
        mac=new_mac(),
        metadata=domxml.Metadata(
            items=(
                ("server", server_id),
                ("name", "bench-scale-1234"),
                ("project", "demo"),
                ("flavor", "1"),
                ("image", image_id),
            )
        ),
    )
    root = domxml.build_domain(spec)
    # Nova's metadata, as the daemon writes it beside its own: the same XML per domain.
    novameta.write(
        root,
        novameta.NovaInstance(
            name="bench",
            creation_time=dt.datetime.now(dt.UTC).replace(microsecond=0),
            flavor=novameta.NovaFlavor("m1.tiny", 512, 1, 0, 0, 1, id="1"),
            user_uuid="demo",
            user_name="demo",
            project_uuid="demo",
            project_name="demo",
            root_type="image",
            root_uuid=image_id,
            package="rebuildd 0.1.0",
            image=novameta.NovaImage(image_id, "bare", "qcow2", 0, 0, ()),
            ports=(),
        ),
    )
    return domxml.to_string(root)


def measure(count: int) -> dict[str, float]:
    conn = libvirt.open("test:///default")
    before = rss_kib()

    def define(xml: str) -> None:
        conn.defineXML(xml).create()

    define(domain_xml())
    first = rss_kib()
    threads = Settings.model_fields["libvirt_threads"].default
    with ThreadPoolExecutor(threads) as pool:
        # The XML is built here, as the daemon builds it on its loop; libvirt's calls run in
        # the pool, a few at once (the daemon runs at most max_concurrent_operations jobs).
        window: deque[Future[None]] = deque()
        for _ in range(1, count):
            window.append(pool.submit(define, domain_xml()))
            if len(window) >= threads:
                window.popleft().result()
        for future in window:
            future.result()
    after = rss_kib()
    conn.close()
    return {
        "domains": count,
        "rss_growth_mib": (after - before) / 1024,
        "kib_per_domain": (after - first) / max(count - 1, 1),
    }


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 10000)))
