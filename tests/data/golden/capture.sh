#!/bin/sh
# Re-capture the golden *-in.xml files: define each sources/<name>.xml on a real libvirtd
# (QEMU driver), save `virsh dumpxml --inactive` as <name>-in.xml, undefine it again.
# The disk files need not exist: libvirt checks them only when a domain starts.
set -eu
cd "$(dirname "$0")"
URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
for source in sources/*.xml; do
    name=$(basename "$source" .xml)
    domain=$(sed -n 's:.*<name>\(rebuildd-adopt-test-[^<]*\)</name>.*:\1:p' "$source")
    virsh -q -c "$URI" define "$source" >/dev/null
    virsh -c "$URI" dumpxml --inactive "$domain" > "$name-in.xml"
    virsh -q -c "$URI" undefine "$domain" >/dev/null
    echo "$name-in.xml <- $domain"
done
