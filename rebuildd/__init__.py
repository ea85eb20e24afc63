"""rebuildd: rebuild virtual machines in place on one libvirt host, speaking Nova's compute API."""

__version__ = "0.1.0"
