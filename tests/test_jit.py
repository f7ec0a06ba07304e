"""NVRTC/nvJitLink compiles of every device kernel, and the kernel cache (no GPU needed)."""

import multiprocessing as mp
import shutil

import pytest

from flashmoe_core import CompileError, JitDisabledError
from flashmoe_core.host.cache import KernelCache
from flashmoe_core.host.compiler import KernelSpec, build, cache_key, normalize_arch
from flashmoe_core.host.toolchain import find_toolchain
from flashmoe_core import MoEConfig
from flashmoe_core.kernel.specs import (abi_check_spec, gmma_test_spec, moe_backward_spec,
                                        moe_spec, nvshmem_ping_spec, ring_test_spec,
                                        tile_gemm_spec, ws_gemm_test_spec)

pytestmark = pytest.mark.compile

# Every dtype and every kernel file on both architectures, without compiling the full
# cross product (each tile-GEMM compile takes ~30 s on two cores).
# The tile GEMM of every dtype on sm_80 is what README's `build --arch sm_80 --kernels
# tests` compiles too (tests/test_readme.py shares this cache).
MATRIX = [
    ("sm_90a", tile_gemm_spec("bfloat16")),
    ("sm_80", tile_gemm_spec("bfloat16")),
    ("sm_80", tile_gemm_spec("tfloat32")),
    ("sm_80", tile_gemm_spec("float16")),
    ("sm_80", tile_gemm_spec("float32")),
    ("sm_90a", nvshmem_ping_spec()),
    ("sm_80", nvshmem_ping_spec()),
    ("sm_90a", ring_test_spec()),
    ("sm_80", ring_test_spec()),
    ("sm_90a", abi_check_spec()),
    ("sm_80", abi_check_spec()),
    # The fused kernel: the benchmark's shape on Hopper; odd shapes, gated, fp16 on Ampere.
    ("sm_90a", moe_spec(MoEConfig(tokens=8192, hidden=2048, ffn=2048, experts=64, top_k=2))),
    ("sm_80", moe_spec(MoEConfig(tokens=256, hidden=1000, ffn=1032, experts=7, top_k=7,
                                 mlp="gated", activation="silu", dtype="float16"))),
    # The backward: the benchmark's shape on Hopper, the odd gated fp16 one on Ampere.
    ("sm_90a", moe_backward_spec(MoEConfig(tokens=8192, hidden=2048, ffn=2048, experts=64,
                                           top_k=2))),
    ("sm_80", moe_backward_spec(MoEConfig(tokens=256, hidden=1000, ffn=1032, experts=7, top_k=7,
                                          mlp="gated", activation="silu", dtype="float16"))),
    # Expert parallelism: the NVSHMEM build, linked with libnvshmem_device.a.
    ("sm_90a", moe_spec(MoEConfig(tokens=8192, hidden=2048, ffn=2048, experts=64, top_k=2,
                                  world_size=8))),
    ("sm_90a", moe_backward_spec(MoEConfig(tokens=8192, hidden=2048, ffn=2048, experts=64,
                                           top_k=2, world_size=8))),
    # Hopper's wgmma / mbarrier building blocks (sm_90a only).
    ("sm_90a", gmma_test_spec("bfloat16", 256, "128B")),
    # The warp-specialised mainloop on its own (sm_90a only).
    ("sm_90a", ws_gemm_test_spec("bfloat16", 4)),
]
HOPPER_ONLY = {"kernels/gmma_test.cu", "kernels/ws_gemm_test.cu"}
SYMBOLS = {"kernels/tile_gemm.cu": b"flashmoe_tile_gemm",
           "kernels/nvshmem_ping.cu": b"flashmoe_nvshmem_ping",
           "kernels/abi_check.cu": b"flashmoe_abi_check",
           "kernels/ring_test.cu": b"flashmoe_ring_test",
           "kernels/moe_fused.cu": b"flashmoe_moe_forward",
           "kernels/moe_backward.cu": b"flashmoe_moe_backward",
           "kernels/gmma_test.cu": b"flashmoe_gmma_test",
           "kernels/ws_gemm_test.cu": b"flashmoe_ws_gemm_test"}


@pytest.fixture(scope="module")
def tc():
    return find_toolchain()


def test_matrix_covers_every_kernel_file_on_both_archs(tc):
    files = {p.relative_to(tc.device_root).as_posix()
             for p in (tc.device_root / "kernels").glob("*.cu")}
    for arch in ("sm_80", "sm_90a"):
        covered = {spec.entry for a, spec in MATRIX if a == arch}
        need = files - HOPPER_ONLY if arch == "sm_80" else files
        assert need <= covered, f"{arch}: no compile test for {sorted(need - covered)}"


