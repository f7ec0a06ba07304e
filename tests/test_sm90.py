"""Hopper's asynchronous instructions on the CPU emulator (kernels/gmma_test.cu): wgmma
on shared-memory descriptors in every layout atom against NumPy, TMA tile loads into
the swizzled layouts, mbarrier phases, the emulation's agreement with CuTe's SM90 GMMA
layouts, and the bugs its asynchrony is there to catch. The sm_90a compile of the same
kernel is checked for HGMMA and UTMALDG."""


import numpy as np
import pytest

from conftest import seed_mutant
from flashmoe_core.emulator import EmulatorError, EmulatorOptions, gmma_test
from flashmoe_core.host.errors import FlashMoEError
from flashmoe_core.host.toolchain import find_toolchain
from flashmoe_core.numerics import round_to

pytestmark = pytest.mark.emulator

# The kernel's probe: mbarrier.try_wait answers of its fixed sequence (1 = the phase of
# that parity completed), elect.sync in thread 0, and no k-tile barrier left open.
PROBE = [0, 1, 0, 0, 1, 0, 1, 1, 0]


def operands(dtype, n, k, seed=0):
    rng = np.random.default_rng(seed)
    a = round_to(rng.standard_normal((64, k), dtype=np.float32), dtype)
    b = round_to(rng.standard_normal((n, k), dtype=np.float32), dtype)
    return a, b


def reference(a, b):
    return a.astype(np.float64) @ b.astype(np.float64).T


# Every layout atom, both 16-bit types and every N the wrapper has, in four builds.
CASES = [("bfloat16", 64, "128B"), ("float16", 128, "interleave"), ("bfloat16", 256, "32B"),
         ("float16", 64, "64B")]


@pytest.mark.parametrize("dtype,n,swizzle", CASES, ids=[f"{d}-{n}-{s}" for d, n, s in CASES])
def test_wgmma_tile_product_matches_numpy(dtype, n, swizzle):
    a, b = operands(dtype, n, 192)
    ref = reference(a, b)
    # Tiles stored by the threads, then (swizzled layouts) loaded by TMA instead.
    for tma in (False, True) if swizzle != "interleave" else (False,):
        c, probe = gmma_test(a, b, swizzle, tma=tma, options=EmulatorOptions(seed=3))
        # float32 accumulation of 192 products of 16-bit operands.
        assert np.abs(c - ref).max() <= 1e-5 * np.abs(ref).max(), tma
        assert probe.tolist() == PROBE


def test_tma_box_outside_the_tensor_reads_zeros():
    # K = 192 in tiles of 64, but the maps say the tensors end at K = 160: the last
    # tile's boxes are zero past it, as TMA fills out-of-bounds elements.
    from flashmoe_core.host import tma

    full = operands("bfloat16", 64, 192)  # nonzero past K = 160: must not be read
    c, _ = gmma_test(full[0], full[1], "128B", tma=True, map_k=160)
    a, b = full[0].copy(), full[1].copy()
    a[:, 160:] = 0
    b[:, 160:] = 0
    want = reference(a, b)
    assert np.abs(c - want).max() <= 1e-5 * np.abs(want).max()
    with pytest.raises(ValueError, match="at most 128 B per row"):
        tma.check_tiled(0, 2, (192, 64), (384,), (128, 64), "128B")
    with pytest.raises(ValueError, match="16-byte aligned"):
        tma.check_tiled(8, 2, (192, 64), (384,), (64, 64), "128B")
    with pytest.raises(ValueError, match="multiples of 16"):
        tma.check_tiled(0, 2, (190, 64), (380,), (64, 64), "128B")
    with pytest.raises(ValueError, match="1..256"):
        tma.check_tiled(0, 2, (192, 512), (384,), (64, 512), "128B")


def _mutant(tmp_path, monkeypatch, file, *edits):
    seed_mutant(tmp_path, monkeypatch, file, *edits)


KERNEL = "kernels/gmma_test.cu"


def test_a_wrong_descriptor_decoding_disagrees_with_cute(tmp_path, monkeypatch):
    # The start-up cross-check is what keeps the emulated layouts honest.
    _mutant(tmp_path, monkeypatch, "emu/flashmoe_emu/sm90.h",
            "addr ^= ((addr >> 7) & ((1u << b) - 1u)) << 4;",
            "addr ^= ((addr >> 6) & ((1u << b) - 1u)) << 4;")
    with pytest.raises(FlashMoEError, match="disagrees with CuTe"):
        gmma_test(*operands("bfloat16", 64, 64))


LAST_WAIT = ("    sm90::wgmma_commit();\n    sm90::wgmma_wait<0>();\n",
             "    sm90::wgmma_commit();\n    if (kt + 1 < K / kBK) sm90::wgmma_wait<0>();\n")


