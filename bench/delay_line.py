#!/usr/bin/env python3
"""A long round trip without netem: two network namespaces joined by two TUN devices, with
this process in between holding every packet for a fixed one-way delay.

    delay_line.py NAME ONE_WAY_MS

makes namespaces NAME-client (10.99.0.1) and NAME-gateway (10.99.0.2), prints "ready" once both
ends are up, and forwards until SIGTERM or SIGINT, then deletes the namespaces. This kernel has
no netem, fq or sch_bpf qdisc (bench/run.sh --only rtt uses it; needs root and /dev/net/tun).
Memory is bounded: past MAX_QUEUED packets in flight, new ones are dropped, as a full link does.
"""

import fcntl
import heapq
import os
import select
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_QUEUED = 20000
MTU = 1500


def ip(*args):
    subprocess.run(["ip", *args], check=True)


def open_tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main():
    name, one_way = sys.argv[1], float(sys.argv[2]) / 1000.0
    ends = [(f"{name}-client", f"{name[:8]}c", "10.99.0.1", "10.99.0.2"),
            (f"{name}-gateway", f"{name[:8]}g", "10.99.0.2", "10.99.0.1")]
    fds = []
    try:
        for netns, dev, local, peer in ends:
            ip("netns", "add", netns)
            # The device is made here and moved; the descriptor stays ours.
            fds.append(open_tun(dev))
            ip("link", "set", dev, "netns", netns)
            ip("-n", netns, "addr", "add", local, "peer", peer, "dev", dev)
            ip("-n", netns, "link", "set", dev, "mtu", str(MTU), "up")
            ip("-n", netns, "link", "set", "lo", "up")
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        signal.signal(signal.SIGINT, lambda *_: stop.append(1))
        print("ready", flush=True)
        queued = []  # (due, sequence, to_fd, packet)
        sequence = 0
        other = {fds[0]: fds[1], fds[1]: fds[0]}
        while not stop:
            now = time.monotonic()
            while queued and queued[0][0] <= now:
                _, _, to, packet = heapq.heappop(queued)
                try:
                    os.write(to, packet)
                except BlockingIOError:
                    pass  # the receiving side's queue is full: dropped, as on a link
            wait = max(0.0, queued[0][0] - now) if queued else 0.5
            try:
                readable, _, _ = select.select(fds, [], [], wait)
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd in readable:
                for _ in range(64):
                    try:
                        packet = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    if len(queued) < MAX_QUEUED:
                        sequence += 1
                        heapq.heappush(queued, (now + one_way, sequence, other[fd], packet))
    finally:
        for fd in fds:
            os.close(fd)
        for netns, _, _, _ in ends:
            subprocess.run(["ip", "netns", "del", netns], check=False)


if __name__ == "__main__":
    main()
