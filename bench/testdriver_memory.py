"""How much memory libvirt's ``test:///default`` driver itself takes for N domains.

The test driver runs inside the client process, so on it rebuildd's RSS includes every domain
libvirt keeps (on QEMU they live in libvirtd). This defines N domains shaped like rebuildd's,
running, in a bare process and reports the RSS growth, so the benchmark can say how much of
the daemon's peak RSS is the hypervisor's rather than rebuildd's.

    python -m bench.testdriver_memory 10000
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import uuid
from pathlib import Path

import libvirt

from rebuildd import domxml, novameta


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def measure(count: int) -> dict[str, float]:
    conn = libvirt.open("test:///default")
    before = rss_kib()
    for i in range(count):
        server_id = str(uuid.uuid4())
        spec = domxml.DomainSpec(
            name=f"rebuildd-{server_id}",
            uuid=server_id,
            domain_type="test",
            memory_mib=512,
            vcpus=1,
            disks=(domxml.DiskSpec(target="vda", path=f"/var/lib/x/{server_id}/root.qcow2"),),
            metadata=domxml.Metadata(
                items=(("server_id", server_id), ("image_ref", str(uuid.uuid4())))
            ),
        )
        root = domxml.build_domain(spec)
        # Nova's metadata, as the daemon writes it beside its own: the same XML per domain.
        image_id = str(uuid.uuid4())
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
        conn.defineXML(domxml.to_string(root)).create()
        if i == 0:
            first = rss_kib()
    after = rss_kib()
    conn.close()
    return {
        "domains": count,
        "rss_growth_mib": (after - before) / 1024,
        "kib_per_domain": (after - first) / max(count - 1, 1),
    }


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 10000)))
