"""The KV-cache plane from Python: layouts, the example end to end, cancel, registry."""

import os
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import transfer_engine as te

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_layout_presets_and_round_trips():
    l = te.KvLayout.preset("llama70b", pages=128, tp=2, order="HND")
    assert (l.layers, l.kv_heads, l.head_dim, l.tp, l.pages, l.order) == (80, 8, 128, 2, 128, "HND")
    assert l.local_heads == 4 and l.tensors == 2
    assert l.region_bytes == l.layers * 2 * l.pages * l.page_bytes
    assert te.KvLayout.parse(l.serialize()).describe() == l.describe()
    assert pickle.loads(pickle.dumps(l)).describe() == l.describe()
    mla = te.KvLayout.preset("deepseek", pages=16)
    assert mla.mla and mla.tensors == 1
    with pytest.raises(te.TransferError, match="(?i)preset|unknown|valid"):
        te.KvLayout.preset("gpt-17", pages=1)
    with pytest.raises(te.TransferError):
        te.KvLayout(layers=4, page_tokens=16, kv_heads=6, head_dim=64, tp=4, pages=8)  # 6 heads over 4 ranks
    with pytest.raises(te.TransferError, match="outside"):
        l.offset(80, 0, 0, 0, 0)
    with pytest.raises(te.TransferError):
        te.check_compatible(l, mla)


@pytest.mark.parametrize("provider", ["tcp", "shm"])
def test_the_example_end_to_end(provider):
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "kv_disaggregation.py"), f"--provider={provider}",
         "--requests=3"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("verified (0 bad heads") == 3, out.stdout
    assert "all requests verified byte for byte" in out.stdout


def small_layout():
    return te.KvLayout(layers=2, page_tokens=16, kv_heads=4, head_dim=32, pages=16)


def test_a_cancelled_request_fails_with_cancelled_and_frees_its_pages():
    layout = small_layout()
    with te.Engine() as p_engine, te.Engine() as d_engine:
        p_mem = np.zeros(te.KvPrefiller.memory_bytes(layout), dtype=np.uint8)
        d_mem = np.zeros(te.KvDecoder.memory_bytes(layout), dtype=np.uint8)
        prefiller = te.KvPrefiller(p_engine, layout, 0, p_mem)
        decoder = te.KvDecoder(d_engine, layout, 0, d_mem)
        info = te.KvInstanceInfo("prefill", "p", layout, [p_engine.address()])
        info = pickle.loads(pickle.dumps(info))
        h = decoder.receive(7, info, [1, 2, 3])
        # The prefill engine hears of the pull before it started the request.
        deadline = time.monotonic() + 60
        pulls = []
        while not pulls and time.monotonic() < deadline:
            pulls = prefiller.poll_pulls()
            time.sleep(0.01)
        assert pulls == [(7, 3)]
        prefiller.start(7, [4, 5, 6])
        prefiller.layer_done(7, 0)  # one layer out of two, then the decoder gives up
        decoder.cancel(7)
        with pytest.raises(te.TransferError) as e:
            h.wait(60.0)
        assert e.value.code == te.StatusCode.CANCELLED
        assert decoder.active_requests() == 0
        assert decoder.stats()["requests_cancelled"] == 1
        # The prefill side learns that the request is over (its pages may be reused).
        err = prefiller.wait_sent(7, timeout=60.0)
        assert err is not None
        with pytest.raises(te.TransferError) as e:
            prefiller.layer_done(7, 1)
        assert e.value.code == te.StatusCode.NOT_FOUND
        # While a plane holds the engine, closing the engine is refused.
        with pytest.raises(te.TransferError, match="prefiller or decoder"):
            p_engine.close()
        prefiller.close()
        decoder.close()


def test_bad_cache_memory_is_refused():
    layout = small_layout()
    with te.Engine() as engine:
        with pytest.raises(te.TransferError, match="memory_bytes"):
            te.KvDecoder(engine, layout, 0, np.zeros(16, dtype=np.uint8))
        ro = np.zeros(te.KvDecoder.memory_bytes(layout), dtype=np.uint8)
        ro.flags.writeable = False
        with pytest.raises(te.TransferError, match="read-only"):
            te.KvDecoder(engine, layout, 0, ro)


@pytest.fixture
def redis_socket(tmp_path):
    server = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if server is None:
        pytest.skip("redis-server is not installed (scripts/install-deps.sh installs it)")
    sock = str(tmp_path / "redis.sock")
    proc = subprocess.Popen([server, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
        time.sleep(0.02)
    yield "unix:" + sock
    proc.kill()
    proc.wait(30)


def test_the_registry(redis_socket):
    layout = small_layout()
    registry = te.KvRegistry.connect(redis_socket, prefix="pytest")
    with te.Engine() as engine:
        info = te.KvInstanceInfo("decode", "d0", layout, [engine.address()])
        registry.put(te.RegistryEntry(info, capacity=8, load=1), ttl=5.0)
        (entry,) = registry.list("decode")
        assert (entry.info.name, entry.capacity, entry.load, entry.draining) == ("d0", 8, 1, False)
        assert entry.info.ranks == [engine.address()]
        registry.remove("decode", "d0")
        assert registry.list("decode") == []

        reg = te.KvRegistration(registry, te.RegistryEntry(te.KvInstanceInfo("prefill", "p0", layout,
                                                                             [engine.address()]), 4), ttl=3.0)
        reg.set_load(2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            entries = registry.list("prefill")
            if entries and entries[0].load == 2:
                break
            time.sleep(0.05)
        assert registry.list("prefill")[0].load == 2
        reg.set_load(0)
        reg.leave(drain_timeout=10.0)
        assert registry.list("prefill") == []
