#!/usr/bin/env python3
"""Writes a gRPC request body for h2load: one length-prefixed, serialized
envoy.service.auth.v3.CheckRequest shaped like the one Envoy's ext_authz filter sends
for a plain GET through the front proxy.

    check_body.py OUT.bin PATH ['name: value' ...]

Hand-encoded protobuf (no grpcio-tools needed). The fields and their values mirror
benches/support/mod.rs::check_request; tests/load_script_smoke.rs decodes this
output with prost and requires it to equal that function's message.
"""
import struct
import sys


def varint(n):
    n &= (1 << 64) - 1  # negative int64 → two's complement, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(num, data):
    return varint(num << 3 | 2) + varint(len(data)) + data


def field_str(num, s):
    return field_bytes(num, s.encode())


def field_varint(num, n):
    return varint(num << 3) + varint(n)


def peer(ip, port):
    socket_address = field_str(2, ip) + field_varint(3, port)  # address, port_value
    address = field_bytes(1, socket_address)  # Address.socket_address
    return field_bytes(1, address)  # Peer.address


def check_request(path, extra):
    headers = {
        ":authority": "127.0.0.1:9080",
        ":method": "GET",
        ":path": path,
        ":scheme": "http",
        "user-agent": "wrk",
        "accept": "*/*",
        "x-forwarded-proto": "http",
        "x-request-id": "6f1c3f0e-1d2b-4f0a-9a43-5c1e8f1b2a77",
    }
    headers.update(extra)
    http = field_str(1, "11829432764312359187") + field_str(2, "GET")
    for k, v in headers.items():  # map<string,string> headers = 3
        http += field_bytes(3, field_str(1, k) + field_str(2, v))
    http += field_str(4, path) + field_str(5, "127.0.0.1:9080") + field_str(6, "http")
    http += field_varint(9, -1) + field_str(10, "HTTP/1.1")  # size, protocol
    request = field_bytes(2, http)  # Request.http
    attributes = (
        field_bytes(1, peer("127.0.0.1", 51234))  # source
        + field_bytes(2, peer("127.0.0.1", 9080))  # destination
        + field_bytes(4, request)  # request
    )
    return field_bytes(1, attributes)  # CheckRequest.attributes


def main(argv):
    if len(argv) < 3:
        sys.exit("usage: check_body.py OUT.bin PATH ['name: value' ...]")
    extra = {}
    for h in argv[3:]:
        name, sep, value = h.partition(":")
        if not sep:
            sys.exit(f"header {h!r} is not 'name: value'")
        extra[name.strip().lower()] = value.strip()
    msg = check_request(argv[2], extra)
    with open(argv[1], "wb") as f:
        f.write(b"\x00" + struct.pack(">I", len(msg)) + msg)


if __name__ == "__main__":
    main(sys.argv)
