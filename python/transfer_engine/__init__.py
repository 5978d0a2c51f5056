"""transfer_engine: one-sided RDMA writes with immediates, from Python.

    import transfer_engine as te

    engine = te.Engine(provider="tcp")            # libfabric tcp on lo by default
    region = engine.register(numpy_array)         # zero-copy; refused if read-only or strided
    peer_bytes = region.descriptor()              # bytes: send them any way you like
    ...
    dst = engine.import_descriptor(peer_bytes)
    engine.write(region, dst, imm=7).wait()       # or: await engine.write_async(...)
    # on the peer:
    peer_engine.wait_imm(7, count, timeout=5.0)

Every call that waits releases the GIL; completions never run Python code on
an engine thread. A request returns a Handle: poll it (done()), block on it
(wait(timeout), interruptible by Ctrl-C) or await it (the *_async methods,
driven by an eventfd the running event loop watches). Errors raise
TransferError, whose `code` is a StatusCode.

The package is built for one interpreter (Debian's /usr/bin/python3 by
default); see python/README.md.
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, Optional, Tuple

from ._transfer_engine import (  # noqa: F401  (re-exported)
    Barrier,
    DispatchResult,
    EngineOptions,
    EpDispatcher,
    ExpertMap,
    ExpertTokens,
    Handle,
    ImmOnly,
    KvDecoder,
    KvInstanceInfo,
    KvLayout,
    KvPrefiller,
    KvRegistration,
    KvRegistry,
    MergedTokens,
    PagedWrite,
    Peer,
    Pending,
    Placement,
    Region,
    RegistryEntry,
    RemoteRegion,
    ScatterWrite,
    SharedHostMemory,
    SingleWrite,
    StatusCode,
    TransferError,
    WeightLayout,
    WeightModel,
    WeightPusher,
    WeightReceiver,
    _Engine,
    check_compatible,
    count_records,
    place_experts,
)



def _take_back_signals() -> None:
    # Importing the extension loads libfabric, whose psm provider library
    # replaces the SIGINT handler with one that exits the process (see
    # nic/fabric/provider_signals.h). Re-installing Python's own handler
    # brings KeyboardInterrupt back; faulthandler is re-armed likewise.
    import faulthandler
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGINT)
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
    if faulthandler.is_enabled():
        faulthandler.enable()


_take_back_signals()

__all__ = [
    "Barrier", "DispatchResult", "Engine", "EngineOptions", "EpDispatcher", "ExpertMap", "ExpertTokens", "Handle",
    "ImmOnly", "KvDecoder", "KvInstanceInfo", "KvLayout", "KvPrefiller", "KvRegistration", "KvRegistry",
    "MergedTokens", "PagedWrite", "Peer", "Pending", "Region", "RegistryEntry",
    "RemoteRegion", "ScatterWrite", "SharedHostMemory", "SingleWrite", "StatusCode", "TransferError",
    "WeightLayout", "WeightModel", "WeightPusher", "WeightReceiver", "check_compatible",
]


def _options(options: Optional[EngineOptions], kwargs: Dict[str, Any]) -> EngineOptions:
    opts = options if options is not None else EngineOptions()
    for name, value in kwargs.items():
        if name.startswith("_") or not hasattr(opts, name):
            raise TypeError(f"Engine() got an unknown option {name!r}; the options are EngineOptions' fields")
        setattr(opts, name, value)
    return opts


class Engine(_Engine):
    """The transfer engine. Keyword arguments are EngineOptions fields:

        Engine(provider="shm", domains=2, request_timeout=5.0, progress="thread")

    Use it as a context manager, or call close(), to shut it down at a point
    of your choosing (requests in flight then fail with CANCELLED).
    """

    def __init__(self, options: Optional[EngineOptions] = None, **kwargs: Any) -> None:
        super().__init__(_options(options, kwargs))
        self._futures: Dict[int, Tuple[asyncio.Future, Handle]] = {}
        self._recv_waiters: list = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.fileno())
        self._loop = None
        super().close()
        for fut, _ in self._futures.values():
            if not fut.done():
                fut.set_exception(TransferError("CANCELLED: the engine is closed"))
        self._futures.clear()

    # ---- asyncio

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self.fileno())
            loop.add_reader(self.fileno(), self._on_ready)
            self._loop = loop
        return loop

    def _on_ready(self) -> None:
        for hid in self._drain_watched():
            entry = self._futures.pop(hid, None)
            if entry is None:
                continue
            fut, handle = entry
            if fut.done():  # cancelled by the caller: the request itself ran on
                continue
            err = handle.exception()
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(handle)
        while self._recv_waiters:
            msg = self.try_recv()
            if msg is None:
                break
            fut = self._recv_waiters.pop(0)
            if fut.done():
                # The waiter was cancelled; hand the message to the next one.
                self._recv_waiters_requeue(msg)
                continue
            fut.set_result(msg)

    def _recv_waiters_requeue(self, msg: Tuple[bytes, bytes]) -> None:
        while self._recv_waiters:
            fut = self._recv_waiters.pop(0)
            if not fut.done():
                fut.set_result(msg)
                return
        self._stash = getattr(self, "_stash", [])
        self._stash.append(msg)

    def as_future(self, handle: Handle) -> "asyncio.Future[Handle]":
        """An asyncio future for `handle` on the running loop. Cancelling the
        future stops nothing and frees nothing: the request runs on, and its
        memory stays registered and alive until it finishes."""
        loop = self._attach()
        fut = loop.create_future()
        self._futures[handle.id] = (fut, handle)
        self._watch(handle)
        return fut

    async def wait_async(self, handle: Handle) -> Handle:
        """Awaits `handle`; raises TransferError if it failed."""
        return await self.as_future(handle)

    async def write_async(self, *args: Any, **kwargs: Any) -> Handle:
        return await self.as_future(self.write(*args, **kwargs))

    async def write_paged_async(self, *args: Any, **kwargs: Any) -> Handle:
        return await self.as_future(self.write_paged(*args, **kwargs))

    async def write_scatter_async(self, *args: Any, **kwargs: Any) -> Handle:
        return await self.as_future(self.write_scatter(*args, **kwargs))

    async def write_batch_async(self, *args: Any, **kwargs: Any) -> Handle:
        return await self.as_future(self.write_batch(*args, **kwargs))

    async def imm_only_async(self, dst: RemoteRegion, imm: int) -> Handle:
        return await self.as_future(self.imm_only(dst, imm))

    async def barrier_async(self, peers: list, imm: int) -> Handle:
        return await self.as_future(self.barrier(peers, imm))

    async def submit_async(self, request: Any) -> Handle:
        return await self.as_future(self.submit(request))

    async def send_async(self, peer: Peer, data: Any) -> Handle:
        return await self.as_future(self.send(peer, data))

    async def wait_imm_async(self, imm: int, count: int) -> None:
        """Awaits `count` arrivals of `imm` and consumes them. If the await is
        cancelled (e.g. by asyncio.wait_for), the expectation stays armed and
        consumes those arrivals when they come: use a fresh immediate value
        for a retry."""
        if self.try_consume_imm(imm, count):
            return
        await self.as_future(self.expect_imm(imm, count))

    async def recv_async(self) -> Tuple[bytes, bytes]:
        """The next control message as (sender address, data)."""
        stash = getattr(self, "_stash", None)
        if stash:
            return stash.pop(0)
        msg = self.try_recv()
        if msg is not None:
            return msg
        loop = self._attach()
        fut = loop.create_future()
        self._recv_waiters.append(fut)
        # A message may have arrived between try_recv and here: the reader
        # runs on the next readable eventfd, and fileno() is now armed.
        self._on_ready()
        return await fut

