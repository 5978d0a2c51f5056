"""Expert placement from Python: fitted to routing a numpy array holds,
counted against a count written here from the protocol's definition (one
record per token per distinct other rank; with node-level deduplication one
network crossing per distinct remote node), and handed to dispatch as
ExpertMaps."""

import os

import numpy as np
import pytest

import transfer_engine as te

EXPERTS, RANKS, NODES, LAYERS, TOPK = 64, 8, 2, 3, 4


def grouped_routing(tokens, seed, skew=0.0):
    """Tokens draw most experts from one of 8 co-activation groups of 8
    (a different expert permutation per layer); `skew` makes some groups
    more popular than others."""
    model = np.random.default_rng(99)  # the same structure for every seed
    perm = [model.permutation(EXPERTS) for _ in range(LAYERS)]
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, 9) ** skew
    ids = np.empty((tokens, LAYERS, TOPK), dtype=np.int64)
    for t in range(tokens):
        for l in range(LAYERS):
            g = rng.choice(8, p=weights / weights.sum())
            row = []
            while len(row) < TOPK:
                e = g * 8 + rng.integers(8) if rng.random() < 0.85 else rng.integers(EXPERTS)
                if perm[l][e] not in row:
                    row.append(perm[l][e])
            ids[t, l] = row
    return ids


