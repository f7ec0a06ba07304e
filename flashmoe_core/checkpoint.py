"""One MoE layer of a published checkpoint, without a framework.

    cfg = config_from_hf(json.load(open("config.json")), tokens=4096)
    tensors = read_safetensors(["model-00001-of-00004.safetensors", ...],
                               prefix="model.layers.3.")
    w = weights_from_checkpoint(cfg, tensors, layer=3, naming="mixtral")

:func:`read_safetensors` memory-maps the files and returns only the tensors whose names
start with ``prefix`` (bf16 stays bf16). The naming schemes, with the published tensor
names (``L`` the layer's prefix, ``j`` the expert) and how each maps onto
:class:`~flashmoe_core.weights.MoEWeights` (all PyTorch ``Linear`` weights are
[out, in] and are transposed):

==========  ==============================================  ============================
naming      tensors                                         MoEWeights
==========  ==============================================  ============================
mixtral     L.block_sparse_moe.gate.weight [E, H]           router = T
            L.block_sparse_moe.experts.j.w1.weight [F, H]   wg[j] = T
            L.block_sparse_moe.experts.j.w3.weight [F, H]   wu[j] = T
            L.block_sparse_moe.experts.j.w2.weight [H, F]   w2[j] = T
qwen3_moe,  L.mlp.gate.weight [E, H]                        router = T
olmoe,      L.mlp.experts.j.gate_proj.weight [F, H]         wg[j] = T
qwen2_moe   L.mlp.experts.j.up_proj.weight [F, H]           wu[j] = T
            L.mlp.experts.j.down_proj.weight [H, F]         w2[j] = T
deepseek_v3 the qwen names, and                             router, wg, wu, w2 as above
            L.mlp.gate.e_score_correction_bias [E]          selection_bias
            L.mlp.shared_experts.gate_proj.weight [S, H]    shared_wg = T
            L.mlp.shared_experts.up_proj.weight [S, H]      shared_wu = T
            L.mlp.shared_experts.down_proj.weight [H, S]    shared_w2 = T
qwen2_moe   also L.mlp.shared_expert.{gate,up,down}_proj    shared_wg, shared_wu, shared_w2
            L.mlp.shared_expert_gate.weight [1, H]          shared_gate = [0]
gpt_oss     L.mlp.router.weight [E, H], .bias [E]           router = T, router_bias
            L.mlp.experts.gate_up_proj [E, H, 2F]           wg = [..., 0::2], wu = [..., 1::2]
            L.mlp.experts.gate_up_proj_bias [E, 2F]         bg = [:, 0::2], bu = [:, 1::2]
            L.mlp.experts.down_proj [E, F, H], _bias [E, H] w2, b2 (as stored)
==========  ==============================================  ============================

``S`` is the shared MLP's width, ``n_shared * shared_ffn`` (DeepSeek-V3 stores its shared
experts as one MLP of that width already). A checkpoint's shared-expert tensors must
match the config: ones the config has no room for are refused with the tensor named,
never silently dropped.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Union

import numpy as np

from .config import MoEConfig
from .numerics import storage_dtype
from .weights import MoEWeights

__all__ = ["NAMINGS", "read_safetensors", "weights_from_checkpoint", "config_from_hf"]

NAMINGS = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss")

_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def read_safetensors(paths: Union[str, Path, Iterable[Union[str, Path]]],
                     prefix: str = "") -> Dict[str, np.ndarray]:
    """Tensors whose names start with ``prefix`` from ``.safetensors`` files, as
    read-only memory-mapped NumPy arrays in their stored type.

    Raises
    ------
    ValueError
        For a file that is not a safetensors file, or a dtype it cannot map.
    """
    files = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: Dict[str, np.ndarray] = {}
    for f in map(Path, files):
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                if not 2 <= n <= 100 * 2**20:
                    raise ValueError
                header = json.loads(fh.read(n))
        except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{f}: not a readable safetensors file ({exc or 'bad header'})") \
                from None
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__" or not name.startswith(prefix):
                continue
            kind = _ST_DTYPES.get(info.get("dtype"))
            if kind is None:
                raise ValueError(f"{f}: tensor {name} has dtype {info.get('dtype')!r}, which "
                                 f"this reader does not map (known: {sorted(_ST_DTYPES)})")
            begin, end = info["data_offsets"]
            dt = _np_dtype(kind)
            shape = tuple(info["shape"])
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
                raise ValueError(f"{f}: tensor {name} has {end - begin} bytes for shape {shape}")
            out[name] = np.memmap(f, dtype=dt, mode="r", offset=base + begin, shape=shape)
    return out


def _prefix(naming: str, layer: int) -> str:
    block = "block_sparse_moe" if naming == "mixtral" else "mlp"
    return f"model.layers.{layer}.{block}."


def _names(naming: str, layer: int, experts: int) -> Dict[str, list]:
    p = _prefix(naming, layer)
    if naming == "mixtral":
        ex = [(f"{p}experts.{j}.w1.weight", f"{p}experts.{j}.w3.weight",
               f"{p}experts.{j}.w2.weight") for j in range(experts)]
    else:
        ex = [(f"{p}experts.{j}.gate_proj.weight", f"{p}experts.{j}.up_proj.weight",
               f"{p}experts.{j}.down_proj.weight") for j in range(experts)]
    shared = f"{p}shared_experts." if naming == "deepseek_v3" else f"{p}shared_expert."
    return {"router": [f"{p}gate.weight"], "experts": ex,
            "selection_bias": [f"{p}gate.e_score_correction_bias"],
            "shared": [f"{shared}gate_proj.weight", f"{shared}up_proj.weight",
                       f"{shared}down_proj.weight"],
            "shared_gate": [f"{p}shared_expert_gate.weight"],
            "any_shared": [f"{p}shared_expert.", f"{p}shared_experts.",
                           f"{p}shared_expert_gate."]}


def _take(tensors: Mapping[str, np.ndarray], name: str, shape: tuple) -> np.ndarray:
    if name not in tensors:
        near = sorted(k for k in tensors if k.rsplit(".", 2)[0] == name.rsplit(".", 2)[0])[:5]
        raise ValueError(f"checkpoint tensor {name} is missing" +
                         (f" (beside it: {near})" if near else
                          "; is the naming or the layer index right?"))
    a = np.asarray(tensors[name])
    if a.shape != shape:
        raise ValueError(f"checkpoint tensor {name} has shape {a.shape}; this config expects "
                         f"{shape}")
    return a


def weights_from_checkpoint(cfg: MoEConfig, tensors: Mapping[str, np.ndarray], layer: int,
                            naming: str) -> MoEWeights:
    """The :class:`MoEWeights` of one layer from a mapping of checkpoint tensors.

    Parameters
    ----------
    cfg : MoEConfig
        Must describe the layer (``config_from_hf`` builds one); gated MLP.
    tensors : mapping of str to ndarray
        Checkpoint tensors by published name (e.g. from :func:`read_safetensors`).
    layer : int
        The decoder layer's index.
    naming : str
        One of :data:`NAMINGS`.

    Raises
    ------
    ValueError
        Naming the tensor that is missing, misshapen or not expressible.
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming={naming!r}: expected one of {NAMINGS}")
    if cfg.mlp != "gated":
        raise ValueError(f"{naming} experts are gated MLPs; build the config with mlp='gated'")
    names = _names(naming, int(layer), cfg.experts)
    wanted = set(names["shared"]) if cfg.n_shared else set()
    if cfg.shared_gate:
        wanted |= set(names["shared_gate"])
    for start in names["any_shared"]:
        extra = sorted(k for k in tensors if k.startswith(start) and k not in wanted)
        if extra:
            raise ValueError(f"checkpoint tensor {extra[0]} belongs to a shared expert this "
                             f"config has no room for (n_shared={cfg.n_shared}, shared_gate="
                             f"{cfg.shared_gate}); refusing to drop it silently")
    h, f, e = cfg.hidden, cfg.ffn, cfg.experts
    want = storage_dtype(cfg.dtype)
    cast = lambda a: np.ascontiguousarray(np.asarray(a).astype(np.float32).astype(want))  # noqa
    if naming == "gpt_oss":
        return _gpt_oss(cfg, tensors, _prefix(naming, int(layer)), cast)
    arrays = {"router": cast(_take(tensors, names["router"][0], (e, h)).T)}
    wg, wu, w2 = [], [], []
    for g, u, d in names["experts"]:
        wg.append(_take(tensors, g, (f, h)).T)
        wu.append(_take(tensors, u, (f, h)).T)
        w2.append(_take(tensors, d, (h, f)).T)
    arrays.update(wg=cast(np.stack(wg)), wu=cast(np.stack(wu)), w2=cast(np.stack(w2)))
    if cfg.n_shared:
        s = cfg.shared_width
        g, u, d = names["shared"]
        arrays.update(shared_wg=cast(_take(tensors, g, (s, h)).T),
                      shared_wu=cast(_take(tensors, u, (s, h)).T),
                      shared_w2=cast(_take(tensors, d, (h, s)).T))
    if cfg.shared_gate:
        arrays["shared_gate"] = cast(_take(tensors, names["shared_gate"][0], (1, h))[0])
    bias_name = names["selection_bias"][0]
    if cfg.selection_bias:
        arrays["selection_bias"] = np.asarray(_take(tensors, bias_name, (e,)), np.float32)
    elif bias_name in tensors:
        raise ValueError(f"checkpoint tensor {bias_name} is a selection bias but the config "
                         "has selection_bias=False")
    return MoEWeights(cfg, **arrays)


