"""Hopper's asynchronous instructions on the CPU emulator (kernels/gmma_test.cu): wgmma
on shared-memory descriptors in every layout atom against NumPy, mbarrier phases, the
emulation's agreement with CuTe's SM90 GMMA layouts, and the bugs its asynchrony is
there to catch. The sm_90a compile of the same kernel is checked for HGMMA."""

import shutil

import numpy as np
import pytest

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
    c, probe = gmma_test(a, b, swizzle, options=EmulatorOptions(seed=3))
    ref = reference(a, b)
    # float32 accumulation of 192 products of 16-bit operands (exact in float32).
    assert np.abs(c - ref).max() <= 1e-5 * np.abs(ref).max()
    assert probe.tolist() == PROBE


def _mutant(tmp_path, monkeypatch, file, *edits):
    """A copy of device/ with one seeded bug (edits: old, new, old, new, ...)."""
    dst = tmp_path / "device"
    shutil.copytree(find_toolchain().device_root, dst)
    path = dst / file
    text = path.read_text()
    for old, new in zip(edits[::2], edits[1::2]):
        assert text.count(old) == 1, f"the mutation site is gone from {file}: {old!r}"
        text = text.replace(old, new)
    path.write_text(text)
    monkeypatch.setenv("FLASHMOE_DEVICE_DIR", str(dst))


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


def test_a_stale_phase_parity_lets_threads_past_an_open_phase(tmp_path, monkeypatch):
    # Waiting on parity 0 every k-tile: from the second one on the wait passes at once
    # (phase 0 completed long ago), before the other threads stored their share.
    _mutant(tmp_path, monkeypatch, KERNEL, "mbarrier_try_wait_parity(&bar, uint32_t(kt & 1))",
            "mbarrier_try_wait_parity(&bar, 0u)")
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
def test_the_sm90a_build_issues_hgmma_and_mbarrier_instructions(tmp_path):
    from flashmoe_core.host import sass
    from flashmoe_core.host.cache import KernelCache
    from flashmoe_core.host.compiler import build
    from flashmoe_core.kernel.specs import gmma_test_spec

    k = build(gmma_test_spec("bfloat16", 256, "128B"), "sm_90a", find_toolchain(),
              cache=KernelCache(tmp_path))
    ops = [i.opcode.split(".")[0] for i in sass.disassemble(k.cubin)["flashmoe_gmma_test"]]
    assert ops.count("HGMMA") == 4  # one per k16 step of a 64-wide k-tile
    assert "SYNCS" in ops and "ELECT" in ops  # mbarrier operations, elect.sync
    assert sass.instruction_kind("HGMMA") == "mma"