def test_accumulators_read_before_the_wait_are_nan(tmp_path, monkeypatch):
    # The kernel stores its accumulators while the last group is in flight, and waits
    # only after that.
    _mutant(tmp_path, monkeypatch, KERNEL, *LAST_WAIT,
            "    C[m * kN + n] = d[i];\n  }\n}\n",
            "    C[m * kN + n] = d[i];\n  }\n  sm90::wgmma_wait<0>();\n}\n")
    c, _ = gmma_test(*operands("bfloat16", 64, 128))
    assert np.isnan(c).all()


def test_an_op_never_waited_for_is_reported(tmp_path, monkeypatch):
    _mutant(tmp_path, monkeypatch, KERNEL, *LAST_WAIT)
    with pytest.raises(EmulatorError, match="in flight"):
        gmma_test(*operands("bfloat16", 64, 128))


def test_wgmma_without_a_fence_is_reported(tmp_path, monkeypatch):
    _mutant(tmp_path, monkeypatch, KERNEL, "    sm90::wgmma_fence();\n", "")
    with pytest.raises(EmulatorError, match="without a wgmma.fence"):
        gmma_test(*operands("bfloat16", 64, 128))


def test_operands_overwritten_while_in_flight_are_reported(tmp_path, monkeypatch):
    # Without the barrier after the wait, a fast thread stores the next k-tile while a
    # slower one's wgmma still reads this one.
    _mutant(tmp_path, monkeypatch, KERNEL,
            "    __syncthreads();  // every wgmma read this k-tile before the next one "
            "overwrites it\n", "")
    with pytest.raises(EmulatorError, match="was written before the wait_group"):
        for seed in (1, 2, 3):
            gmma_test(*operands("bfloat16", 64, 256), options=EmulatorOptions(seed=seed))


def test_the_mainloop_refilling_a_stage_still_read_is_reported(tmp_path, monkeypatch):
    # The wgmma mainloop keeps one group in flight while it refills the previous
    # group's stage; with two in flight, the refill overwrites operands still read.
    from flashmoe_core.emulator import tile_gemm

    _mutant(tmp_path, monkeypatch, "include/flashmoe/gemm/tile_gemm.cuh",
            "    // may be refilled once every thread knows it.\n    sm90::wgmma_wait<1>();\n",
            "    // may be refilled once every thread knows it.\n    sm90::wgmma_wait<2>();\n")
    monkeypatch.setenv("FLASHMOE_EMULATOR_MAINLOOP", "sm90")
    a, b = operands("float16", 128, 512)
    with pytest.raises(EmulatorError, match="was written before the wait_group"):
        tile_gemm(a, b, "float16")


def test_a_stale_phase_parity_lets_threads_past_an_open_phase(tmp_path, monkeypatch):
    # Waiting on parity 0 every k-tile: from the second one on the wait passes at once
    # (phase 0 completed long ago), before the other threads stored their share.
    _mutant(tmp_path, monkeypatch, KERNEL, "mbarrier_try_wait_parity(ready, uint32_t(kt & 1))",
            "mbarrier_try_wait_parity(ready, 0u)")
    a, b = operands("bfloat16", 64, 256)
    caught = False
    for seed in (1, 2, 3):
        try:
            c, _ = gmma_test(a, b, options=EmulatorOptions(seed=seed))
        except EmulatorError:
            caught = True  # an operand overwritten under an in-flight op, or an arrival
            break          # on a phase that had all of them
        if not np.allclose(c, reference(a, b), rtol=1e-4, atol=1e-3):
            caught = True
            break
    assert caught


@pytest.mark.compile
def test_the_sm90a_build_issues_hgmma_tma_and_mbarrier_instructions(tmp_path):
    from flashmoe_core.host import sass
    from flashmoe_core.host.cache import KernelCache
    from flashmoe_core.host.compiler import build
    from flashmoe_core.kernel.specs import gmma_test_spec

    k = build(gmma_test_spec("bfloat16", 256, "128B"), "sm_90a", find_toolchain(),
              cache=KernelCache(tmp_path))
    ops = [i.opcode.split(".")[0] for i in sass.disassemble(k.cubin)["flashmoe_gmma_test"]]
    assert ops.count("HGMMA") == 4  # one per k16 step of a 64-wide k-tile
    assert "SYNCS" in ops and "ELECT" in ops  # mbarrier operations, elect.sync
    assert ops.count("UTMALDG") == 2  # the TMA mode's two loads (one box each at 128B)
    assert sass.instruction_kind("HGMMA") == "mma"
    assert sass.instruction_kind("UTMALDG") == "gmem->smem"