@pytest.mark.slow
@pytest.mark.parametrize("arch,spec", MATRIX,
                         ids=[f"{a}-{s.entry.split('/')[-1]}-{dict(s.defines).get('FMOE_DTYPE', '')}"
                              f"{'-ep' if s.nvshmem and 'moe' in s.entry else ''}"
                              for a, s in MATRIX])
def test_kernel_compiles(arch, spec, tc, shared_cache):
    k = build(spec, arch, tc, cache=KernelCache(shared_cache))
    assert k.cubin[:4] == b"\x7fELF"  # SASS in an ELF container, not PTX
    assert SYMBOLS[spec.entry] in k.cubin


def test_second_compile_is_a_cache_hit(tc, tmp_path):
    cache = KernelCache(tmp_path)
    first = build(abi_check_spec(), "sm_90a", tc, cache=cache)
    second = build(abi_check_spec(), "sm_90a", tc, cache=cache)
    assert not first.cached and second.cached and first.cubin == second.cubin
    assert cache.path(first.key).exists()


def test_corrupt_entry_is_detected_and_rebuilt(tc, tmp_path):
    cache = KernelCache(tmp_path)
    k = build(abi_check_spec(), "sm_80", tc, cache=cache)
    p = cache.path(k.key)
    blob = bytearray(p.read_bytes())
    blob[-10] ^= 0xFF
    p.write_bytes(bytes(blob))
    assert cache.load(k.key) is None and not p.exists()
    again = build(abi_check_spec(), "sm_80", tc, cache=cache)
    assert not again.cached and again.cubin == k.cubin
    p.write_bytes(b"short")
    assert build(abi_check_spec(), "sm_80", tc, cache=cache).cached is False


def test_a_swapped_entry_is_rebuilt_not_loaded(tc, tmp_path):
    # Two whole, checksummed entries swapped under each other's keys: the identity record
    # inside each cubin is what tells them apart.
    cache = KernelCache(tmp_path)
    a = build(abi_check_spec(), "sm_80", tc, cache=cache)
    b = build(abi_check_spec(), "sm_90a", tc, cache=cache)
    pa, pb = cache.path(a.key), cache.path(b.key)
    blob_a, blob_b = pa.read_bytes(), pb.read_bytes()
    pa.write_bytes(blob_b)
    pb.write_bytes(blob_a)
    assert cache.load(a.key) == b.cubin  # the checksum alone accepts it
    lines = []
    again = build(abi_check_spec(), "sm_80", tc, cache=cache, progress=lines.append)
    assert not again.cached and again.cubin == a.cubin
    assert "was not that kernel (it is the build of key" in lines[0]


def test_an_unusable_cache_folder_fails_before_the_compile(tc, tmp_path):
    from flashmoe_core import FlashMoEError

    afile = tmp_path / "a-file"
    afile.write_text("")
    for root in (afile, "/proc/flashmoe-cache"):  # not a folder; not writable, even as root
        lines = []
        with pytest.raises(FlashMoEError, match="kernel cache folder .* is not usable"):
            build(abi_check_spec(), "sm_80", tc, cache=KernelCache(root), progress=lines.append)
        assert lines == []


def _compile_in_child(args):
    root, arch = args
    from flashmoe_core.host.cache import KernelCache
    from flashmoe_core.host.compiler import build
    from flashmoe_core.host.toolchain import find_toolchain
    from flashmoe_core.kernel.specs import nvshmem_ping_spec

    k = build(nvshmem_ping_spec(), arch, find_toolchain(), cache=KernelCache(root))
    return k.cached, len(k.cubin), k.key


