"""Two processes writing through every request kind, bytes verified on the target."""

import pickle

import numpy as np
import pytest

import transfer_engine as te
from conftest import pattern
from peers import SIZE, serve


def ask(peer, *cmd):
    peer.send(cmd)
    reply = peer.recv()
    assert reply[0] == "ok", reply
    return reply


def test_every_request_kind(provider, child):
    peer = child(serve, provider)
    info = peer.recv()
    with te.Engine(provider=provider, request_timeout=10.0) as engine:
        src = pattern(SIZE, seed=1)
        region = engine.register(src)
        # Descriptors are bytes and survive any side channel.
        d1 = engine.import_descriptor(pickle.loads(pickle.dumps(info["d1"])))
        d2 = engine.import_descriptor(info["d2"])
        want1 = np.zeros(SIZE, dtype=np.uint8)
        want2 = np.zeros(SIZE, dtype=np.uint8)

        def run(handle, request_or_count, imm):
            handle.wait(30.0)
            count = request_or_count if isinstance(request_or_count, int) else \
                engine.expected_imm_count(request_or_count)
            ask(peer, "wait_imm", imm, count)

        # write: 64 KiB at offset 0.
        run(engine.write(region, d1, 65536, imm=1), te.SingleWrite(region, d1, 65536, imm=1), 1)
        want1[:65536] = src[:65536]

        # write_paged: pages by index, numpy arrays.
        sp, dp = np.array([5, 3, 7], dtype=np.uint32), np.array([20, 21, 30], dtype=np.uint32)
        run(engine.write_paged(region, sp, d1, dp, 4096, imm=2), 3, 2)
        for s, d in zip(sp, dp):
            want1[d * 4096:(d + 1) * 4096] = src[s * 4096:(s + 1) * 4096]

        # write_scatter: one source, two regions.
        targets = [(d1, 100_000, 200_000, 4000), (d2, 104_000, 0, 5000)]
        run(engine.write_scatter(region, targets, imm=3), te.ScatterWrite(region, targets, imm=3), 3)
        want1[200_000:204_000] = src[100_000:104_000]
        want2[0:5000] = src[104_000:109_000]

        # write_batch: 16 writes in one call.
        so = np.arange(16, dtype=np.uint64) * 1024 + 300_000
        do = np.arange(16, dtype=np.uint64) * 2048 + 65536
        ln = np.full(16, 1024, dtype=np.uint64)
        per = engine.expected_imm_count(te.SingleWrite(region, d2, 1024, imm=4))
        run(engine.write_batch(region, d2, so, do, ln, imm=4), 16 * per, 4)
        for s, d in zip(so.tolist(), do.tolist()):
            want2[d:d + 1024] = src[s:s + 1024]

        # The request objects through submit().
        req = te.PagedWrite(region, [1, 2], d2, [100, 101], 512, src_stride=4096, dst_stride=1024, imm=5)
        run(engine.submit(req), req, 5)
        want2[100 * 1024:100 * 1024 + 512] = src[4096:4096 + 512]
        want2[101 * 1024:101 * 1024 + 512] = src[8192:8192 + 512]

        # Notifications.
        run(engine.imm_only(d1, 6), te.ImmOnly(d1, 6), 6)
        run(engine.barrier([d1, d2], 7), te.Barrier([d1, d2], 7), 7)

        _, got1, got2 = ask(peer, "dump")
        assert np.array_equal(np.frombuffer(got1, dtype=np.uint8), want1)
        assert np.array_equal(np.frombuffer(got2, dtype=np.uint8), want2)
        assert engine.stats()["requests_failed"] == 0
        ask(peer, "exit")


def test_send_and_receive(provider, child):
    peer = child(serve, provider)
    info = peer.recv()
    with te.Engine(provider=provider) as engine:
        p = engine.add_peer(info["address"])
        peer.send(("echo",))
        engine.send(p, b"ping" * 100).wait(30.0)
        assert peer.recv() == ("ok", b"ping" * 100)
        sender, data = engine.recv(timeout=30.0)
        assert data == b"echo:" + b"ping" * 100
        assert sender == info["address"]
        with pytest.raises(te.TransferError, match="max_message_bytes"):
            engine.send(p, bytes(engine.max_message_bytes + 1))
        ask(peer, "exit")


def test_out_of_bounds_writes_are_refused_before_posting(provider, child):
    peer = child(serve, provider)
    info = peer.recv()
    with te.Engine(provider=provider) as engine:
        region = engine.register(np.zeros(SIZE, dtype=np.uint8))
        d1 = engine.import_descriptor(info["d1"])
        with pytest.raises(te.TransferError) as e:
            engine.write(region, d1, 4096, dst_offset=SIZE - 100)
        assert e.value.code == te.StatusCode.OUT_OF_RANGE
        with pytest.raises(te.TransferError, match="src_pages holds negative"):
            engine.write_paged(region, [-1], d1, [0], 64)
        with pytest.raises(te.TransferError, match="above the largest"):
            engine.write_paged(region, [1 << 40], d1, [0], 64)
        with pytest.raises(te.TransferError, match="write_batch entry 1"):
            engine.write_batch(region, d1, [0, 0], [0, SIZE], [16, 16])
        assert engine.stats()["requests_submitted"] == 0
        ask(peer, "exit")
