"""A TCP forwarder that delays or black-holes its traffic: a WAN on one machine.

``delay_s`` holds every chunk that long before passing it on, in order (a one-way
delay line; netem is not available everywhere).

``black_hole()`` stops moving bytes in both directions on every connection, open
or new, without closing anything: no FIN, no RST, exactly what a partition looks
like to TCP (the sender's kernel buffers, the receiver waits). ``heal()`` moves
the held bytes on in order, as TCP's retransmission would after a real cut.
Used by the state-sync tests and ``bench/fleet.py``; 127.0.0.1 only.

``listen_sock`` and ``target_socket`` let it listen and dial through sockets the
caller made, say in two different network namespaces (``bench/regions.py`` joins
namespaces with it, every end on a namespace's own 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Final, final

CHUNK: Final = 65536


@final
class TcpForwarder:
    """Listens on 127.0.0.1 (port 0) and forwards every connection to ``target_port``.

    Args:
        target_port: where each connection is forwarded to, on ``host``.
        host: the address listened on and dialled.
        delay_s: one-way delay, each direction.
        listen_sock: a bound socket to listen on instead of ``host`` port 0.
        target_socket: makes the (unconnected) socket each target connection is
            dialled from, instead of a default one.
    """

    def __init__(self, target_port: int, *, host: str = "127.0.0.1", delay_s: float = 0.0,
                 listen_sock: socket.socket | None = None,
                 target_socket: Callable[[], socket.socket] | None = None) -> None:
        self._target = (host, target_port)
        self.delay_s = delay_s
        self._host = host
        self._listen_sock = listen_sock
        self._target_socket = target_socket
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def __repr__(self) -> str:
        state = "flowing" if self._flowing.is_set() else "black-holed"
        return f"<TcpForwarder :{self.port} -> :{self._target[1]} {state}>"

    async def start(self) -> None:
        """Start listening; ``port`` is set afterwards."""
        if self._listen_sock is not None:
            self._server = await asyncio.start_server(self._accept, sock=self._listen_sock)
        else:
            self._server = await asyncio.start_server(self._accept, self._host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def black_hole(self) -> None:
        """Hold every byte from now on, in both directions, closing nothing."""
        self._flowing.clear()

    def heal(self) -> None:
        """Move held and new bytes on again."""
        self._flowing.set()

    async def aclose(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        opened = [writer]
        try:
            await self._flowing.wait()  # a connection made during a cut is held too
            async with asyncio.timeout(5.0):
                up_reader, up_writer = await self._dial()
            opened.append(up_writer)
            self._writers.add(up_writer)
            await asyncio.gather(self._copy(reader, up_writer), self._copy(up_reader, writer))
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass  # the top of a connection's task: ``aclose`` cancels it, nobody awaits it
        finally:
            self._tasks.discard(task)
            for each in opened:
                each.close()
                self._writers.discard(each)

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._target_socket is None:
            return await asyncio.open_connection(*self._target)
        sock = self._target_socket()
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, self._target)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        pusher = asyncio.create_task(self._push(line, writer))
        try:
            with contextlib.suppress(OSError):
                while data := await reader.read(CHUNK):
                    await self._flowing.wait()
                    line.put_nowait((loop.time() + self.delay_s, data))
            line.put_nowait(None)  # end of stream: pass the EOF on after the held bytes
            await pusher
        finally:
            pusher.cancel()

    async def _push(
        self, line: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while (item := await line.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - loop.time()))
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()
