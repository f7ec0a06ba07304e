import json

import pytest

from flashmoe_core import MoEConfig

BASE = dict(tokens=64, hidden=32, ffn=48, experts=8)


def cfg(**kw):
    return MoEConfig(**{**BASE, **kw})


@pytest.mark.parametrize("field,value,fragment", [
    ("tokens", 0, "tokens"), ("tokens", -3, "tokens"), ("tokens", 1.5, "tokens"),
    ("tokens", True, "tokens"), ("tokens", 2 ** 21, "tokens"),
    ("hidden", 30, "multiple of 8"), ("hidden", 0, "hidden"), ("hidden", "32", "hidden"),
    ("ffn", 12, "multiple of 8"), ("ffn", 4, "ffn"),
    ("experts", 0, "experts"), ("experts", 2000, "experts"),
    ("top_k", 0, "top_k"), ("top_k", 17, "top_k"), ("top_k", 9.5, "top_k"),
    ("mlp", "swiglu", "mlp"), ("activation", "tanh", "activation"),
    ("dtype", "float64", "dtype"), ("dtype", "bf16", "dtype"),
    ("capacity_factor", 0, "capacity_factor"), ("capacity_factor", -1.0, "capacity_factor"),
    ("capacity_factor", float("inf"), "capacity_factor"), ("capacity_factor", "1", "capacity_factor"),
    ("renormalize", 1, "renormalize"), ("world_size", 0, "world_size"),
    ("placement", (0,) * 7, "placement"), ("placement", "01234567", "placement"),
])
def test_each_field_rejects_bad_values(field, value, fragment):
    with pytest.raises(ValueError) as exc:
        cfg(**{field: value})
    msg = str(exc.value)
    assert f"MoEConfig.{field}=" in msg and fragment in msg and "allowed" in msg


def test_top_k_above_experts():
    with pytest.raises(ValueError, match=r"top_k=5 .* at most experts=4"):
        cfg(experts=4, top_k=5)


def test_placement_rank_out_of_world():
    with pytest.raises(ValueError, match=r"owner ranks in \[0, 2\); expert 1 has 2"):
        cfg(world_size=2, placement=(0, 2, 1, 1, 0, 0, 1, 1))


def test_32bit_index_bound():
    with pytest.raises(ValueError, match="2\\*\\*31"):
        cfg(tokens=2 ** 20, world_size=512, top_k=8, experts=8)


def test_defaults_and_derived():
    c = cfg()
    assert (c.top_k, c.mlp, c.activation, c.dtype, c.capacity_factor, c.renormalize,
            c.world_size) == (2, "vanilla", "relu", "bfloat16", None, True, 1)
    assert c.capacity() is None
    assert c.expert_owner == (0,) * 8
    assert c.storage_dtype == "bfloat16"
    assert cfg(dtype="tfloat32").storage_dtype == "float32"


def test_contiguous_uneven_placement():
    c = cfg(experts=7, world_size=3)
    assert c.expert_owner == (0, 0, 0, 1, 1, 2, 2)
    assert c.local_experts(0) == (0, 1, 2) and c.local_experts(2) == (5, 6)
    assert c.max_local_experts == 3
    with pytest.raises(ValueError, match="rank=3"):
        c.local_experts(3)


def test_explicit_placement_may_leave_a_rank_empty():
    c = cfg(experts=4, world_size=3, placement=[2, 0, 2, 0])
    assert c.placement == (2, 0, 2, 0)
    assert c.local_experts(1) == () and c.local_experts(2) == (0, 2)


def test_capacity_rule():
    c = cfg(tokens=100, experts=8, top_k=2, capacity_factor=1.25)
    assert c.capacity() == 32  # ceil(1.25 * 100 * 2 / 8) = ceil(31.25)
    assert c.capacity(10) == 4  # ceil(3.125)
    assert isinstance(cfg(capacity_factor=2).capacity_factor, float)


def test_frozen():
    import dataclasses

    c = cfg()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.tokens = 3


def test_json_round_trip():
    c = cfg(world_size=2, placement=(1, 0, 1, 0, 1, 0, 1, 0), capacity_factor=1.5,
            mlp="gated", activation="silu", dtype="float16", renormalize=False)
    text = c.to_json()
    assert json.loads(text)["placement"] == [1, 0, 1, 0, 1, 0, 1, 0]
    assert MoEConfig.from_json(text) == c


