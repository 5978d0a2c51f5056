#!/usr/bin/python3
"""Routing traces from models te-moe gen does not have, written by a writer
of the trace format (moe/routing_trace.h) that shares no code with the
project's, to check the placement solver on structure it was not built
around.

Models (256 experts x 8 layers x top-8 unless told otherwise):
  nested   4 super-groups of 64 experts, each of 4 groups of 16: a token
           draws 60% of its experts from its group, 30% from its
           super-group, 10% anywhere; a different expert permutation per
           layer.
  drift    16 groups; a token's group at layer l + 1 is a fixed function of
           its group at layer l (80%), so some groups grow hot layer by
           layer; 70% of its experts from its group.
  uniform  every token draws top-k distinct experts uniformly.
  dups     every token names one expert k times.
  sparse   every third layer has no experts; elsewhere 70% of slots are -1.
  onehot   expert 0 is in every token, the rest uniform.
  mixed    co-activation groups of uneven sizes (8 .. 64 experts, some
           larger than a node holds), the groups' popularity Zipf-skewed;
           75% of a token's experts from its group; a different expert
           permutation per layer.
  ring     experts on a ring, a token's experts within 24 places of a
           centre it draws (80%), so neighbourhoods overlap and no
           partition into groups fits; a different permutation per layer.
  grouplimited
           group-limited routing as DeepSeek-V3 does it: 8 groups of
           consecutive expert ids; a token keeps 4 groups (drawn by its
           own scores over mildly skewed group popularity) and its top-k
           experts come from those 4 only, twice as likely from the first
           (Zipf 0.6 popularity within a group, fixed per layer).

--oracle_out writes, for mixed, ring and grouplimited, the placement the
model's structure suggests (layer,expert,rank CSV for te-moe place
--oracle): mixed packs each group onto as few nodes as possible (largest
first, contiguous ranks), ring gives each node a contiguous arc of the
ring, grouplimited puts each group on consecutive ranks (a node per group
with 8 nodes): the contiguous layout deployments of such models use.

The model is fixed (its own seed); --seed draws the tokens, so two seeds
give a fitted and a held-out trace of the same model:

  scripts/bench/moe_independent_traces.py nested /tmp/fit.bin --seed=1
  scripts/bench/moe_independent_traces.py nested /tmp/held.bin --seed=2
  te-moe place --trace=/tmp/fit.bin --eval_trace=/tmp/held.bin \\
      --ranks=64 --nodes=8 --extra_slots=1
"""
import argparse
import random
import struct

MODELS = ("nested", "drift", "uniform", "dups", "sparse", "onehot", "mixed", "ring", "grouplimited")
MIXED_SIZES = (64, 48, 32, 24, 24, 16, 16, 8, 8, 8, 8)  # the rest: groups of 8


def crc32c(data):
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def write_trace(path, tokens, layers, topk, experts, row_of):
    ids = []
    for tok in range(tokens):
        for layer in range(layers):
            row = row_of(tok, layer)
            assert len(row) == topk
            ids.extend(row)
    body = b"TEMOETR1" + struct.pack("<4I", tokens, layers, topk, experts)
    body += struct.pack("<%dh" % len(ids), *ids)
    with open(path, "wb") as f:
        f.write(body + struct.pack("<I", crc32c(body)))


def distinct(rng, k, draw):
    row = []
    while len(row) < k:
        e = draw()
        if e not in row:
            row.append(e)
    return row


