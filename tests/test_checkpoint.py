"""Loading one MoE layer of a checkpoint: synthetic files with the published names."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from flashmoe_core import MoEConfig, MoEWeights, random_tokens
from flashmoe_core.checkpoint import config_from_hf, read_safetensors, weights_from_checkpoint
from flashmoe_core.oracle.reference import moe_forward

H, F, E, K = 64, 48, 8, 2
S = 40  # qwen2_moe's shared expert width (deepseek_v3: one shared expert of width F)
HF = {
    "mixtral": {"model_type": "mixtral", "hidden_size": H, "intermediate_size": F,
                "num_local_experts": E, "num_experts_per_tok": K, "torch_dtype": "bfloat16"},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": H, "moe_intermediate_size": F,
                  "num_experts": E, "num_experts_per_tok": K, "norm_topk_prob": True},
    "olmoe": {"model_type": "olmoe", "hidden_size": H, "intermediate_size": F,
              "num_experts": E, "num_experts_per_tok": K},
    "qwen2_moe": {"model_type": "qwen2_moe", "hidden_size": H, "moe_intermediate_size": F,
                  "shared_expert_intermediate_size": S, "num_experts": E,
                  "num_experts_per_tok": K, "norm_topk_prob": False},
    "deepseek_v3": {"model_type": "deepseek_v3", "hidden_size": H,
                    "moe_intermediate_size": F, "n_routed_experts": E,
                    "num_experts_per_tok": K, "n_group": 4, "topk_group": 2,
                    "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                    "n_shared_experts": 1},
}


def write_safetensors(path, tensors):
    """A minimal writer of the published format (8-byte header size, JSON, data)."""
    header, blobs, off = {}, [], 0
    names = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32"}
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": names[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def checkpoint(naming, layer, seed=0):
    """Random tensors of one layer in a naming, and the MoEWeights they must give."""
    rng = np.random.default_rng(seed)
    bf = lambda *s: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(ml_dtypes.bfloat16)  # noqa
    p = f"model.layers.{layer}." + ("block_sparse_moe." if naming == "mixtral" else "mlp.")
    t = {p + "gate.weight": bf(E, H)}
    parts = ("w1", "w3", "w2") if naming == "mixtral" else ("gate_proj", "up_proj",
                                                             "down_proj")
    for j in range(E):
        t[f"{p}experts.{j}.{parts[0]}.weight"] = bf(F, H)
        t[f"{p}experts.{j}.{parts[1]}.weight"] = bf(F, H)
        t[f"{p}experts.{j}.{parts[2]}.weight"] = bf(H, F)
    if naming == "deepseek_v3":
        t[p + "gate.e_score_correction_bias"] = (rng.standard_normal(E) * 0.05).astype(
            np.float32)
    if naming in ("deepseek_v3", "qwen2_moe"):
        sp, width = (p + "shared_experts.", F) if naming == "deepseek_v3" else \
            (p + "shared_expert.", S)
        t[sp + "gate_proj.weight"] = bf(width, H)
        t[sp + "up_proj.weight"] = bf(width, H)
        t[sp + "down_proj.weight"] = bf(H, width)
        if naming == "qwen2_moe":
            t[p + "shared_expert_gate.weight"] = bf(1, H)
    # Another layer's tensors in the same file must be left alone.
    t[f"model.layers.{layer + 1}.mlp.gate.weight"] = bf(E, H)
    return t, p, parts


@pytest.mark.parametrize("naming", list(HF))
def test_loaded_layer_is_the_checkpoints_layer(naming, tmp_path):
    cfg = config_from_hf(HF[naming], tokens=32)
    t, p, parts = checkpoint(naming, layer=3)
    f = tmp_path / "model.safetensors"
    write_safetensors(f, t)
    tensors = read_safetensors([f], prefix="model.layers.3.")
    assert all(k.startswith("model.layers.3.") for k in tensors)
    assert tensors[p + "gate.weight"].dtype == ml_dtypes.bfloat16  # kept as stored
    w = weights_from_checkpoint(cfg, tensors, layer=3, naming=naming)
    # The classmethod spellings are the same functions.
    assert MoEConfig.from_hf_config(HF[naming], tokens=32) == cfg
    w2 = MoEWeights.from_checkpoint(cfg, tensors, layer=3, naming=naming)
    assert all(np.array_equal(a.view(np.uint8), w2.arrays()[n].view(np.uint8))
               for n, a in w.arrays().items())
    assert np.array_equal(w.router.view(np.uint16), t[p + "gate.weight"].T.view(np.uint16))
    j = 5
    assert np.array_equal(w.wg[j], t[f"{p}experts.{j}.{parts[0]}.weight"].T)
    assert np.array_equal(w.wu[j], t[f"{p}experts.{j}.{parts[1]}.weight"].T)
    assert np.array_equal(w.w2[j], t[f"{p}experts.{j}.{parts[2]}.weight"].T)
    # The layer as a model code would compute it, expert by expert.
    x = random_tokens(cfg, 1)
    y, r = moe_forward(cfg, w, x)
    xf = x.astype(np.float32)
    for tok in range(4):
        acc = np.zeros(H)
        for e, wt in zip(r.experts[tok], r.weights[tok]):
            g = xf[tok] @ t[f"{p}experts.{e}.{parts[0]}.weight"].astype(np.float32).T
            u = xf[tok] @ t[f"{p}experts.{e}.{parts[1]}.weight"].astype(np.float32).T
            h = (g / (1 + np.exp(-g))) * u
            acc += wt * (h @ t[f"{p}experts.{e}.{parts[2]}.weight"].astype(np.float32).T)
        if cfg.n_shared:  # the shared expert, gated by a sigmoid in qwen2_moe
            sp = p + ("shared_experts." if naming == "deepseek_v3" else "shared_expert.")
            g = xf[tok] @ t[sp + "gate_proj.weight"].astype(np.float32).T
            u = xf[tok] @ t[sp + "up_proj.weight"].astype(np.float32).T
            sh = ((g / (1 + np.exp(-g))) * u) @ t[sp + "down_proj.weight"].astype(np.float32).T
            if cfg.shared_gate:
                sh *= 1 / (1 + np.exp(-(xf[tok] @ t[p + "shared_expert_gate.weight"][0]
                                        .astype(np.float32))))
            acc += sh
        np.testing.assert_allclose(y[tok].astype(np.float32), acc, rtol=0.05, atol=0.05)


def test_configs_follow_the_families():
    assert config_from_hf(HF["mixtral"], 8).router_logits == "storage"
    assert config_from_hf(HF["olmoe"], 8).renormalize is False
    ds = config_from_hf(HF["deepseek_v3"], 8)
    assert (ds.scoring, ds.selection_bias, ds.n_group, ds.topk_group, ds.routed_scaling) == \
        ("sigmoid", True, 4, 2, 2.5)
    assert (ds.n_shared, ds.shared_ffn, ds.shared_gate) == (1, F, False)
    qw = config_from_hf(HF["qwen2_moe"], 8)
    assert (qw.n_shared, qw.shared_ffn, qw.shared_gate, qw.renormalize) == (1, S, True, False)
    assert config_from_hf(HF["qwen3_moe"], 8).n_shared == 0
    with pytest.raises(ValueError, match="model_type='llama'"):
        config_from_hf({"model_type": "llama"}, 8)


def test_wrong_names_shapes_and_shared_experts_are_refused(tmp_path):
    cfg = config_from_hf(HF["qwen3_moe"], tokens=8)
    t, p, _ = checkpoint("qwen3_moe", layer=0)
    with pytest.raises(ValueError, match="layers.5.mlp.gate.weight is missing"):
        weights_from_checkpoint(cfg, t, layer=5, naming="qwen3_moe")
    bad = dict(t)
    bad[p + "experts.2.up_proj.weight"] = bad[p + "experts.2.up_proj.weight"][:, :8]
    with pytest.raises(ValueError, match="experts.2.up_proj.weight has shape"):
        weights_from_checkpoint(cfg, bad, layer=0, naming="qwen3_moe")
    shared = dict(t, **{p + "shared_expert.up_proj.weight": t[p + "gate.weight"]})
    with pytest.raises(ValueError, match="shared_expert.up_proj.weight belongs to a shared "
                                         "expert this config has no room for"):
        weights_from_checkpoint(cfg, shared, layer=0, naming="qwen2_moe")
    q2 = config_from_hf(HF["qwen2_moe"], tokens=8)
    t2, p2, _ = checkpoint("qwen2_moe", layer=0)
    t2[p2 + "shared_expert.down_proj.weight"] = t2[p2 + "shared_expert.down_proj.weight"][:, :8]
    with pytest.raises(ValueError, match="shared_expert.down_proj.weight has shape"):
        weights_from_checkpoint(q2, t2, layer=0, naming="qwen2_moe")
    with pytest.raises(ValueError, match="naming="):
        weights_from_checkpoint(cfg, t, layer=0, naming="llama")
    (tmp_path / "x.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        read_safetensors(tmp_path / "x.safetensors")


def test_gpt_oss_layer_deinterleaves_gate_and_up(tmp_path):
    hf = {"model_type": "gpt_oss", "hidden_size": H, "intermediate_size": F,
          "num_local_experts": E, "experts_per_token": 4, "swiglu_limit": 7.0}
    cfg = config_from_hf(hf, tokens=16)
    assert cfg.activation == "swiglu_clamped" and cfg.softmax_after_topk and cfg.mlp_bias
    rng = np.random.default_rng(0)
    bf = lambda *s: rng.standard_normal(s).astype(ml_dtypes.bfloat16)  # noqa: E731
    p = "model.layers.0.mlp."
    t = {p + "router.weight": bf(E, H), p + "router.bias": bf(E),
         p + "experts.gate_up_proj": bf(E, H, 2 * F), p + "experts.gate_up_proj_bias": bf(E, 2 * F),
         p + "experts.down_proj": bf(E, F, H), p + "experts.down_proj_bias": bf(E, H)}
    write_safetensors(tmp_path / "m.safetensors", t)
    w = weights_from_checkpoint(cfg, read_safetensors(tmp_path / "m.safetensors"), 0, "gpt_oss")
    gu = t[p + "experts.gate_up_proj"]
    assert np.array_equal(w.wg[3, :, 5], gu[3, :, 10]) and np.array_equal(w.wu[3, :, 5],
                                                                          gu[3, :, 11])
    assert np.array_equal(w.bu[2, 7], t[p + "experts.gate_up_proj_bias"][2, 15])
    assert np.array_equal(w.router_bias, t[p + "router.bias"])
    y, r = moe_forward(cfg, w, random_tokens(cfg, 0))
    assert np.isfinite(y.astype(np.float32)).all() and r.experts.shape == (16, 4)