@pytest.mark.parametrize("text,fragment", [
    ("[1, 2]", "must be an object"), ("{bad json", "not valid JSON"),
    ('{"tokens": 4, "hidden": 8, "ffn": 8, "experts": 2, "colour": 1}', "unknown MoEConfig field"),
    ('{"tokens": 4, "hidden": 8}', "lacks required field"),
    ('{"tokens": 4, "hidden": 9, "ffn": 8, "experts": 2}', "MoEConfig.hidden=9"),
])
def test_json_errors(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        MoEConfig.from_json(text)


def test_flops():
    c = cfg(tokens=10, hidden=16, ffn=32, experts=4, top_k=2)
    assert c.flops() == 2 * 10 * 16 * 4 + 2 * 2 * 10 * 2 * 16 * 32
    assert cfg(tokens=10, hidden=16, ffn=32, experts=4, mlp="gated").flops() == \
        2 * 10 * 16 * 4 + 3 * 2 * 10 * 2 * 16 * 32


def test_environment_values(monkeypatch):
    from flashmoe_core import env

    monkeypatch.delenv("FLASHMOE_TIMEOUT_S", raising=False)
    assert env.timeout_s() == 5.0
    monkeypatch.setenv("FLASHMOE_TIMEOUT_S", "0.5")
    assert env.timeout_s() == 0.5
    monkeypatch.setenv("FLASHMOE_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="FLASHMOE_TIMEOUT_S='soon'"):
        env.timeout_s()
    monkeypatch.setenv("FLASHMOE_DISABLE_JIT", "maybe")
    with pytest.raises(ValueError, match="not a boolean"):
        env.jit_disabled()
    monkeypatch.setenv("NVSHMEM_SYMMETRIC_SIZE", "4G")
    assert env.nvshmem_symmetric_size() == 4 * 2**30
    monkeypatch.setenv("NVSHMEM_SYMMETRIC_SIZE", "1073741824")
    assert env.nvshmem_symmetric_size() == 2**30
    monkeypatch.setenv("FLASHMOE_CACHE_DIR", "/tmp/x")
    assert str(env.cache_dir()) == "/tmp/x"
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert env.launched_by_mpi()


def test_numpy_scalars_are_accepted_and_stored_as_python_values():
    import numpy as np

    c = MoEConfig(tokens=np.int64(64), hidden=np.int32(32), ffn=np.uint16(48),
                  experts=np.int64(8), top_k=np.int8(2), capacity_factor=np.float32(1.5),
                  renormalize=np.bool_(False), world_size=np.int64(2),
                  placement=np.array([0, 1] * 4))
    assert c == cfg(top_k=2, capacity_factor=1.5, renormalize=False, world_size=2,
                    placement=(0, 1) * 4)
    for name in ("tokens", "hidden", "ffn", "experts", "top_k", "world_size"):
        assert type(getattr(c, name)) is int
    assert type(c.capacity_factor) is float and type(c.renormalize) is bool
    assert all(type(o) is int for o in c.placement)
    assert MoEConfig.from_json(c.to_json()) == c
    # Out-of-range NumPy values are still rejected, and NumPy bools are not integers.
    with pytest.raises(ValueError, match="MoEConfig.tokens="):
        cfg(tokens=np.int64(0))
    with pytest.raises(ValueError, match="MoEConfig.experts="):
        cfg(experts=np.bool_(True))
    with pytest.raises(ValueError, match="MoEConfig.capacity_factor="):
        cfg(capacity_factor=np.float64("nan"))


def test_every_variable_is_validated_and_named(monkeypatch, tmp_path):
    from flashmoe_core import env

    for name in list(env._READERS):
        monkeypatch.delenv(name, raising=False)
    assert set(env.validate()) == set(env._READERS)
    afile = tmp_path / "f"
    afile.write_text("")
    bad = {"FLASHMOE_TIMEOUT_S": "banana", "FLASHMOE_QUIET": "maybe",
           "FLASHMOE_DEVICE_DIR": str(tmp_path / "devcie"), "FLASHMOE_ARCH": "sm_70",
           "FLASHMOE_CACHE_DIR": str(afile), "FLASHMOE_CXX": "no-such-c++",
           "FLASHMOE_CUTLASS_INCLUDE": str(tmp_path), "NVSHMEM_SYMMETRIC_SIZE": "-1",
           "FLASHMOE_LINEINFO": "2", "FLASHMOE_DISABLE_JIT": "yes please",
           "FLASHMOE_KERNEL_KIT": str(tmp_path), "FLASHMOE_EMULATOR_MAINLOOP": "sm100"}
    assert set(bad) == set(env._READERS)
    for name, value in bad.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(env.EnvVarError) as exc:
        env.validate()
    for name in bad:  # one message naming every bad variable
        assert name in str(exc.value)
    for value in ("-1", "nan", "inf", "0"):
        monkeypatch.setenv("FLASHMOE_TIMEOUT_S", value)
        with pytest.raises(ValueError, match="FLASHMOE_TIMEOUT_S"):
            env.timeout_s()
    monkeypatch.setenv("FLASHMOE_ARCH", "90a")
    assert env.arch_override() == "sm_90a"


def test_a_mistyped_device_dir_is_refused_not_replaced(tmp_path):
    from flashmoe_core import FlashMoEError
    from flashmoe_core.host.toolchain import device_root

    with pytest.raises(FlashMoEError, match="holds no device sources"):
        device_root(str(tmp_path / "device"))
