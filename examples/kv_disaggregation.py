#!/usr/bin/env python3
"""Disaggregated prefill/decode over transfer_engine, the way vLLM's and
SGLang's disaggregation connectors drive a transfer engine.

Three roles, as in a real deployment:
  router   (this process)  schedules requests, like vLLM's proxy / SGLang's
                           bootstrap server: it tells the prefill and the
                           decode instance about each request;
  prefill  (a process)     owns a paged KV cache; as the model "computes"
                           each layer it calls layer_done(), and the layer's
                           pages stream to the decode rank that asked;
  decode   (a process)     allocates pages for the request and pulls them:
                           KvDecoder.receive() sends a PULL and its handle
                           finishes when every layer and the context landed.

Metadata (the prefill instance's KvInstanceInfo: layout + engine addresses)
is exchanged as bytes over the side channel the framework already has
(here a multiprocessing pipe; in vLLM, ZMQ; in SGLang, HTTP). The decode
side then checks every byte of every page it received against what the
prefill side wrote, element by element through both layouts (which may
differ in memory order: NHD on prefill, HND on decode with --decode_order).

    /usr/bin/python3 examples/kv_disaggregation.py --provider=tcp --requests=8
"""

import argparse
import multiprocessing as mp
import sys
import time

import numpy as np

import transfer_engine as te

# The context travels in a fixed-size slot (KvDecoder hands back the whole
# slot), so it is sized like what it stands for: the last hidden state.
CONTEXT_BYTES = 256


def context_of(request: int) -> bytes:
    return np.random.default_rng(request + 1_000_003).integers(0, 256, CONTEXT_BYTES, dtype=np.uint8).tobytes()


def make_layout(order: str, pages: int) -> te.KvLayout:
    # A small GQA model: 4 layers, 8 KV heads of 64 bf16 elements, 16-token pages.
    return te.KvLayout(layers=4, page_tokens=16, kv_heads=8, head_dim=64, dtype_bytes=2, order=order, pages=pages)


def cache_value(request: int, layer: int, tensor: int, token: int, head: int, n: int) -> np.ndarray:
    """What the "model" computes for one head of one token: deterministic bytes."""
    seed = (((request * 131 + layer) * 7 + tensor) * 4099 + token) * 257 + head
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def heads(layout: te.KvLayout, request: int, layers, pages: list):
    """(byte range, expected bytes) of every head of every token of `pages`
    in `layers`, through the layout's own offsets (so NHD and HND agree)."""
    hb = layout.head_dim * layout.dtype_bytes
    for layer in layers:
        for tensor in range(layout.tensors):
            for i, page in enumerate(pages):
                for t in range(layout.page_tokens):
                    token = i * layout.page_tokens + t
                    for h in range(layout.local_heads):
                        off = layout.offset(layer, tensor, page, t, h)
                        yield slice(off, off + hb), cache_value(request, layer, tensor, token, h, hb)


def fill(cache: np.ndarray, layout: te.KvLayout, request: int, layer: int, pages: list) -> None:
    for where, value in heads(layout, request, [layer], pages):
        cache[where] = value


def check(cache: np.ndarray, layout: te.KvLayout, request: int, pages: list) -> int:
    """Mismatched heads in the request's pages (0 when every byte is right)."""
    return sum(not np.array_equal(cache[where], value)
               for where, value in heads(layout, request, range(layout.layers), pages))


def prefill_main(conn, provider: str, pages: int) -> None:
    engine = te.Engine(provider=provider)
    layout = make_layout("NHD", pages)
    memory = np.zeros(te.KvPrefiller.memory_bytes(layout, context_bytes=CONTEXT_BYTES), dtype=np.uint8)
    prefiller = te.KvPrefiller(engine, layout, 0, memory, context_bytes=CONTEXT_BYTES)
    info = te.KvInstanceInfo("prefill", "prefill-0", layout, [engine.address()])
    conn.send(info.serialize().encode())  # metadata as bytes, over any channel
    while True:
        msg = conn.recv()
        if msg is None:
            break
        request, req_pages = msg
        prefiller.start(request, req_pages)
        for layer in range(layout.layers):  # the forward pass, layer by layer
            fill(memory, layout, request, layer, req_pages)
            prefiller.layer_done(request, layer)
        prefiller.finish(request, context_of(request))
        err = prefiller.wait_sent(request, timeout=60.0)  # pages may be freed now
        conn.send(("sent", request, None if err is None else str(err)))
    conn.send(("stats", prefiller.stats()))
    prefiller.close()
    engine.close()


def decode_main(conn, provider: str, pages: int, order: str) -> None:
    engine = te.Engine(provider=provider)
    layout = make_layout(order, pages)
    memory = np.zeros(te.KvDecoder.memory_bytes(layout, context_bytes=CONTEXT_BYTES), dtype=np.uint8)
    decoder = te.KvDecoder(engine, layout, 0, memory, context_bytes=CONTEXT_BYTES)
    prefill = te.KvInstanceInfo.parse(conn.recv().decode())
    te.check_compatible(prefill.layout, layout)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        request, req_pages = msg
        t0 = time.monotonic()
        handle = decoder.receive(request, prefill, req_pages)  # PULL
        handle.wait(60.0)  # every layer and the context have landed
        elapsed = time.monotonic() - t0
        bad = check(memory, layout, request, req_pages)
        conn.send(("received", request, bad, handle.payload, elapsed))
    decoder.close()
    engine.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", default="tcp", help="tcp or shm (default tcp on loopback)")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--pages_per_request", type=int, default=4)
    ap.add_argument("--decode_order", default="HND", choices=["NHD", "HND"])
    args = ap.parse_args()
    pages = 64
    ctx = mp.get_context("spawn")
    p_conn, p_child = ctx.Pipe()
    d_conn, d_child = ctx.Pipe()
    procs = [ctx.Process(target=prefill_main, args=(p_child, args.provider, pages), daemon=True),
             ctx.Process(target=decode_main, args=(d_child, args.provider, pages, args.decode_order), daemon=True)]
    for p in procs:
        p.start()
    ok = True
    try:
        if not p_conn.poll(60):
            raise TimeoutError("the prefill instance did not start")
        d_conn.send(p_conn.recv())  # the router forwards the prefill metadata
        rng = np.random.default_rng(0)
        for request in range(1, args.requests + 1):
            # Each side allocates its own pages for the request (different ones).
            p_pages = rng.choice(pages, args.pages_per_request, replace=False).tolist()
            d_pages = rng.choice(pages, args.pages_per_request, replace=False).tolist()
            d_conn.send((request, d_pages))  # decode pulls first, as in vLLM's flow
            p_conn.send((request, p_pages))
            for conn in (p_conn, d_conn):
                if not conn.poll(120):
                    raise TimeoutError(f"request {request}: no answer within 120 s")
            sent, got = p_conn.recv(), d_conn.recv()
            _, _, bad, context, elapsed = got
            line_ok = sent[2] is None and bad == 0 and context == context_of(request)
            ok &= line_ok
            print(f"request {request}: prefill pages {p_pages} -> decode pages {d_pages}: "
                  f"{'verified' if line_ok else 'MISMATCH'} ({bad} bad heads, {elapsed * 1e3:.1f} ms)")
        p_conn.send(None)
        d_conn.send(None)
        if p_conn.poll(60):
            print("prefill stats:", p_conn.recv()[1])
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    print("all requests verified byte for byte" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