@pytest.mark.slow
def test_concurrent_compiles_share_one_build(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.map(_compile_in_child, [(str(tmp_path), "sm_90a")] * 4)
    assert len({r[2] for r in results}) == 1 and len({r[1] for r in results}) == 1
    assert sum(not cached for cached, _, _ in results) == 1, results  # one built, three waited
    cache = KernelCache(tmp_path)
    assert cache.load(results[0][2]) is not None
    leftovers = [p for p in tmp_path.rglob("*.tmp")]
    assert leftovers == []


def test_concurrent_writers_never_expose_a_partial_entry(tmp_path):
    cache = KernelCache(tmp_path)
    payload = bytes(range(256)) * 4096
    with mp.get_context("fork").Pool(4) as pool:
        pool.starmap(_store_many, [(str(tmp_path), payload)] * 4)
    assert cache.load("ab" * 32) == payload


def _store_many(root, payload):
    c = KernelCache(root)
    for _ in range(20):
        c.store("ab" * 32, payload)
        got = c.load("ab" * 32)
        assert got is None or got == payload


def test_broken_source_reports_file_and_line(tmp_path):
    src = find_toolchain().device_root
    dev = tmp_path / "device"
    shutil.copytree(src, dev)
    header = dev / "include" / "flashmoe" / "abi.cuh"
    lines = header.read_text().splitlines()
    at = next(i for i, l in enumerate(lines) if "struct FaultRecord {" in l)
    lines.insert(at + 1, "  this is not C++;")
    header.write_text("\n".join(lines) + "\n")
    tc = find_toolchain(str(dev))
    with pytest.raises(CompileError) as exc:
        build(abi_check_spec(), "sm_90a", tc, cache=None)
    err = exc.value
    assert f"abi.cuh({at + 2}): error" in err.log
    assert err.stage == "nvrtc" and err.context["arch"] == "sm_90a"
    assert any(o.startswith("-arch=sm_90a") for o in err.options)
    assert "abi.cuh" in str(err)


def test_compile_error_names_the_config(tmp_path):
    spec = KernelSpec.make("kernels/tile_gemm.cu", {"FMOE_BM": 128}, context={"dtype": "x"})
    with pytest.raises(CompileError) as exc:
        build(spec, "sm_80", find_toolchain(), cache=None)
    assert "FMOE_DTYPE must be defined" in exc.value.log
    assert "dtype=x" in str(exc.value)


def test_cache_key_tracks_sources_and_options(tmp_path):
    src = find_toolchain().device_root
    dev = tmp_path / "device"
    shutil.copytree(src, dev)
    tc1 = find_toolchain(str(dev))
    k1 = cache_key(abi_check_spec(), "sm_90a", tc1)
    assert k1 == cache_key(abi_check_spec(), "sm_90a", tc1)
    assert k1 != cache_key(abi_check_spec(), "sm_80", tc1)
    assert k1 != cache_key(abi_check_spec(), "sm_90a", tc1, lineinfo=True)
    assert k1 != cache_key(tile_gemm_spec("bfloat16"), "sm_90a", tc1)
    assert cache_key(tile_gemm_spec("bfloat16"), "sm_90a", tc1) != \
        cache_key(tile_gemm_spec("float16"), "sm_90a", tc1)
    p = dev / "include" / "flashmoe" / "prelude.cuh"
    p.write_bytes(p.read_bytes() + b" ")
    find_toolchain.cache_clear()
    assert cache_key(abi_check_spec(), "sm_90a", find_toolchain(str(dev))) != k1


def test_disabled_jit_refuses_to_compile(tc, tmp_path):
    cache = KernelCache(tmp_path)
    with pytest.raises(JitDisabledError, match="python -m flashmoe_core.build --arch sm_80"):
        build(abi_check_spec(), "sm_80", tc, cache=cache, allow_compile=False)
    build(abi_check_spec(), "sm_80", tc, cache=cache)
    assert build(abi_check_spec(), "sm_80", tc, cache=cache, allow_compile=False).cached


def test_progress_line(tc, tmp_path):
    lines = []
    build(abi_check_spec(), "sm_80", tc, cache=KernelCache(tmp_path), progress=lines.append)
    assert lines == ["compiling the ABI check for sm_80 (first run only, ~30 s)"]
    lines.clear()
    build(abi_check_spec(), "sm_90a", tc, cache=KernelCache(tmp_path), progress=lines.append)
    build(abi_check_spec(), "sm_90a", tc, cache=KernelCache(tmp_path), progress=lines.append)
    assert len(lines) == 1  # a hit says nothing


@pytest.mark.parametrize("arch,want", [("sm_90a", "sm_90a"), ("90a", "sm_90a"),
                                       ("SM_80", "sm_80"), ("compute_90a", "sm_90a")])
def test_arch_spelling(arch, want):
    assert normalize_arch(arch) == want


@pytest.mark.parametrize("arch", ["sm_70", "sm_90b", "hopper", ""])
def test_bad_arch(arch):
    with pytest.raises(ValueError, match="not supported"):
        normalize_arch(arch)


def test_abi_mirror_lists_every_header_field(tc):
    import re

    from flashmoe_core.host.abi import STRUCTS

    text = (tc.device_root / "include" / "flashmoe" / "abi.cuh").read_text()
    fields = text.split("#define FMOE_ABI_FIELDS")[1].split("#define FMOE_ABI_STRUCTS")[0]
    listed = set(re.findall(r"X\((\w+), (\w+)\)", fields))
    mirrored = {(s, f) for s, dt in STRUCTS.items() for f in dt.names}
    assert listed == mirrored
