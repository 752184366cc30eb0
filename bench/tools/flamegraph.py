#!/usr/bin/env python3
"""Flame graph from `perf script` output: folds each sample's call chain (root first) and
draws one SVG, widths proportional to samples. No dependencies beyond Python.

    perf script -i perf.data | bench/tools/flamegraph.py --title "..." > flame.svg
    bench/tools/flamegraph.py --folded out.folded < perf-script.txt > flame.svg

Frames are shortened for reading: generic parameters and closure suffixes are dropped,
so `poll<hyper::proto::h1::...<...>>` becomes `poll`, and inlined frames are kept.
"""

import argparse
import collections
import html
import re
import sys

GENERIC = re.compile(r"<[^<>]*>")
OFFSET = re.compile(r"\+0x[0-9a-f]+$")


def short(frame):
    frame = OFFSET.sub("", frame.replace(" (inlined)", ""))
    # Strip nested generics from the inside out.
    prev = None
    while prev != frame:
        prev, frame = frame, GENERIC.sub("", frame)
    return frame.strip() or "?"


def fold(lines):
    """Yields (stack tuple root→leaf, 1) per sample of `perf script` text."""
    comm, frames = None, []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if comm is not None:
                yield tuple([comm] + [short(f) for f in reversed(frames)])
            comm, frames = None, []
            continue
        if not line[0].isspace():
            comm, frames = line.split()[0], []
            continue
        parts = line.strip().split(None, 1)
        if len(parts) == 2:
            sym = parts[1].rsplit(" (", 1)[0] if parts[1].endswith(")") else parts[1]
            frames.append(sym)
    if comm is not None:
        yield tuple([comm] + [short(f) for f in reversed(frames)])


def build(stacks):
    root = {"n": 0, "kids": {}}
    for stack, count in stacks.items():
        root["n"] += count
        node = root
        for frame in stack:
            node = node["kids"].setdefault(frame, {"n": 0, "kids": {}})
            node["n"] += count
    return root


def color(name):
    # Kernel frames orange, libc yellow-ish, the rest warm by a stable hash of the name.
    if name.startswith(("[k]", "__x64", "entry_SYSCALL", "do_syscall", "tcp_", "__sys", "sock_")):
        return "rgb(230,140,60)"
    h = sum(map(ord, name)) % 60
    return f"rgb({205 + h % 50},{80 + h},{55})"


def svg(root, title, width=1200, row=16):
    total = root["n"] or 1
    rects, depth_max = [], 0

    def walk(node, name, x, depth):
        nonlocal depth_max
        w = node["n"] / total * (width - 20)
        if w < 0.6:
            return
        depth_max = max(depth_max, depth)
        rects.append((x, depth, w, name, node["n"]))
        cx = x
        for kid_name, kid in sorted(node["kids"].items()):
            walk(kid, kid_name, cx, depth + 1)
            cx += kid["n"] / total * (width - 20)

    walk(root, "all", 10, 0)
    height = (depth_max + 1) * row + 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="11">',
           f'<rect width="100%" height="100%" fill="#fdfdf6"/>',
           f'<text x="10" y="20" font-size="14">{html.escape(title)} ({total:,} samples; '
           'hover a frame for its share)</text>']
    for x, depth, w, name, n in rects:
        y = height - 10 - (depth + 1) * row
        label = html.escape(name)
        tip = f"{label} — {n:,} samples, {100 * n / total:.2f} %"
        out.append(f'<g><title>{tip}</title><rect x="{x:.1f}" y="{y}" width="{w:.1f}" '
                   f'height="{row - 1}" fill="{color(name)}" rx="1"/>')
        chars = int(w / 6.6)
        if chars >= 3:
            text = name if len(name) <= chars else name[:chars - 2] + ".."
            out.append(f'<text x="{x + 2:.1f}" y="{y + row - 4}">{html.escape(text)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--title", default="flame graph")
    ap.add_argument("--folded", help="also write the folded stacks here")
    args = ap.parse_args()
    stacks = collections.Counter(fold(sys.stdin))
    if args.folded:
        with open(args.folded, "w") as f:
            for stack, n in stacks.most_common():
                f.write(";".join(stack) + f" {n}\n")
    sys.stdout.write(svg(build(stacks), args.title))


if __name__ == "__main__":
    main()
