#!/usr/bin/env python3
"""MoE dispatch and combine across processes, the way an inference engine's
expert-parallel layer drives it: each rank routes its tokens, dispatch
brings every expert its tokens, the rank runs its experts, combine returns
the weighted sums. Every rank checks its combined output against a numpy
computation of the same layer (all ranks' inputs come from one seed).
With --placement=fitted the experts are placed by te.place_experts on the
routing of every rank and layer (what a serving loop would have recorded),
with a replica slot per rank, and the records dispatch sends are counted
against round-robin.

    /usr/bin/python3 examples/moe_ep.py [--ranks=4] [--mode=normal|ll|hierarchical] [--provider=shm]
                                        [--placement=contiguous|fitted]
"""

import argparse
import multiprocessing as mp
import sys
import time

import numpy as np

import transfer_engine as te

EXPERTS, TOPK, HIDDEN, TOKENS = 32, 4, 256, 64


def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(f):  # round to nearest even
    b = np.ascontiguousarray(f, dtype=np.float32).view(np.uint32)
    return ((b + np.uint32(0x7FFF) + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def layer_inputs(rank, layer):
    """A rank's tokens (bf16 bits), router choice and weights at a layer."""
    rng = np.random.default_rng(1000 * layer + rank)
    x = f32_to_bf16(rng.standard_normal((TOKENS, HIDDEN)))
    logits = rng.standard_normal((TOKENS, EXPERTS))
    idx = np.argsort(-logits, axis=1)[:, :TOPK]          # top-k experts, best first
    top = np.take_along_axis(logits, idx, axis=1)
    w = np.exp(top) / np.exp(top).sum(axis=1, keepdims=True)
    return x, idx.astype(np.int32), w.astype(np.float32)


def recorded_routing(ranks, layers):
    """Every rank's routing as one [tokens, layers, topk] array; token i of
    rank r is token i * ranks + r, so that its home is rank t % ranks as the
    record count assumes."""
    routing = np.empty((TOKENS * ranks, layers, TOPK), np.int64)
    for r in range(ranks):
        for layer in range(layers):
            routing[r::ranks, layer] = layer_inputs(r, layer)[1]
    return routing


def fitted_placement(ranks, layers, nodes):
    """The placement fitted to every rank's routing; every rank computes the same one."""
    return te.place_experts(recorded_routing(ranks, layers), EXPERTS, ranks, nodes=nodes, extra_slots=1)


def run_expert(e, tokens):
    """Expert e: a scaling, in float, rounded to bf16."""
    return f32_to_bf16(bf16_to_f32(tokens) * np.float32(1 + e / 64))


def expected(rank, layer, ranks, emap, nodes):
    """This rank's combined output, from the definition: per rank holding a
    token's experts, sum weight x output in top-k order (bf16); then sum
    those partials in rank order (bf16). Hierarchical (nodes > 1): first per
    node in rank order (bf16), then the node partials in node order."""
    x, idx, w = layer_inputs(rank, layer)
    out = np.zeros((TOKENS, HIDDEN), np.uint16)
    for t in range(TOKENS):
        partials = {}
        row = [int(v) for v in idx[t]]  # a replicated expert's copy may depend on the whole row
        for k in range(TOPK):
            e = int(idx[t, k])
            acc = partials.setdefault(emap.rank_for(e, rank, row), np.zeros(HIDDEN, np.float32))
            acc += np.float32(w[t, k]) * bf16_to_f32(run_expert(e, x[t]))
        per_node = {}
        for r in sorted(partials):
            node = per_node.setdefault(r // (ranks // nodes), np.zeros(HIDDEN, np.float32))
            node += bf16_to_f32(f32_to_bf16(partials[r]))
        total = np.zeros(HIDDEN, np.float32)
        for n in sorted(per_node):
            total += bf16_to_f32(f32_to_bf16(per_node[n])) if nodes > 1 else per_node[n]
        out[t] = f32_to_bf16(total)
    return out


def rank_main(conn, rank, ranks, mode, provider, layers, placement):
    with te.Engine(provider=provider) as engine:
        nodes = 2 if mode == "hierarchical" else 1
        d = te.EpDispatcher(engine, ranks=ranks, rank=rank, experts=EXPERTS, topk=TOPK, hidden=HIDDEN,
                            max_tokens=TOKENS, mode=mode, nodes=nodes)
        conn.send(d.local_info())      # all-gathered by the parent; any channel will do
        d.connect(conn.recv())
        if placement == "fitted":
            plan = fitted_placement(ranks, layers, nodes)
            maps = [plan.expert_map(layer, nodes) for layer in range(layers)]
        else:
            maps = [te.ExpertMap.contiguous(EXPERTS, ranks)] * layers
        ok, seconds = True, []
        for layer in range(layers):
            emap = maps[layer]
            x, idx, w = layer_inputs(rank, layer)
            start = time.perf_counter()
            if mode == "ll":  # split calls: posted, then received when the result is needed
                pending = d.send_dispatch(x, idx, w, emap)
                res = pending.recv()
                y = d.send_combine([run_expert(e.expert, e.tokens) for e in res.experts], res).recv()
            else:
                res = d.dispatch(x, idx, w, emap)
                outputs = [run_expert(e.expert, e.tokens) for e in res.experts]
                y = d.combine(outputs, res)
            seconds.append(time.perf_counter() - start)
            ok &= bool(np.array_equal(y, expected(rank, layer, ranks, emap, nodes)))
        d.close()
        conn.send((ok, float(np.median(seconds))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--mode", default="normal", choices=["normal", "ll", "hierarchical"])
    ap.add_argument("--provider", default="tcp")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--placement", default="contiguous", choices=["contiguous", "fitted"])
    args = ap.parse_args()
    if args.ranks < 2 or EXPERTS % args.ranks or (args.mode == "hierarchical" and args.ranks % 2):
        ap.error(f"--ranks must divide {EXPERTS} (and be even for hierarchical)")
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    for r in range(args.ranks):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=rank_main, args=(child, r, args.ranks, args.mode, args.provider, args.layers,
                                                         args.placement),
                        daemon=True)
        p.start()
        conns.append(parent), procs.append(p)
    try:
        infos = [c.recv() if c.poll(60) else sys.exit("a rank did not start") for c in conns]
        for c in conns:
            c.send(infos)
        results = [c.recv() if c.poll(120) else (False, 0.0) for c in conns]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    for r, (ok, s) in enumerate(results):
        print(f"rank {r}: {'ok' if ok else 'MISMATCH'}, dispatch + experts + combine {s * 1e3:.2f} ms (median)")
    if args.placement == "fitted":
        nodes = 2 if args.mode == "hierarchical" else 1
        routing = recorded_routing(args.ranks, args.layers)
        plan = fitted_placement(args.ranks, args.layers, nodes)
        fitted = te.count_records(routing, plan, nodes=nodes)
        round_robin = te.count_records(routing, te.Placement.round_robin(args.layers, EXPERTS, args.ranks), nodes=nodes)
        print(f"records dispatch sent to other ranks: fitted {fitted['rank']}, round-robin {round_robin['rank']} "
              f"(on the routing it was fitted to; this example's routing is random, so little of that "
              f"would hold on new tokens); {plan}")
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
