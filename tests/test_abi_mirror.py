"""The Python mirror of abi.cuh's enums, checked on the CPU (the NVRTC compile of
kernels/abi_check.cu checks every listed value against the header as well)."""

import re

import pytest

from flashmoe_core import CompileError
from flashmoe_core.host.abi import ACT_IDS, DTYPE_IDS, ENUMS, abi_defines
from flashmoe_core.host.toolchain import device_root, find_toolchain

ABI = (device_root() / "include" / "flashmoe" / "abi.cuh").read_text()


def _header_enums():
    """{enum: {name: value}} of every enum defined in abi.cuh."""
    out = {}
    for m in re.finditer(r"enum\s+(\w+)\s*:\s*[\w:]+\s*\{(.*?)\};", ABI, re.S):
        body = re.sub(r"//[^\n]*", "", m.group(2))
        out[m.group(1)] = {n: int(v) for n, v in re.findall(r"(k\w+)\s*=\s*(-?\d+)", body)}
    return out


def test_every_header_enum_is_mirrored_with_its_values():
    assert _header_enums() == ENUMS


def test_the_compile_check_lists_every_enumerator():
    listed = set(re.findall(r"X\((\w+),\s*(k\w+)\)", ABI.split("#define FMOE_ABI_ENUMS")[1]))
    assert listed == {(e, n) for e, names in ENUMS.items() for n in names}


def test_defines_carry_every_value():
    d = abi_defines()
    for e, names in ENUMS.items():
        for n, v in names.items():
            assert d[f"FMOE_ENUM_{e}_{n}"] == v


def test_user_facing_maps_are_views_of_the_enums():
    assert DTYPE_IDS == {"float32": 0, "tfloat32": 1, "bfloat16": 2, "float16": 3}
    assert ACT_IDS == {"relu": 0, "gelu": 1, "silu": 2, "identity": 3, "swiglu_clamped": 4}
    assert len(set(DTYPE_IDS.values())) == len(ENUMS["DType"])


@pytest.mark.compile
def test_a_wrong_enum_value_fails_the_abi_compile():
    from flashmoe_core.host.compiler import KernelSpec, build

    defines = dict(abi_defines(), FMOE_ENUM_Phase_kPhaseHeaders=99)
    spec = KernelSpec.make("kernels/abi_check.cu", defines, label="a tampered ABI check")
    with pytest.raises(CompileError, match="Phase::kPhaseHeaders differs from abi.cuh"):
        build(spec, "sm_80", find_toolchain(), cache=None)