def _gpt_oss(cfg: MoEConfig, tensors, p: str, cast) -> MoEWeights:
    """GPT-OSS stores its experts as x @ W tensors with gate and up interleaved."""
    h, f, e = cfg.hidden, cfg.ffn, cfg.experts
    if not (cfg.router_bias and cfg.mlp_bias and cfg.softmax_after_topk
            and cfg.activation == "swiglu_clamped"):
        raise ValueError("gpt_oss layers need router_bias, mlp_bias, softmax_after_topk and "
                         "activation='swiglu_clamped' (config_from_hf sets them)")
    gate_up = _take(tensors, p + "experts.gate_up_proj", (e, h, 2 * f))
    gate_up_b = _take(tensors, p + "experts.gate_up_proj_bias", (e, 2 * f))
    return MoEWeights(
        cfg, router=cast(_take(tensors, p + "router.weight", (e, h)).T),
        router_bias=cast(_take(tensors, p + "router.bias", (e,))),
        wg=cast(gate_up[..., 0::2]), wu=cast(gate_up[..., 1::2]),
        bg=cast(gate_up_b[:, 0::2]), bu=cast(gate_up_b[:, 1::2]),
        w2=cast(_take(tensors, p + "experts.down_proj", (e, f, h))),
        b2=cast(_take(tensors, p + "experts.down_proj_bias", (e, h))))


