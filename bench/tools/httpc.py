"""A minimal HTTP/1.1 client over asyncio streams, shared by the open-loop and
idle-connection tools: enough to send a GET (origin-form, or absolute-form through
an explicit proxy) and read one response off a keep-alive connection."""
import asyncio


def request_bytes(path, host, close=False):
    """GET request; `path` is "/1k" or, for a forward proxy, "http://host:port/1k"."""
    conn = "close" if close else "keep-alive"
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {conn}\r\n\r\n".encode()


async def read_response(reader):
    """Read one response; returns (status, keep_alive). Raises on a short read."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    conn = headers.get("connection", "").lower()
    keep_alive = conn == "keep-alive" if lines[0].startswith("HTTP/1.0") else conn != "close"
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif status not in (204, 304):
        await reader.read()  # close-delimited body
        keep_alive = False
    return status, keep_alive
