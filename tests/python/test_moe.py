"""MoE dispatch/combine from Python: EP ranks as threads of this process (the
calls release the GIL), every mode checked bit for bit against a numpy
reference written from the definitions in moe/dispatch_types.h."""

import concurrent.futures as cf
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import transfer_engine as te
from conftest import DEADLINE

EXPERTS, TOPK, HIDDEN, TOKENS = 8, 3, 64, 24
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(f):  # round to nearest even, as moe/numeric_formats.h
    b = np.ascontiguousarray(f, dtype=np.float32).view(np.uint32)
    return ((b + np.uint32(0x7FFF) + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def inputs(ranks, seed=3, topk=TOPK):
    """Every rank's tokens (bf16 bits), routing (some slots -1) and weights."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(ranks):
        x = f32_to_bf16(rng.uniform(-4, 4, (TOKENS, HIDDEN)))
        idx = np.stack([rng.permutation(EXPERTS)[:topk] for _ in range(TOKENS)]).astype(np.int64)
        idx[rng.random((TOKENS, topk)) < 0.15] = -1
        w = (rng.integers(1, 64, (TOKENS, topk)) / 64.0).astype(np.float32)
        out.append((x, idx, w))
    return out


def expert(x):
    """The synthetic expert: its output for a token row, bf16 bits."""
    return f32_to_bf16(bf16_to_f32(x) * np.float32(0.5) + np.float32(0.25))


def reference(batches, emap, ranks):
    """Per rank: {expert: (rows, weights, src_rank, src_token)}, and each
    source's combined output: rank partials (top-k order, float from 0, bf16)
    summed in rank order (float from 0, bf16)."""
    dispatched = [{e: ([], [], [], []) for e in emap.local_experts(r)} for r in range(ranks)]
    combined = []
    for s, (x, idx, w) in enumerate(batches):
        out = np.zeros((TOKENS, HIDDEN), np.uint16)
        for t in range(TOKENS):
            partials = {}
            for k in range(idx.shape[1]):
                e = int(idx[t, k])
                if e < 0:
                    continue
                r = emap.rank_for(e, s, idx[t].tolist())  # the row decides under token splits
                rows, ws, srcs, toks = dispatched[r][e]
                rows.append(x[t]), ws.append(w[t, k]), srcs.append(s), toks.append(t)
                acc = partials.setdefault(r, np.zeros(HIDDEN, np.float32))
                acc += np.float32(w[t, k]) * bf16_to_f32(expert(x[t]))
            total = np.zeros(HIDDEN, np.float32)
            for r in sorted(partials):
                total += bf16_to_f32(f32_to_bf16(partials[r]))
            out[t] = f32_to_bf16(total)
        combined.append(out)
    return dispatched, combined


def run_group(provider, ranks, mode, body, topk=TOPK, **kw):
    engines = [te.Engine(provider=provider, request_timeout=10.0) for _ in range(ranks)]
    ds = [te.EpDispatcher(e, ranks=ranks, rank=r, experts=EXPERTS, topk=topk, hidden=HIDDEN,
                          max_tokens=ranks * TOKENS, mode=mode, timeout=20.0, **kw)
          for r, e in enumerate(engines)]
    try:
        infos = [d.local_info() for d in ds]
        for d in ds:
            d.connect(infos)
        with cf.ThreadPoolExecutor(ranks) as pool:
            futures = [pool.submit(body, d) for d in ds]
            return [f.result(timeout=DEADLINE) for f in futures]
    finally:
        for d in ds:
            d.close()
        for e in engines:
            e.close()


def split_map(ranks):
    """Experts 0 and 5 on both ranks; each source sends part of its tokens
    of them to the other copy (token splits, shares of 65536 keys)."""
    ranks_of = [[e * ranks // EXPERTS] for e in range(EXPERTS)]
    ranks_of[0], ranks_of[5] = [0, 1], [1, 0]
    splits = [(0, 0, 1, 30000), (0, 1, 0, 20000), (5, 0, 0, 40000), (5, 1, 1, 10000), (5, 1, 0, 25000)]
    return te.ExpertMap.with_replicas(ranks_of, ranks, 1, splits)


def test_token_splits_choose_copies_by_row():
    emap = split_map(2)
    rows = [[e, (e + 1) % EXPERTS, -1] for e in range(EXPERTS)] + [[0, 3, 5], [5, 0, 2]]
    for row in rows:
        key = te.ExpertMap.token_key(row)
        assert 0 <= key < 65536 and key == te.ExpertMap.token_key(list(row))
    # Source 0's tokens of expert 0: keys below 30000 to rank 1, the rest to
    # the rule's choice (its own copy).
    seen = set()
    for t in range(2000):
        row = [0, 1 + t % 7, -1 if t % 3 else 2 + t % 5]
        key = te.ExpertMap.token_key(row)
        want = 1 if key < 30000 else emap.rank_for(0, 0)
        assert emap.rank_for(0, 0, row) == want
        seen.add(want)
    assert seen == {0, 1}
    with pytest.raises(te.TransferError, match="share 70000 outside"):
        te.ExpertMap.with_replicas([[0, 1]] + [[1]] * 7, 2, 1, [(0, 0, 1, 70000)])


@pytest.mark.parametrize("mode", ["normal", "ll", "hierarchical"])
@pytest.mark.parametrize("layout", ["contiguous", "splits"])
def test_dispatch_and_combine_match_the_reference(provider, mode, layout):
    ranks = 2
    emap = te.ExpertMap.contiguous(EXPERTS, ranks) if layout == "contiguous" else split_map(ranks)
    batches = inputs(ranks)
    want_dispatch, want_combine = reference(batches, emap, ranks)

    def rank(d):
        x, idx, w = batches[d.rank]
        res = d.dispatch(x, idx, w, emap)
        assert res.tokens == TOKENS
        outputs = []
        for got in res.experts:
            rows, ws, srcs, toks = want_dispatch[d.rank][got.expert]
            assert got.count == len(rows)
            assert got.tokens.dtype == np.uint16 and got.tokens.shape == (got.count, HIDDEN)
            if mode != "hierarchical":  # hierarchical names sources by relay (1 rank per node: the source)
                np.testing.assert_array_equal(got.src_rank, srcs)
                np.testing.assert_array_equal(got.src_token, toks)
            np.testing.assert_array_equal(got.tokens, np.array(rows).reshape(-1, HIDDEN))
            np.testing.assert_array_equal(got.weights, np.array(ws, np.float32))
            outputs.append(expert(got.tokens))
        return d.combine(outputs, res)

    results = run_group(provider, ranks, mode, rank, nodes=2 if mode == "hierarchical" else 1)
    for r in range(ranks):
        assert results[r].dtype == np.uint16 and results[r].shape == (TOKENS, HIDDEN)
        np.testing.assert_array_equal(results[r], want_combine[r])


# The low-latency mode's split: send, compute, receive; the same reference.
# Every rank posts its dispatch before any receives it (a barrier between),
# so a receive cannot be what moves the sender's records.
def test_low_latency_send_and_recv_split(provider):
    ranks = 2
    emap = split_map(ranks)
    batches = inputs(ranks, seed=9)
    want_dispatch, want_combine = reference(batches, emap, ranks)
    posted = threading.Barrier(ranks, timeout=DEADLINE)

    def rank(d):
        x, idx, w = batches[d.rank]
        pending = d.send_dispatch(x.copy(), idx, w, emap)
        posted.wait()
        res = pending.recv()
        assert pending.recv() is res  # once; then the same result
        outputs = []
        for got in res.experts:
            rows, ws, srcs, toks = want_dispatch[d.rank][got.expert]
            np.testing.assert_array_equal(got.tokens, np.array(rows).reshape(-1, HIDDEN))
            np.testing.assert_array_equal(got.src_token, toks)
            outputs.append(expert(got.tokens))
        back = d.send_combine(outputs, res)
        del outputs  # summed before send_combine returned
        posted.wait()
        out = back.recv()
        # A second layer through the method pair, in the other parity's slots.
        d.send_dispatch(x, idx, w, emap)
        again = d.recv_dispatch()
        d.send_combine([expert(t.tokens) for t in again.experts], again)
        return out, d.recv_combine()

    for r, (first, second) in enumerate(run_group(provider, ranks, "ll", rank)):
        np.testing.assert_array_equal(first, want_combine[r])
        np.testing.assert_array_equal(second, want_combine[r])


# topk=1: the token's one expert runs where it merges, and combine is local
# (no merge step); the results are the same reference's.
@pytest.mark.parametrize("topk", [TOPK, 1])
def test_coherent_combine_merges_on_the_top1_rank(provider, topk):
    ranks = 2
    emap = te.ExpertMap.contiguous(EXPERTS, ranks)
    batches = inputs(ranks, seed=5, topk=topk)
    _, want_combine = reference(batches, emap, ranks)

    def rank(d):
        x, idx, w = batches[d.rank]
        ids = np.arange(TOKENS, dtype=np.uint32) + 1000 * d.rank
        res = d.dispatch(x, idx, w, emap, ids=ids)
        for got in res.experts:  # sources named by id
            assert np.all(got.src_token // 1000 == got.src_rank)
        return d.combine([expert(e.tokens) for e in res.experts], res)

    merged = run_group(provider, ranks, "coherent", rank, topk=topk)
    seen = 0
    for m_rank, m in enumerate(merged):
        assert m.data.shape == (len(m.ids), HIDDEN)
        for k in range(len(m.ids)):
            src, t = int(m.from_rank[k]), int(m.ids[k]) % 1000
            assert int(m.ids[k]) // 1000 == src
            top = int(batches[src][1][t, 0])
            row = batches[src][1][t].tolist()
            assert m_rank == (emap.rank_for(top, src, row) if top >= 0 else src)  # the top-1 expert's rank
            np.testing.assert_array_equal(m.data[k], want_combine[src][t])
            seen += 1
    assert seen == ranks * TOKENS  # every token merged exactly once


def test_bad_calls_raise():
    e = te.Engine(provider="tcp")
    d = te.EpDispatcher(e, ranks=1, rank=0, experts=4, topk=2, hidden=HIDDEN, max_tokens=8)
    emap = te.ExpertMap.contiguous(4, 1)
    d.connect([d.local_info()])
    x = np.zeros((4, HIDDEN), np.uint16)
    idx = np.zeros((4, 2), np.int32)
    w = np.ones((4, 2), np.float32)
    with pytest.raises(te.TransferError, match="topk_idx must be"):
        d.dispatch(x, np.zeros((4, 3), np.int32), w, emap)
    with pytest.raises(te.TransferError, match="bytes"):
        d.dispatch(x[:3], idx, w, emap)
    with pytest.raises(te.TransferError, match="names expert 0 twice"):
        d.dispatch(x, idx, w, emap)
    with pytest.raises(te.TransferError, match="close"):
        e.close()  # the dispatcher still uses it
    res = d.dispatch(x, np.array([[0, 1], [2, -1], [3, 0], [-1, -1]], np.int32), w, emap)
    with pytest.raises(te.TransferError, match="outputs"):
        d.combine([], res)
    out = d.combine([expert(t.tokens) for t in res.experts], res)
    assert out.shape == (4, HIDDEN) and not out[3].any()  # no expert: zeros
    with pytest.raises(te.TransferError, match="mode"):
        te.EpDispatcher(e, ranks=1, rank=0, experts=4, topk=2, hidden=HIDDEN, max_tokens=8, mode="fast")
    with pytest.raises(te.TransferError, match="low-latency mode"):
        d.send_dispatch(x, idx, w, emap)
    ll = te.EpDispatcher(e, ranks=1, rank=0, experts=4, topk=2, hidden=HIDDEN, max_tokens=8, mode="ll")
    ll.connect([ll.local_info()])
    with pytest.raises(te.TransferError, match="out of order"):
        ll.recv_dispatch()
    ll.close()
    d.close()
    with pytest.raises(te.TransferError, match="closed") as err:
        d.dispatch(x, idx, w, emap)
    assert err.value.code == te.StatusCode.CANCELLED
    e.close()  # the dispatcher let go of it


@pytest.mark.parametrize("ranks,mode", [(2, "ll"), (4, "hierarchical")])
def test_the_example_across_processes(ranks, mode):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "moe_ep.py"), f"--ranks={ranks}", f"--mode={mode}",
         "--layers=2"], env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(": ok,") == ranks, out.stdout
