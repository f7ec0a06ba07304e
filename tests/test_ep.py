"""Expert-parallel protocol on CPU: plans, accounting, simulated transport (CPU tier)."""

from pathlib import Path

import numpy as np
import pytest

from conftest import run_mpi
from flashmoe_core import MoEConfig, MoEWeights, random_tokens
from flashmoe_core.kernel.ep import (max_peer_tiles, plan_heap, plan_recv, plan_send, simulate,
                                     slot_rows)
from flashmoe_core.oracle.reference import Routing, moe_forward

CASES = [
    dict(world_size=2, experts=4),
    dict(world_size=3, experts=7, top_k=3, mlp="gated", activation="silu"),      # uneven
    dict(world_size=4, experts=6, capacity_factor=0.5, dtype="float32"),        # drops
    dict(world_size=4, experts=5, placement=(3, 3, 0, 3, 1)),                   # rank 2 empty
    dict(world_size=8, experts=16, top_k=4, dtype="float16", activation="gelu"),
]


def _global(cfg, seed=3):
    w = MoEWeights.random(cfg, seed)
    xs = [random_tokens(cfg, seed + 1, rank=r) for r in range(cfg.world_size)]
    return w, xs


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: f"w{kw['world_size']}-e{kw['experts']}")
def test_simulated_transport_equals_the_oracle_bit_for_bit(kw):
    cfg = MoEConfig(tokens=150, hidden=16, ffn=24, **kw)
    w, xs = _global(cfg)
    ys, routings, counts = simulate(cfg, w, xs)
    y_ref, r_ref = moe_forward(cfg, w, np.concatenate(xs))
    assert np.array_equal(np.concatenate(ys).view(np.uint8), y_ref.view(np.uint8))
    assert np.array_equal(np.concatenate([r.experts for r in routings]), r_ref.experts)


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: f"w{kw['world_size']}-e{kw['experts']}")
def test_per_peer_accounting(kw):
    cfg = MoEConfig(tokens=150, hidden=16, ffn=24, **kw)
    wts, xs = _global(cfg)
    ys, routings, counts = simulate(cfg, wts, xs)
    n = cfg.world_size
    sends = [plan_send(cfg, routings[r], r) for r in range(n)]
    recvs = [plan_recv(cfg, p, {s: sends[s].headers[p] for s in range(n)}) for p in range(n)]
    for r in range(n):
        for p in range(n):
            if p != r:  # the owner derives exactly the tiles the source sends
                assert recvs[p].tiles[r] == sends[r].tiles[p]
                for tl in sends[r].tiles[p]:
                    assert cfg.expert_owner[tl.expert] == p and 1 <= tl.rows <= 128
                    assert tl.dst_row + tl.rows <= slot_rows(cfg)
                assert len(sends[r].tiles[p]) <= max_peer_tiles(cfg)
    kept = sum(int(r.kept.sum()) for r in routings)
    sent_rows = sum(tl.rows for s in sends for tiles in s.tiles.values() for tl in tiles)
    local_rows = sum(s.local_rows for s in sends)
    assert sent_rows + local_rows == kept
    assert sum(c.send_tiles for c in counts) == sum(c.recv_tiles for c in counts)
    for c in counts:
        assert c.return_tiles == c.send_tiles
        assert c.subscriber_events == c.recv_tiles + c.send_tiles
        assert c.total_tasks == c.send_tiles + c.up_tasks + c.down_tasks + c.combine_tasks
        assert c.combine_tasks == 2 * 1  # 150 tokens -> 2 token tiles, hidden 16 -> 1 column


def test_worst_case_fits_the_heap():
    # Every token of every source picks the same peer's experts: the slot must hold it.
    cfg = MoEConfig(tokens=300, hidden=8, ffn=8, experts=8, top_k=3, world_size=4)
    t = cfg.tokens
    experts = np.tile(np.array([[0, 1, 2]], np.int32), (t, 1))  # owned by ranks 0, 0, 1
    routing = Routing(experts, np.full((t, 3), 1 / 3, np.float32), np.ones((t, 3), bool))
    send = plan_send(cfg, routing, rank=3)
    rows_to_0 = sum(tl.rows for tl in send.tiles[0])
    assert rows_to_0 == 2 * t <= slot_rows(cfg)
    assert len(send.tiles[0]) <= max_peer_tiles(cfg)


def test_heap_plan_is_symmetric_and_sized_by_config():
    cfg = MoEConfig(tokens=1024, hidden=256, ffn=512, experts=10, top_k=2, world_size=4)
    h = plan_heap(cfg)
    assert h.symmetric["recv_rows"] == 4 * 1024 * 2 * 256 * 2
    assert h.symmetric["dispatch_sig"] == h.symmetric["return_sig"] == 4 * max_peer_tiles(cfg) * 8
    assert h.symmetric["headers"] == 4 * 3 * 8  # 3 = most experts on one rank (10 over 4)
    assert "y_expert" in h.symmetric and "y_expert" not in h.local
    assert h.total_bytes == h.symmetric_bytes + sum(h.local.values())
    assert "recv_rows" in h.describe()


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_accounting_across_mpi_ranks(ranks):
    proc = run_mpi(ranks, [str(Path(__file__).with_name("mpi_ep_worker.py"))])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("OK") == 3, proc.stdout