def count_by_definition(ids, placement, nodes):
    """Records (rank) and network crossings with node-level deduplication,
    tokens dispatched from rank t % ranks, placement without replicas."""
    ranks, per_node = placement.ranks, placement.ranks // nodes
    rank = node = 0
    for t in range(ids.shape[0]):
        home = t % ranks
        for l in range(ids.shape[1]):
            dest = {placement.ranks_of(l, int(e))[0] for e in ids[t, l] if e >= 0}
            rank += len(dest - {home})
            node += len({r // per_node for r in dest} - {home // per_node})
    return rank, node


def test_fitted_placement_moves_fewer_records_and_is_counted_exactly(tmp_path):
    fit, held = grouped_routing(1024, seed=1), grouped_routing(1024, seed=2)
    placement = te.place_experts(fit, EXPERTS, RANKS, nodes=NODES)
    rr = te.Placement.round_robin(LAYERS, EXPERTS, RANKS)
    mine = te.count_records(held, placement, nodes=NODES, hierarchical=True)
    base = te.count_records(held, rr, nodes=NODES, hierarchical=True)
    assert (mine["rank"], mine["node"]) == count_by_definition(held, placement, NODES)
    assert (base["rank"], base["node"]) == count_by_definition(held, rr, NODES)
    # A group of 8 fits on one rank, so a token whose experts all come from
    # its group sends one record, not four; its home is still random, so
    # about 0.63 network crossings per token remain against round-robin's
    # 0.94 (one of 2 nodes).
    assert mine["rank"] < 0.6 * base["rank"] and mine["node"] < 0.8 * base["node"]
    assert sum(r for r, _ in mine["layers"]) == mine["rank"]
    assert mine["max_rank_imbalance"] < 1.6
    # Every rank holds experts / ranks primaries; the map is what dispatch takes.
    for layer in range(LAYERS):
        owners = [placement.ranks_of(layer, e)[0] for e in range(EXPERTS)]
        assert sorted(np.bincount(owners, minlength=RANKS)) == [EXPERTS // RANKS] * RANKS
        m = placement.expert_map(layer, NODES)
        assert m.experts == EXPERTS and m.ranks == RANKS
        for e in range(EXPERTS):
            assert e in m.local_experts(owners[e])
    # Written and read back: the same placement, the same count.
    path = os.path.join(tmp_path, "placement.csv")
    placement.write_csv(path)
    back = te.Placement.read_csv(path, LAYERS, EXPERTS, RANKS)
    assert te.count_records(held, back, nodes=NODES, hierarchical=True) == mine


def test_replicas_go_to_skewed_layers_and_even_out_their_load():
    fit, held = grouped_routing(2048, seed=3, skew=1.5), grouped_routing(2048, seed=4, skew=1.5)
    plain = te.place_experts(fit, EXPERTS, RANKS, nodes=NODES)
    replicated = te.place_experts(fit, EXPERTS, RANKS, nodes=NODES, extra_slots=1)
    copies = sum(len(replicated.ranks_of(l, e)) - 1 for l in range(LAYERS) for e in range(EXPERTS))
    assert copies == LAYERS * RANKS  # every slot of every (skewed) layer
    a = te.count_records(held, plain, nodes=NODES)
    b = te.count_records(held, replicated, nodes=NODES)
    assert b["max_rank_imbalance"] < a["max_rank_imbalance"]
    # A replicated layer's map routes each token to one of the expert's copies.
    m = replicated.expert_map(0, NODES)
    for e in range(EXPERTS):
        holders = replicated.ranks_of(0, e)
        for source in range(RANKS):
            assert m.rank_for(e, source, [e, -1, -1, -1]) in holders


def test_reached_node_choice_routes_to_a_copy_on_a_node_the_token_reaches(tmp_path):
    """12 ranks in 3 nodes; expert 0 on ranks 1 (node 0) and 9 (node 2). By
    source, rank 4 sends expert 0 to rank 1; a token of rank 4 that also needs
    expert 10 (node 2) goes to the copy on node 2 under reached-node choice."""
    ranks_of = [[1, 9]] + [[e] for e in range(1, 12)]
    by_source = te.ExpertMap.with_replicas(ranks_of, 12, 3)
    reached = te.ExpertMap.with_replicas(ranks_of, 12, 3, choice="reached_node")
    assert (by_source.choice, reached.choice) == ("source", "reached_node")
    assert by_source.route([0, 10], 4) == [1, 10]
    assert reached.route([0, 10], 4) == [9, 10]
    assert reached.rank_for(0, 4, [0, 10]) == 9
    assert reached.route([0, 2, -1], 4) == [1, 2, -1]
    with pytest.raises(te.TransferError, match="not one of source, reached_node, reached_rank"):
        te.ExpertMap.with_replicas(ranks_of, 12, 3, choice="nearest")
    # Reached-rank choice: with copies of expert 0 on ranks 8 and 9 of node 2
    # as well, a token that needs expert 9 (rank 9) costs no record for
    # expert 0 there, whatever the source's rule names (a source holding a
    # copy keeps its own: it is reached too).
    three = [[1, 8, 9]] + [[e] for e in range(1, 12)]
    by_rank = te.ExpertMap.with_replicas(three, 12, 3, choice="reached_rank")
    assert by_rank.choice == "reached_rank"
    for source in set(range(12)) - {1, 8, 9}:
        assert by_rank.route([0, 9], source) == [9, 9]
        assert by_rank.route([8, 0], source) == [8, 8]
    assert by_rank.route([0, 9], 1) == [1, 9]
    with pytest.raises(te.TransferError, match="does not name expert 3"):
        reached.rank_for(3, 4, [0, 10])
    # The solver picks per layer; forced choices are exact too, and survive a file.
    fit, held = grouped_routing(2048, seed=3, skew=1.5), grouped_routing(2048, seed=4, skew=1.5)
    for choice in ("source", "reached_node", "reached_rank"):
        p = te.place_experts(fit, EXPERTS, RANKS, nodes=NODES, extra_slots=1, replica_choice=choice)
        assert {p.replica_choice(l) for l in range(LAYERS)} == {choice}
        path = str(tmp_path / f"{choice}.csv")
        p.write_csv(path)
        back = te.Placement.read_csv(path, LAYERS, EXPERTS, RANKS)
        assert [back.replica_choice(l) for l in range(LAYERS)] == [choice] * LAYERS
        assert te.count_records(held, back, nodes=NODES, hierarchical=True) == \
            te.count_records(held, p, nodes=NODES, hierarchical=True)
    with pytest.raises(te.TransferError, match="replica choice 'x'"):
        te.place_experts(fit, EXPERTS, RANKS, nodes=NODES, extra_slots=1, replica_choice="x")


def test_experts_that_do_not_divide_over_the_ranks():
    """64 experts on 7 ranks: every rank has ceil(64 / 7) = 10 slots, six stay
    free, and the count and the maps work as for any placement."""
    fit, held = grouped_routing(1024, seed=6), grouped_routing(1024, seed=7)
    for extra_slots in (0, 1):
        placement = te.place_experts(fit, EXPERTS, 7, extra_slots=extra_slots)
        rr = te.Placement.round_robin(LAYERS, EXPERTS, 7)
        for layer in range(LAYERS):
            owners = [placement.ranks_of(layer, e)[0] for e in range(EXPERTS)]
            assert max(np.bincount(owners, minlength=7)) <= 10
            m = placement.expert_map(layer)
            assert sum(len(m.local_experts(r)) for r in range(7)) >= EXPERTS
        mine, base = te.count_records(held, placement), te.count_records(held, rr)
        if extra_slots == 0:
            assert (mine["rank"], mine["node"]) == count_by_definition(held, placement, 1)
            assert mine["rank"] < base["rank"]
    bad = te.Placement.round_robin(1, 10, 3)  # ranks of 4, 3, 3: valid
    assert [bad.ranks_of(0, e)[0] for e in range(10)] == [e % 3 for e in range(10)]


def test_bad_routing_and_arguments_are_refused():
    ids = grouped_routing(16, seed=5)
    with pytest.raises(te.TransferError, match="dimensions"):
        te.place_experts(ids[:, 0, :], EXPERTS, RANKS)
    bad = ids.copy()
    bad[3, 1, 2] = EXPERTS
    with pytest.raises(te.TransferError, match="outside"):
        te.place_experts(bad, EXPERTS, RANKS)
    bad[3, 1, 2] = -2
    with pytest.raises(te.TransferError, match="outside"):
        te.count_records(bad, te.Placement.round_robin(LAYERS, EXPERTS, RANKS))
    with pytest.raises(te.TransferError):
        te.place_experts(ids, EXPERTS, RANKS, home="nowhere")
    with pytest.raises(te.TransferError):
        te.place_experts(ids, EXPERTS, RANKS, load_slack=-1)
    with pytest.raises(te.TransferError):
        te.count_records(ids, te.Placement.round_robin(LAYERS + 1, EXPERTS, RANKS))  # shapes disagree
    p = te.place_experts(ids, EXPERTS, RANKS)
    with pytest.raises(te.TransferError, match="layer"):
        p.expert_map(LAYERS)
    with pytest.raises(te.TransferError, match="expert"):
        p.ranks_of(0, EXPERTS)
    with pytest.raises(te.TransferError):
        te.Placement.read_csv("/nonexistent/placement.csv", LAYERS, EXPERTS, RANKS)
    for layers, experts, ranks in [(1, 8, 0), (0, 8, 4), (1, 60, 1 << 20)]:
        with pytest.raises(te.TransferError):
            te.Placement.round_robin(layers, experts, ranks)
    with pytest.raises(te.TransferError, match="nodes"):
        te.count_records(ids, p, nodes=3)
