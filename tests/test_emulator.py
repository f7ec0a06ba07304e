"""The CPU emulator itself: its builds and cache, its options, its fault reports, and
that it catches seeded bugs in the device code (a mutation check of the tier)."""

import shutil
from pathlib import Path

import pytest

from conftest import seed_mutant
from flashmoe_core import (CompileError, FlashMoEError, FlashMoETimeout, MoEConfig, MoELayer,
                           MoEWeights, random_tokens)
from flashmoe_core.emulator import EmulatedMoELayer, EmulatorError, EmulatorOptions
from flashmoe_core.cli.gpu_run import TOLERANCE, compare
from flashmoe_core.host import emulator as host_emu
from flashmoe_core.host.cache import KernelCache
from flashmoe_core.host.toolchain import find_toolchain
from flashmoe_core.kernel.specs import ring_test_spec, tile_gemm_spec

pytestmark = pytest.mark.emulator

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- builds and cache
def test_every_kernel_file_has_an_emulator_build():
    tc = find_toolchain()
    for cu in sorted((tc.device_root / "kernels").glob("*.cu")):
        if cu.name == "abi_check.cu":
            continue  # compile-only: static asserts, nothing to run
        spec = host_emu.KernelSpec(entry=f"kernels/{cu.name}")
        assert (tc.device_root / host_emu.emulator_entry(spec)).exists(), cu.name


def test_library_is_built_once_then_cached(tmp_path):
    tc = find_toolchain()
    cc = host_emu.find_compiler()
    cache = KernelCache(tmp_path)
    lines = []
    first = host_emu.build_library(ring_test_spec(), tc, cc, cache=cache, progress=lines.append)
    assert first.exists() and len(lines) == 1 and "CPU emulator" in lines[0]
    again = host_emu.build_library(ring_test_spec(), tc, cc, cache=cache, progress=lines.append)
    assert again == first and len(lines) == 1  # no second compile
    first.write_bytes(b"corrupt")  # a damaged entry is rebuilt, never loaded
    rebuilt = host_emu.build_library(ring_test_spec(), tc, cc, cache=cache, progress=lines.append)
    assert len(lines) == 2 and rebuilt.read_bytes()[:4] == b"\x7fELF"
    assert host_emu.load_library(rebuilt).function("emu_last_error", [], None) is not None


def test_a_library_swapped_with_its_record_is_never_loaded(tmp_path):
    # Two valid entries whose library and record were swapped pass every checksum; only
    # the identity built into each library tells them apart (this used to segfault).
    from flashmoe_core.kernel.specs import nvshmem_ping_spec

    tc, cc, cache = find_toolchain(), host_emu.find_compiler(), KernelCache(tmp_path)
    ring = host_emu.build_library(ring_test_spec(), tc, cc, cache=cache)
    ping = host_emu.build_library(nvshmem_ping_spec(), tc, cc, cache=cache)
    ring_bytes, ping_bytes = ring.read_bytes(), ping.read_bytes()
    for a, b in ((ring, ping), (ring.with_name(ring.name + ".json"),
                                ping.with_name(ping.name + ".json"))):
        data_a, data_b = a.read_bytes(), b.read_bytes()
        a.write_bytes(data_b)
        b.write_bytes(data_a)
    ring_id = host_emu.library_identity(ring_test_spec(), tc, cc)
    lines = []
    again = host_emu.build_library(ring_test_spec(), tc, cc, cache=cache, progress=lines.append)
    assert "was not that library" in lines[0] and "compiling" in lines[1]
    from flashmoe_core.host import identity

    assert identity.read(again.read_bytes()) == ring_id == identity.read(ring_bytes)
    assert host_emu.load_library(again, ring_id) is not None
    # The check inside the loaded library (the file may change after its bytes were read).
    other = tmp_path / "other.so"
    other.write_bytes(ping_bytes)
    with pytest.raises(FlashMoEError, match="is not the emulator library it was loaded as: "
                                            "it is the build of key"):
        host_emu.load_library(other, ring_id)