def config_from_hf(hf: Mapping, tokens: int, dtype: Optional[str] = None,
                   **overrides) -> MoEConfig:
    """The :class:`MoEConfig` of a model's MoE layers from its ``config.json`` fields.

    Reads ``model_type`` to pick the rule (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3);
    ``tokens`` is the layer's token bound; ``dtype`` defaults to ``torch_dtype``;
    ``overrides`` replace any derived field.
    """
    kind = hf.get("model_type")
    if kind not in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"):
        raise ValueError(f"model_type={kind!r}: known MoE families are mixtral, qwen2_moe, "
                         "qwen3_moe, olmoe, deepseek_v3 and gpt_oss")
    if kind == "gpt_oss" and "num_experts_per_tok" not in hf and "experts_per_token" in hf:
        hf = dict(hf, num_experts_per_tok=hf["experts_per_token"])
    missing = [k for k in ("hidden_size", "num_experts_per_tok") if k not in hf]
    if missing:
        raise ValueError(f"the model config lacks {missing} (a {kind} config.json has them)")
    act = hf.get("hidden_act", "silu")
    if kind == "gpt_oss":
        act = "silu"  # its experts' activation is the clamped SwiGLU, set below
    if act not in ("silu", "gelu", "relu"):
        raise ValueError(f"hidden_act={act!r} has no counterpart (silu, gelu, relu)")
    dt = dtype or {"bfloat16": "bfloat16", "float16": "float16",
                   "float32": "float32"}.get(hf.get("torch_dtype"), "bfloat16")
    common = dict(tokens=tokens, hidden=int(hf["hidden_size"]), mlp="gated", activation=act,
                  dtype=dt, top_k=int(hf["num_experts_per_tok"]))
    if kind == "mixtral":
        d = dict(common, ffn=int(hf["intermediate_size"]),
                 experts=int(hf["num_local_experts"]), renormalize=True,
                 router_logits="storage")
    elif kind == "gpt_oss":
        d = dict(common, ffn=int(hf["intermediate_size"]),
                 experts=int(hf["num_local_experts"]), softmax_after_topk=True,
                 router_bias=True, router_logits="storage", mlp_bias=True,
                 activation="swiglu_clamped",
                 swiglu_limit=float(hf.get("swiglu_limit", 7.0)), swiglu_alpha=1.702)
    elif kind in ("qwen2_moe", "qwen3_moe", "olmoe"):
        ffn = hf.get("moe_intermediate_size", hf.get("intermediate_size"))
        d = dict(common, ffn=int(ffn), experts=int(hf["num_experts"]),
                 renormalize=bool(hf.get("norm_topk_prob", kind != "olmoe")),
                 router_logits="storage")
        if kind == "qwen2_moe" and int(hf.get("shared_expert_intermediate_size", 0)):
            # One shared expert of its own width behind a sigmoid gate.
            d.update(n_shared=1, shared_ffn=int(hf["shared_expert_intermediate_size"]),
                     shared_gate=True)
    else:  # deepseek_v3
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"scoring_func={hf.get('scoring_func')!r}: deepseek_v3 scores "
                             "with a sigmoid")
        d = dict(common, ffn=int(hf["moe_intermediate_size"]),
                 experts=int(hf["n_routed_experts"]), scoring="sigmoid",
                 selection_bias=hf.get("topk_method", "noaux_tc") == "noaux_tc",
                 n_group=int(hf.get("n_group", 1)), topk_group=int(hf.get("topk_group", 1)),
                 routed_scaling=float(hf.get("routed_scaling_factor", 1.0)),
                 renormalize=bool(hf.get("norm_topk_prob", True)),
                 n_shared=int(hf.get("n_shared_experts") or 0))
        if d["n_shared"]:
            d["shared_ffn"] = d["ffn"]
    d.update(overrides)
    return MoEConfig(**d)