def test_a_wait_on_a_completed_parity_reads_the_tma_tile_in_flight(tmp_path, monkeypatch):
    # The consumers wait for the wrong phase (the one before, long complete): they
    # compute on boxes that have not landed (NaN), or the boxes land under their
    # in-flight wgmmas.
    _mutant(tmp_path, monkeypatch, KERNEL, "mbarrier_try_wait_parity(ready, uint32_t(kt & 1))",
            "mbarrier_try_wait_parity(ready, uint32_t((kt & 1) ^ 1))")
    try:
        c, _ = gmma_test(*operands("bfloat16", 64, 128), "128B", tma=True)
    except EmulatorError as exc:
        assert "was written before the wait_group" in str(exc), exc
    else:
        assert np.isnan(c).any()


def test_tma_bytes_beyond_the_expected_transactions_are_reported(tmp_path, monkeypatch):
    # The producer declares only A's bytes: B's loads complete more than the phase expects.
    _mutant(tmp_path, monkeypatch, KERNEL,
            "mbarrier_arrive_expect_tx(&full, uint32_t((64 + kN) * kBK * sizeof(T)))",
            "mbarrier_arrive_expect_tx(&full, uint32_t(64 * kBK * sizeof(T)))")
    with pytest.raises(EmulatorError, match="more bytes than the phase expects"):
        gmma_test(*operands("bfloat16", 64, 128), "128B", tma=True)


# ---------------------------------------------------------------- the wgmma mainloop
# What sm_90a builds run (gemm/tile_gemm.cuh, kWgmma), forced on the emulator: the fused
# forward, its backward and the tile GEMM against the oracle, every check on.
# One layer crossing several axes (gated, drops; whole row tiles and half tail tiles of
# at most 64 rows, token tiles of 128, 128 and 44); the emulator's forward tier passes
# whole with FLASHMOE_EMULATOR_MAINLOOP=sm90 too.
SM90_LAYERS = {
    "f16-gated-capacity-half-tiles": dict(tokens=300, hidden=128, ffn=256, experts=6,
                                          top_k=3, mlp="gated", activation="silu",
                                          dtype="float16", capacity_factor=1.0),
}


@pytest.mark.parametrize("name", list(SM90_LAYERS))
def test_fused_layer_on_the_wgmma_mainloop_matches_the_oracle(name, monkeypatch):
    from conftest import emulator_checks
    from flashmoe_core import MoEConfig, MoEWeights, random_tokens
    from flashmoe_core.cli.gpu_run import TOLERANCE, compare
    from flashmoe_core.gpu.layer import MoELayer

    monkeypatch.setenv("FLASHMOE_EMULATOR_MAINLOOP", "sm90")
    cfg = MoEConfig(**{"dtype": "bfloat16", **SM90_LAYERS[name]})
    w = MoEWeights.random(cfg, 0)
    layer = MoELayer(cfg, w, backend="emulator", emulator_options=emulator_checks(2))
    x = random_tokens(cfg, 1)
    y, routing = layer(x, return_routing=True)
    res = compare(cfg, w, x, y, routing)
    assert res["rel_error"] <= TOLERANCE[cfg.dtype] and res["routing_agreement"] >= 0.999, res


def test_backward_and_tile_gemm_on_the_wgmma_mainloop(monkeypatch):
    from flashmoe_core import MoEConfig, MoEWeights, random_tokens
    from flashmoe_core.emulator import tile_gemm
    from flashmoe_core.gpu.layer import MoELayer
    from flashmoe_core.oracle.reference import moe_backward

    monkeypatch.setenv("FLASHMOE_EMULATOR_MAINLOOP", "sm90")
    cfg = MoEConfig(tokens=40, hidden=128, ffn=256, experts=4, top_k=2)
    w = MoEWeights.random(cfg, 0)
    layer = MoELayer(cfg, w, backend="emulator")
    x = random_tokens(cfg, 1)
    dy = round_to(np.random.default_rng(5).standard_normal(x.shape, dtype=np.float32),
                  cfg.dtype)
    _, saved, routing = layer(x, save_for_backward=True, return_routing=True)
    dx, grads = layer.backward(dy, saved)
    ref_dx, ref = moe_backward(cfg, w, x, dy, routing)
    err = lambda got, want: float(np.abs(np.asarray(got, np.float64) - want).max()  # noqa
                                  / np.abs(want).max())
    assert err(dx, ref_dx) <= 2e-2 and err(grads.w1, ref.w1) <= 2e-2
    assert err(grads.w2, ref.w2) <= 2e-2 and err(grads.router, ref.router) <= 2e-2
    # 64 rows: a half tile; 136: a whole tile and a half tile of 8 rows.
    a, b = operands("float16", 72, 200)
    a = np.concatenate([a, operands("float16", 8, 200, seed=1)[0], a[:8]])
    for rows in (64, 136):
        c = tile_gemm(a[:rows], b, "float16")
        want = reference(a[:rows], b)
        assert np.abs(c.astype(np.float64) - want).max() <= 2e-3 * np.abs(want).max(), rows