def test_disabled_jit_and_unusable_caches_fail_before_compiling(tmp_path):
    from flashmoe_core import JitDisabledError

    tc, cc = find_toolchain(), host_emu.find_compiler()
    with pytest.raises(JitDisabledError, match="FLASHMOE_DISABLE_JIT"):
        host_emu.build_library(ring_test_spec(), tc, cc, cache=KernelCache(tmp_path / "c"),
                               allow_compile=False)
    afile = tmp_path / "a-file"
    afile.write_text("")
    for root in (afile, Path("/proc/flashmoe-cache")):  # not a folder; not writable (root too)
        lines = []
        with pytest.raises(FlashMoEError, match="kernel cache folder .* is not usable"):
            host_emu.build_library(ring_test_spec(), tc, cc, cache=KernelCache(root),
                                   progress=lines.append)
        assert lines == []  # no compile started


@pytest.mark.parametrize("cxx", ["false", "true"])  # fails; succeeds but writes nothing
def test_a_broken_compiler_is_found_before_any_compile(cxx):
    cc = host_emu.HostCompiler(shutil.which(cxx), "fake 1.0")
    with pytest.raises(FlashMoEError, match="cannot build a C\\+\\+17 shared library"):
        host_emu.check_compiler(cc)


def test_key_follows_defines_compiler_and_sources(tmp_path):
    tc = find_toolchain()
    cc = host_emu.find_compiler()
    k = host_emu.library_key(tile_gemm_spec("bfloat16"), tc, cc)
    assert k != host_emu.library_key(tile_gemm_spec("float16"), tc, cc)
    assert k != host_emu.library_key(tile_gemm_spec("bfloat16"), tc,
                                     host_emu.HostCompiler(cc.path, cc.version + " (other)"))
    copy = tmp_path / "device"
    shutil.copytree(tc.device_root, copy)
    (copy / "emu" / "flashmoe_emu" / "runtime.h").write_text(
        (copy / "emu" / "flashmoe_emu" / "runtime.h").read_text() + "\n// edited\n")
    assert k != host_emu.library_key(tile_gemm_spec("bfloat16"), find_toolchain(str(copy)), cc)
    assert k != host_emu.library_key(tile_gemm_spec("bfloat16"), tc, cc, checked=True)


def test_checks_need_a_checked_library():
    # An unchecked build has no memory model: asking it for one is an error, not a pass.
    from flashmoe_core.kernel.jit import emulator_library

    lib = emulator_library(ring_test_spec())
    assert not lib.checked and emulator_library(ring_test_spec(), checked=True).checked
    with pytest.raises(EmulatorError, match="built without the memory model"):
        lib.launch(EmulatorOptions(races=True), lambda: 0)


def test_missing_compiler_is_a_clear_error():
    with pytest.raises(FlashMoEError, match="host C\\+\\+ compiler.*FLASHMOE_CXX"):
        host_emu.find_compiler("no-such-c++-compiler")


def test_compile_error_carries_the_log(tmp_path):
    tc = find_toolchain()
    copy = tmp_path / "device"
    shutil.copytree(tc.device_root, copy)
    runner = copy / "emu" / "kernels" / "ring_test.cpp"
    runner.write_text(runner.read_text() + "\nthis is not C++;\n")
    with pytest.raises(CompileError) as exc:
        host_emu.build_library(ring_test_spec(), find_toolchain(str(copy)),
                               host_emu.find_compiler(), cache=None)
    assert exc.value.stage == "host c++" and "ring_test.cpp" in exc.value.log


def test_options_are_validated():
    with pytest.raises(ValueError, match="chaos"):
        EmulatorOptions(chaos=-1)
    with pytest.raises(ValueError, match="watchdog_s"):
        EmulatorOptions(watchdog_s=0)
    with pytest.raises(ValueError, match="stack_kib"):
        EmulatorOptions(stack_kib=8)
    with pytest.raises(ValueError, match="preempt"):
        EmulatorOptions(preempt=-1)
    strict = EmulatorOptions.strict(4)
    assert strict.checked and strict.weak and strict.races and strict.lazy_cp_async
    assert strict.seed == 4 and not EmulatorOptions(seed=4).checked
    cfg = MoEConfig(tokens=16, hidden=64, ffn=64, experts=4, top_k=2)
    w = MoEWeights.random(cfg, 0)
    with pytest.raises(ValueError, match="backend="):
        MoELayer(cfg, w, backend="tpu")
    with pytest.raises(ValueError, match="do not apply"):
        MoELayer(cfg, w, backend="emulator", device=0)
    with pytest.raises(ValueError, match="grid="):
        MoELayer(cfg, w, backend="emulator", max_blocks=0)


