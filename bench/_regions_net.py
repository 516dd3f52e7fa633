"""The network under bench/regions.py: namespaces, the delay line, the stand-in process.

Design (the simplest one that keeps every byte on a 127.0.0.1):

* One network namespace per region (``ip netns add``), with only its loopback up.
  There are no veths and no routes between them, so the only way from one region to
  another is the delay line below; nothing can bypass it.
* Inside each namespace the ports are fixed (the namespaces are private, so they
  cannot collide with anything): skyroute on ``SKYROUTE_PORT``, the region's stand-in
  upstream on ``STANDIN_PORT``, and for every other region ``j`` a door into it:
  ``SKYROUTE_PORT + j`` reaches region j's skyroute, ``STANDIN_PORT + j`` its stand-in.
* The delay line is one process in the root namespace (``python bench/_regions_net.py
  delay-line``) running a ``TcpForwarder`` per door. A Linux socket belongs to the
  namespace it was created in, whichever namespace its thread is in later, so the
  process makes each door's listening socket inside the region the door is in and
  each dialled socket inside the region it leads to (``setns`` around ``socket()``,
  then straight back). The forwarder holds every chunk ``delay_s`` (the pair's
  one-way delay) in each direction: this kernel has no ``sch_netem``. It runs apart
  from the bench's load and observers so their work does not delay its timers.
* ``cut NAME`` / ``heal NAME`` lines on its stdin black-hole (and release) every door
  into and out of region NAME, closing nothing: a partition as TCP sees it. It
  answers each line with ``ok``, and exits when stdin closes (its parent is gone).
* The bench itself reaches each region's skyroute directly, without delay, through
  sockets made in that namespace (``Namespaces.socket``), so what it observes is
  not delayed or cut by the line.

Needs root (``ip netns add``, ``setns``); ``Namespaces.available`` says whether it works.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skyroute.proxy.demo import Behaviour, StandinUpstream, TcpForwarder

SKYROUTE_PORT = 8080
STANDIN_PORT = 9000
UPSTREAM_KEY = "sk-regions-upstream"
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/var/run/netns")
#: Namespaces are called ``skyroute-<pid>-<region>``, so two runs never collide and a
#: run killed with SIGKILL leaves names whose pid is dead (removed by the next run).
_NAME = re.compile(r"^skyroute-(\d+)-\w+$")

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def _inside(path: Path) -> Iterator[None]:
    """Run the block with this thread in the namespace at ``path``, then return."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


class Namespaces:
    """One network namespace per region, loopback up; ``delete`` removes them all.

    Args:
        names: region -> namespace name; ``for_regions`` makes this run's names.
    """

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    @classmethod
    def for_regions(cls, regions: list[str]) -> Namespaces:
        return cls({r: f"skyroute-{os.getpid()}-{r}" for r in regions})

    @staticmethod
    def available() -> str | None:
        """None if namespaces can be made and entered here, else why not."""
        if os.geteuid() != 0:
            return "needs root (ip netns add, setns)"
        probe = Namespaces.for_regions(["probe"])
        try:
            probe.create()
            with probe.socket("probe"):
                pass
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot create a network namespace: {exc}"
        finally:
            probe.delete()
        return None

    def create(self) -> None:
        _remove_stale()
        for name in self.names.values():
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")

    def delete(self) -> None:
        """Remove every namespace this object made; missing ones are fine."""
        for name in self.names.values():
            if (NETNS_DIR / name).exists():
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    _ip("netns", "del", name)

    def socket(self, region: str, family: int = socket.AF_INET,
               type_: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        """A socket in ``region``'s namespace (its 127.0.0.1 is that region's)."""
        with _inside(NETNS_DIR / self.names[region]):
            return socket.socket(family, type_, proto)

    def command(self, region: str, *argv: str) -> list[str]:
        """``argv`` run inside ``region``'s namespace (``ip netns exec`` execs, same pid)."""
        return ["ip", "netns", "exec", self.names[region], *argv]


def _remove_stale() -> None:
    """Namespaces left by a bench run that died without cleaning up."""
    if not NETNS_DIR.is_dir():
        return
    for path in NETNS_DIR.iterdir():
        found = _NAME.match(path.name)
        if found and not Path(f"/proc/{found.group(1)}").exists():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                _ip("netns", "del", path.name)


# -- the delay line process ------------------------------------------------------


def pair_key(a: str, b: str) -> str:
    """The key of an unordered pair of regions in a delay table: ``"r1-r2"``."""
    return "-".join(sorted((a, b)))


async def _delay_line(names: dict[str, str], delays_ms: dict[str, float]) -> None:
    regions = sorted(names)
    ns = Namespaces(names)
    doors: dict[tuple[str, str], list[TcpForwarder]] = {}
    for i, here in enumerate(regions):
        for j, there in enumerate(regions):
            if i == j:
                continue
            for base in (SKYROUTE_PORT, STANDIN_PORT):
                listen = ns.socket(here)
                listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listen.bind(("127.0.0.1", base + j + 1))
                forwarder = TcpForwarder(
                    base, delay_s=delays_ms[pair_key(here, there)] / 1000, listen_sock=listen,
                    target_socket=lambda there=there: ns.socket(there))
                await forwarder.start()
                doors.setdefault((here, there), []).append(forwarder)
    print("ready", flush=True)
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := (await reader.readline()).decode().split():
            verb, region = line
            if verb not in ("cut", "heal"):
                print(f"unknown command {verb!r}: cut NAME or heal NAME", flush=True)
                continue
            for (a, b), forwarders in doors.items():
                for forwarder in forwarders if region in (a, b) else ():
                    if verb == "cut":
                        forwarder.black_hole()
                    else:
                        forwarder.heal()
            print("ok", flush=True)
    finally:
        for forwarders in doors.values():
            for forwarder in forwarders:
                await forwarder.aclose()


async def _standin(name: str, ttft_s: float) -> None:
    standin = StandinUpstream(name, models=("deepseek-chat",), api_key=UPSTREAM_KEY,
                              behaviour=Behaviour(ttft_s=ttft_s))
    await standin.start("127.0.0.1", STANDIN_PORT)
    print("ready", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await standin.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    line = commands.add_parser("delay-line")
    line.add_argument("--names", required=True, help="JSON: region -> namespace name")
    line.add_argument("--delays", required=True, help="JSON: 'r1-r2' -> one-way ms")
    standin = commands.add_parser("standin", help="run inside the region's namespace")
    standin.add_argument("--name", required=True)
    standin.add_argument("--ttft", type=float, default=0.005)
    args = parser.parse_args()
    if args.command == "delay-line":
        asyncio.run(_delay_line(json.loads(args.names), json.loads(args.delays)))
    else:
        asyncio.run(_standin(args.name, args.ttft))


if __name__ == "__main__":
    main()
