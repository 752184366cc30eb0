#!/usr/bin/env python3
"""A DNS server for the bench's named path: UDP on 127.0.0.1:53 (of the network namespace
it runs in), answering `name=ipv4` arguments with an A record (TTL 300 s), and every other
question the way an authoritative server does: an empty answer (NODATA, for a listed name's
AAAA) or NXDOMAIN, each with an SOA whose minimum lets the resolver cache the absence.

Usage: stubdns.py NAME=IPV4...   (prints `ready` once it listens)
"""
import socket
import struct
import sys

TTL = 300

zone = dict(arg.split("=", 1) for arg in sys.argv[1:])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(4096)
    if len(data) < 17:
        continue
    tid, flags = struct.unpack("!HH", data[:4])
    i, labels = 12, []
    while i < len(data) and data[i]:
        labels.append(data[i + 1:i + 1 + data[i]].decode(errors="replace"))
        i += 1 + data[i]
    if i + 5 > len(data):
        continue
    qtype = struct.unpack("!H", data[i + 1:i + 3])[0]
    question = data[12:i + 5]
    name = ".".join(labels).lower()
    if name in zone and qtype == 1:
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, TTL, 4) + socket.inet_aton(zone[name])
        authority = b""
    else:
        answer = b""
        # SOA: root MNAME and RNAME, serial, refresh, retry, expire, minimum (the negative TTL).
        rdata = b"\x00\x00" + struct.pack("!IIIII", 1, TTL, TTL, TTL, TTL)
        authority = b"\xc0\x0c" + struct.pack("!HHIH", 6, 1, TTL, len(rdata)) + rdata
    rcode = 0 if name in zone else 3
    head = struct.pack("!HHHHHH", tid, 0x8580 | (flags & 0x0100) | rcode, 1,
                       1 if answer else 0, 1 if authority else 0, 0)
    s.sendto(head + question + answer + authority, peer)
