"""Command-line pieces shared by ``flashmoe_core.run`` and ``flashmoe_core.build``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional

from ..config import (ACTIVATIONS, CAPACITY_ORDERS, DTYPES, MLP_KINDS, ROUTER_LOGITS, SCORINGS,
                      MoEConfig)

__all__ = ["add_config_args", "config_from_args", "DEFAULTS", "EXIT_CODES", "exit_code",
           "error_line"]

# Exit status of every command line (README, "The command line").
EXIT_CODES = {
    0: "success",
    1: "a check failed (--check: the result differs from what it is compared with)",
    2: "bad input: a flag, a --config file or a value out of range",
    3: "the environment or toolchain: a bad FLASHMOE_* variable, an unusable cache "
       "folder, a missing or broken compiler, no GPU for --backend gpu, too little memory",
    4: "a kernel fault or timeout (the kernel stopped itself and said why)",
}


def exit_code(exc: BaseException) -> Optional[int]:
    """The exit status for an exception a command line caught (None: not ours to map)."""
    from ..env import EnvVarError
    from ..host.emulator import EmulatorError
    from ..host.errors import FlashMoEError, KernelFault

    if isinstance(exc, (KernelFault, EmulatorError)):
        return 4
    if isinstance(exc, (EnvVarError, FlashMoEError, MemoryError, OSError)):
        return 3
    if isinstance(exc, ValueError):
        return 2
    return None


def error_line(exc: BaseException, verbose: bool = False) -> str:
    """``error: ...`` in one line (a compiler's log, when there is one, follows it;
    ``verbose`` keeps every line of the message)."""
    from ..host.errors import CompileError

    if isinstance(exc, MemoryError):
        return ("error: out of memory while allocating the layer; lower --tokens or the "
                "layer size (--hidden, --ffn, --experts)")
    text = str(exc).strip() or type(exc).__name__
    if verbose or isinstance(exc, CompileError):
        return f"error: {text}"
    first, _, rest = text.partition("\n")
    return f"error: {first}" + (" [--verbose shows the details]" if rest else "")

# Defaults of the command line (the paper's layer shape, bf16, top-2, 64 experts).
DEFAULTS = dict(tokens=2048, hidden=2048, ffn=2048, experts=64, top_k=2, mlp="vanilla",
                activation="relu", dtype="bfloat16", capacity_factor=None, renormalize=True,
                world_size=None, placement=None)


def _placement(text: str):
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--placement {text!r}: expected comma-separated owner ranks, e.g. 0,0,1,1") from None


def _capacity(text: str):
    if text.lower() in ("none", "dropless"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--capacity-factor {text!r}: expected a number or 'none'") from None


def add_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per MoEConfig field, plus --config FILE (flags override the file)."""
    g = p.add_argument_group("layer configuration (flags override --config)")
    g.add_argument("--config", type=Path, metavar="FILE",
                   help="JSON file with MoEConfig fields (MoEConfig.to_json writes one)")
    g.add_argument("--tokens", type=int, help=f"tokens per rank (default {DEFAULTS['tokens']})")
    g.add_argument("--hidden", type=int, help=f"model width (default {DEFAULTS['hidden']})")
    g.add_argument("--ffn", type=int, help=f"expert width (default {DEFAULTS['ffn']})")
    g.add_argument("--experts", type=int, help=f"experts (default {DEFAULTS['experts']})")
    g.add_argument("--top-k", type=int, dest="top_k",
                   help=f"experts per token (default {DEFAULTS['top_k']})")
    g.add_argument("--mlp", choices=MLP_KINDS, help="expert MLP kind (default vanilla)")
    g.add_argument("--activation", choices=ACTIVATIONS, help="activation (default relu)")
    g.add_argument("--dtype", choices=DTYPES, help="element type (default bfloat16)")
    g.add_argument("--capacity-factor", type=_capacity, dest="capacity_factor",
                   help="capacity factor, or 'none' for dropless (default none)")
    g.add_argument("--renormalize", dest="renormalize", action="store_true", default=None,
                   help="renormalise top-k weights to sum to 1 (default)")
    g.add_argument("--no-renormalize", dest="renormalize", action="store_false")
    g.add_argument("--world-size", type=int, dest="world_size",
                   help="ranks sharing the experts (default: the MPI world size)")
    g.add_argument("--placement", type=_placement,
                   help="owner rank of every expert, comma-separated (default: blocks)")
    r = p.add_argument_group("routing rules (MoEConfig; defaults: softmax, then top-k)")
    r.add_argument("--scoring", choices=SCORINGS, help="softmax over experts or sigmoid each")
    r.add_argument("--softmax-after-topk", dest="softmax_after_topk", action="store_true",
                   default=None, help="top-k by logit, then a softmax over the k (GPT-OSS)")
    r.add_argument("--router-bias", dest="router_bias", action="store_true", default=None,
                   help="a bias per expert on the logits")
    r.add_argument("--selection-bias", dest="selection_bias", action="store_true",
                   default=None, help="a bias per expert that only chooses (DeepSeek-V3)")
    r.add_argument("--n-group", type=int, dest="n_group", help="expert groups (default 1)")
    r.add_argument("--topk-group", type=int, dest="topk_group",
                   help="groups eligible per token (default 1)")
    r.add_argument("--routed-scaling", type=float, dest="routed_scaling",
                   help="factor on every combine weight (default 1)")
    r.add_argument("--router-logits", choices=ROUTER_LOGITS, dest="router_logits",
                   help="float32 logits, or rounded to the storage type (default float32)")
    r.add_argument("--capacity-order", choices=CAPACITY_ORDERS, dest="capacity_order",
                   help="drops in token order, or slot-major (default token)")
    r.add_argument("--renormalize-after-drop", dest="renormalize_after_drop",
                   action="store_true", default=None,
                   help="scale each token's kept weights to sum to routed_scaling")
    m = p.add_argument_group("experts (MoEConfig)")
    m.add_argument("--mlp-bias", dest="mlp_bias", action="store_true", default=None,
                   help="biases on the gated MLP's projections (GPT-OSS)")
    m.add_argument("--swiglu-alpha", type=float, dest="swiglu_alpha",
                   help="alpha of activation swiglu_clamped (default 1.702)")
    m.add_argument("--swiglu-limit", type=float, dest="swiglu_limit",
                   help="limit of activation swiglu_clamped (default 7)")
    m.add_argument("--n-shared", type=int, dest="n_shared",
                   help="shared experts on every token (default 0)")
    m.add_argument("--shared-ffn", type=int, dest="shared_ffn",
                   help="width of each shared expert (default: --ffn)")
    m.add_argument("--shared-gate", dest="shared_gate", action="store_true", default=None,
                   help="scale the shared output by sigmoid(x . w) (Qwen2-MoE)")


def config_from_args(args: argparse.Namespace, world_size: int = 1) -> MoEConfig:
    """Build the config: defaults, then --config FILE, then explicit flags.

    Raises ValueError (naming the field) for any bad value.
    """
    values = dict(DEFAULTS)
    if args.config is not None:
        try:
            text = args.config.read_text()
        except OSError as exc:
            raise ValueError(f"--config {args.config}: cannot read it ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise ValueError(f"--config {args.config}: not a text file; expected MoEConfig "
                             "JSON (MoEConfig.to_json writes one)") from None
        try:
            values.update(MoEConfig.from_json(text).to_dict())
        except ValueError as exc:
            raise ValueError(f"--config {args.config}: {exc}") from None
    for f in dataclasses.fields(MoEConfig):
        v: Optional[object] = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    if values.get("world_size") is None:
        values["world_size"] = world_size
    if isinstance(values.get("placement"), list):
        values["placement"] = tuple(values["placement"])
    return MoEConfig(**values)