def model_rows(name, seed, layers, topk, experts):
    rng = random.Random(seed)
    structure = random.Random(1234)  # the model, the same for every seed
    if name == "nested":
        perm = [structure.sample(range(experts), experts) for _ in range(layers)]
        sub, group = experts // 4, experts // 16

        def row(tok, layer):
            s, g = rng.randrange(4), rng.randrange(4)

            def draw():
                r = rng.random()
                if r < 0.6:
                    e = s * sub + g * group + rng.randrange(group)
                elif r < 0.9:
                    e = s * sub + rng.randrange(sub)
                else:
                    e = rng.randrange(experts)
                return perm[layer][e]
            return distinct(rng, topk, draw)
        return row
    if name == "drift":
        groups, size = 16, experts // 16
        successor = [structure.randrange(groups) for _ in range(groups)]
        state = {}

        def row(tok, layer):
            if layer == 0 or rng.random() >= 0.8:
                g = rng.randrange(groups)
            else:
                g = successor[state[tok]]
            state[tok] = g
            return distinct(rng, topk, lambda: g * size + rng.randrange(size)
                            if rng.random() < 0.7 else rng.randrange(experts))
        return row
    if name == "uniform":
        return lambda tok, layer: rng.sample(range(experts), topk)
    if name == "dups":
        return lambda tok, layer: [rng.randrange(experts)] * topk
    if name == "sparse":
        return lambda tok, layer: ([-1] * topk if layer % 3 == 0 else
                                   [rng.randrange(experts) if rng.random() < 0.3 else -1
                                    for _ in range(topk)])
    if name == "onehot":
        return lambda tok, layer: [0] + rng.sample(range(1, experts), topk - 1)
    if name == "mixed":
        perm = [structure.sample(range(experts), experts) for _ in range(layers)]
        groups = mixed_groups(experts)
        weight = [1.0 / (i + 1) ** 0.8 for i in range(len(groups))]
        order = structure.sample(range(len(groups)), len(groups))  # popularity is not size

        def row(tok, layer):
            g = groups[order[rng.choices(range(len(groups)), weight)[0]]]
            return distinct(rng, topk, lambda: perm[layer][g[rng.randrange(len(g))]
                                                           if rng.random() < 0.75 else rng.randrange(experts)])
        return row
    if name == "ring":
        perm = [structure.sample(range(experts), experts) for _ in range(layers)]

        def row(tok, layer):
            c = rng.randrange(experts)
            return distinct(rng, topk, lambda: perm[layer][(c + rng.randint(-24, 24)) % experts
                                                           if rng.random() < 0.8 else rng.randrange(experts)])
        return row
    if name == "grouplimited":
        groups, size = 8, experts // 8
        group_weight = [1.0 / (g + 1) ** 0.3 for g in range(groups)]
        popularity = []  # per layer, per expert
        for _ in range(layers):
            within = [1.0 / (i + 1) ** 0.6 for i in range(size)]
            pop = []
            for g in range(groups):
                pop += structure.sample(within, size)
            popularity.append(pop)

        def row(tok, layer):
            scores = [w * rng.expovariate(1.0) for w in group_weight]
            kept = sorted(range(groups), key=lambda g: -scores[g])[:4]
            pool = [e for g in kept for e in range(g * size, (g + 1) * size)]
            weight = [popularity[layer][e] * (2.0 if e // size == kept[0] else 1.0) for e in pool]
            return distinct(rng, topk, lambda: pool[rng.choices(range(len(pool)), weight)[0]])
        return row
    raise ValueError(name)


def mixed_groups(experts):
    sizes = [s for s in MIXED_SIZES]
    while sum(sizes) > experts:
        sizes.pop()
    sizes += [8] * ((experts - sum(sizes)) // 8)
    sizes[-1] += experts - sum(sizes)
    groups, start = [], 0
    for n in sizes:
        groups.append(list(range(start, start + n)))
        start += n
    return groups


def oracle(name, layers, experts, ranks, nodes):
    """(layer, expert, rank) rows of the placement the model suggests, in
    the model's own expert numbering mapped through each layer's permutation."""
    structure = random.Random(1234)
    perm = [structure.sample(range(experts), experts) for _ in range(layers)]
    per_rank = experts // ranks
    if name == "grouplimited":
        return [(layer, e, e // per_rank) for layer in range(layers) for e in range(experts)]
    if name == "ring":
        slot_of = list(range(experts))  # ring position p sits in slot p: contiguous arcs per node
    else:
        # Largest group first, each into the node with the most free slots
        # that holds it whole, else across the emptiest nodes in turn.
        per_node = experts // nodes
        free = [per_node] * nodes
        taken = [0] * nodes
        slot_of = [0] * experts
        for g in sorted(mixed_groups(experts), key=len, reverse=True):
            rest = list(g)
            while rest:
                fits = [n for n in range(nodes) if free[n] >= len(rest)]
                n = min(fits, key=lambda n: free[n]) if fits else max(range(nodes), key=lambda n: free[n])
                for _ in range(min(free[n], len(rest))):
                    slot_of[rest.pop()] = n * per_node + taken[n]
                    taken[n] += 1
                    free[n] -= 1
    rows = []
    for layer in range(layers):
        for model_expert in range(experts):
            rows.append((layer, perm[layer][model_expert], slot_of[model_expert] // per_rank))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=1, help="which tokens are drawn")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--oracle_out", help="mixed, ring, grouplimited: write the model's own placement here (CSV)")
    ap.add_argument("--ranks", type=int, default=64, help="for --oracle_out")
    ap.add_argument("--nodes", type=int, default=8, help="for --oracle_out")
    a = ap.parse_args()
    if a.experts % 64 != 0 or not 1 <= a.topk <= 16:
        ap.error("--experts must be a multiple of 64 and --topk in 1..16")
    if a.oracle_out and (a.model not in ("mixed", "ring", "grouplimited") or a.experts % a.ranks
                         or a.ranks % a.nodes):
        ap.error("--oracle_out needs --model mixed, ring or grouplimited, and ranks dividing experts, "
                 "nodes dividing ranks")
    write_trace(a.out, a.tokens, a.layers, a.topk, a.experts,
                model_rows(a.model, a.seed, a.layers, a.topk, a.experts))
    if a.oracle_out:
        with open(a.oracle_out, "w") as f:
            f.write("layer,expert,rank\n")
            for layer, e, r in oracle(a.model, a.layers, a.experts, a.ranks, a.nodes):
                f.write("%d,%d,%d\n" % (layer, e, r))


if __name__ == "__main__":
    main()