def test_layer_factory_returns_the_emulated_layer():
    cfg = MoEConfig(tokens=16, hidden=64, ffn=64, experts=4, top_k=2)
    w = MoEWeights.random(cfg, 0)
    layer = MoELayer(cfg, w, backend="emulator", max_blocks=2,
                     emulator_options=EmulatorOptions(seed=9))
    assert isinstance(layer, EmulatedMoELayer) and layer.grid == 2 and layer.options.seed == 9
    x = random_tokens(cfg, 1)
    y, routing = layer(x, return_routing=True)
    assert compare(cfg, w, x, y, routing)["rel_error"] <= TOLERANCE["bfloat16"]


# ---------------------------------------------------------------- mutation check
def _mutant(tmp_path, monkeypatch, file: str, old: str, new: str) -> None:
    seed_mutant(tmp_path, monkeypatch, file, old, new)


FUSED = "include/flashmoe/moe/fused.cuh"


def test_mutant_lost_down_tasks_are_caught_by_the_kernels_own_timeout(tmp_path, monkeypatch):
    # Row tile 0's down tasks are never published: the task loop waits for ring slots
    # nobody fills, and the bounded wait turns that into an exception.
    _mutant(tmp_path, monkeypatch, FUSED,
            "if (atomicAdd(&L.dep_rowtile[rt], 1u) + 1u == uint32_t(C::kUpTiles)) {",
            "if (atomicAdd(&L.dep_rowtile[rt], 1u) + 1u == uint32_t(C::kUpTiles) && rt != 0) {")
    cfg = MoEConfig(tokens=64, hidden=128, ffn=128, experts=8, top_k=2)
    layer = MoELayer(cfg, MoEWeights.random(cfg, 0), backend="emulator", timeout_s=2.0,
                     max_blocks=3)
    with pytest.raises(FlashMoETimeout) as exc:
        layer(random_tokens(cfg, 1))
    assert exc.value.record["phase"] == 5  # a task-ring slot


def test_mutant_divergent_barrier_is_reported_where_threads_wait(tmp_path, monkeypatch):
    # Thread 0 alone reaches an extra __syncthreads: a hang on a GPU.
    _mutant(tmp_path, monkeypatch, FUSED, "    if (lane == 0) {\n      float w[C::K];",
            "    if (lane == 0) {\n      if (threadIdx.x == 0) __syncthreads();\n"
            "      float w[C::K];")
    cfg = MoEConfig(tokens=64, hidden=128, ffn=128, experts=8, top_k=2)
    layer = MoELayer(cfg, MoEWeights.random(cfg, 0), backend="emulator", max_blocks=2)
    with pytest.raises(EmulatorError) as exc:
        layer(random_tokens(cfg, 1))
    msg = str(exc.value)
    assert "different barriers" in msg or "deadlock" in msg, msg
    assert "__syncthreads at fused.cuh:" in msg and "where the block's threads are" in msg, msg


def test_mutant_wrong_shuffle_width_is_caught_by_the_oracle(tmp_path, monkeypatch):
    # The softmax maximum is reduced within half-warps only: probabilities go wrong.
    _mutant(tmp_path, monkeypatch, FUSED,
            "m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));",
            "m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o, 16));")
    cfg = MoEConfig(tokens=64, hidden=128, ffn=128, experts=64, top_k=2)
    w = MoEWeights.random(cfg, 0)
    layer = MoELayer(cfg, w, backend="emulator", max_blocks=2)
    x = random_tokens(cfg, 1)
    y, routing = layer(x, return_routing=True)
    res = compare(cfg, w, x, y, routing)
    assert res["routing_agreement"] < 0.999 or res["rel_error"] > TOLERANCE["bfloat16"], res
