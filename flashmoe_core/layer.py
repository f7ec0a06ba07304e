"""The GPU layer: one persistent fused kernel per forward pass.

    layer = MoELayer(cfg, weights)          # compiles (first time), uploads weights once
    y = layer(x)                            # NumPy in -> NumPy out (copies)
    y = layer(x_gpu, stream=s)              # DLPack GPU tensor in -> same kind out (no copy)
    y, routing = layer(x, return_routing=True)

Inputs are validated before anything is launched. The DLPack path is stream-ordered
and never synchronises the host, so it can be captured in a CUDA graph (pass ``out``
so no allocation happens inside the capture).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import env
from .config import MoEConfig
from .host import launch as _launch
from .host import memory
from .host.abi import (ABI_VERSION, FAULT_RECORD, MODES, MOE_LAYOUT, MOE_LAYOUT_POINTERS,
                       STATE, STATE_WORDS, decode_fault)
from .host.device import get_device
from .host.errors import FlashMoEError, FlashMoETimeout, KernelFault
from .host.tensors import export_tensor, is_dlpack_gpu_tensor, view_tensor
from .jit import compile_kernel, target_arch
from .kernels import moe_spec
from .numerics import round_to, storage_dtype
from .plan import plan_layer
from .reference import Routing
from .weights import MoEWeights

__all__ = ["MoELayer"]

_PHASES = {1: "grid barrier after the gate", 2: "grid barrier after top-k",
           3: "grid barrier after the scan", 4: "grid barrier after the dispatch lists",
           5: "task-ring slot", 6: "task ring capacity"}


class MoELayer:
    """A Mixture-of-Experts layer on one GPU.

    Parameters
    ----------
    cfg : MoEConfig
        ``cfg.tokens`` is the largest token count a call may carry.
    weights : MoEWeights
        Uploaded once (transposed to K-major for the tensor cores).
    device : int, optional
        GPU ordinal (default: the current one, else 0).
    timeout_s : float, optional
        Bound of every device-side wait (default ``FLASHMOE_TIMEOUT_S`` or 10 s).
    """

    def __init__(self, cfg: MoEConfig, weights: MoEWeights, device: Optional[int] = None,
                 timeout_s: Optional[float] = None) -> None:
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        if not isinstance(weights, MoEWeights) or weights.cfg != cfg:
            raise ValueError("weights must be MoEWeights built for this same config")
        if cfg.world_size != 1:
            raise ValueError(f"MoELayer runs one GPU (world_size=1); cfg.world_size="
                             f"{cfg.world_size}. Expert parallelism across GPUs is not "
                             "available yet.")
        if weights.expert_ids != tuple(range(cfg.experts)):
            raise ValueError("a single-GPU layer needs the weights of every expert")
        self.cfg = cfg
        self.plan = plan_layer(cfg)
        self._timeout_s = env.timeout_s() if timeout_s is None else float(timeout_s)
        if not 0 < self._timeout_s <= 3600:
            raise ValueError(f"timeout_s={timeout_s} must be in (0, 3600] seconds")
        self.device = get_device(device)
        self.arch = target_arch(self.device)
        self._stream = self.device.create_stream()
        self._dtype = storage_dtype(cfg.dtype)

        kernel = compile_kernel(moe_spec(cfg), self.arch)
        self._module = _launch.Module(kernel.cubin, name="moe_fused")
        abi = int(self._module.read_global("flashmoe_moe_abi", np.uint32)[0])
        if abi != ABI_VERSION:
            raise FlashMoEError(f"kernel ABI {abi} differs from host ABI {ABI_VERSION}; "
                                "clear the kernel cache (FLASHMOE_CACHE_DIR)")
        self._kernel = self._module.kernel("flashmoe_moe_forward")
        self.smem = int(self._module.read_global("flashmoe_moe_smem", np.int32)[0])
        self._module.ensure_smem(self._kernel, self.smem, self.device)
        self.grid, self.blocks_per_sm = _launch.resident_grid(self._kernel, self.device, 128,
                                                              self.smem)
        self._check_memory()
        self._buffers = {}
        self._upload_weights(weights)
        self._allocate_workspace()
        self._fault = memory.PinnedArray(FAULT_RECORD)
        self._layout = self._make_layout()

    # ------------------------------------------------------------------ setup
    def _check_memory(self) -> None:
        from cuda.bindings import driver

        from .host.driver import check

        free, total = check(driver.cuMemGetInfo(), "querying GPU memory")
        need = self.plan.total_bytes
        if need > 0.95 * free:
            raise FlashMoEError(
                f"the layer needs {need / 2**30:.2f} GiB of GPU memory, {free / 2**30:.2f} GiB "
                f"of {total / 2**30:.2f} GiB is free; lower MoEConfig.tokens (the bound) or "
                f"the layer size\n{self.plan.describe()}")

    def _upload(self, name: str, array: np.ndarray) -> None:
        self._buffers[name] = memory.upload(self.device, np.ascontiguousarray(array),
                                            self._stream)

    def _upload_weights(self, w: MoEWeights) -> None:
        # The tensor cores read both operands K-major: store W^T (out x in).
        self._upload("router_t", w.router.T)
        if self.cfg.mlp == "vanilla":
            self._upload("w_up", w.w1.transpose(0, 2, 1))
            self._upload("b_up", w.b1)
            self._upload("w_down", w.w2.transpose(0, 2, 1))
            self._upload("b_down", w.b2)
        else:
            self._upload("w_up", w.wg.transpose(0, 2, 1))
            self._upload("w_up2", w.wu.transpose(0, 2, 1))
            self._upload("w_down", w.w2.transpose(0, 2, 1))

    def _allocate_workspace(self) -> None:
        for name, nbytes in self.plan.workspace.items():
            self._buffers[name] = memory.alloc(self.device, nbytes, self._stream)
        for name in ("state", "ring", "dep_rowtile", "dep_combine"):
            memory.zero(self._buffers[name], self._stream)
        self._stream.sync()

    def _ptr(self, name: str) -> int:
        buf = self._buffers.get(name)
        return 0 if buf is None else int(buf.handle)

    def _make_layout(self):
        rec = np.zeros((), dtype=MOE_LAYOUT)
        for name in MOE_LAYOUT_POINTERS:
            rec[name] = self._fault.ptr if name == "fault" else self._ptr(name)
        rec["timeout_ns"] = int(self._timeout_s * 1e9)
        rec["max_tokens"] = self.cfg.tokens
        rec["experts"] = self.cfg.experts
        rec["local_experts"] = self.cfg.experts
        rec["first_expert"] = 0
        rec["max_rowtiles"] = self.plan.max_rowtiles
        rec["ring_capacity"] = self.plan.ring_capacity
        rec["rank"] = 0
        rec["world"] = 1
        return memory.upload(self.device, np.frombuffer(rec.tobytes(), np.uint8), self._stream)

    # ------------------------------------------------------------------ calls
    def _validate(self, shape, dtype, contiguous: bool = True) -> int:
        if len(shape) != 2 or shape[1] != self.cfg.hidden:
            raise ValueError(f"x has shape {tuple(shape)}; expected [tokens, hidden="
                             f"{self.cfg.hidden}]")
        t = int(shape[0])
        if not 1 <= t <= self.cfg.tokens:
            raise ValueError(f"x carries {t} tokens; this layer takes 1..{self.cfg.tokens} "
                             "(MoEConfig.tokens is the bound; build a layer with a larger one)")
        if np.dtype(dtype) != self._dtype:
            raise ValueError(f"x has dtype {np.dtype(dtype)}; this layer stores {self._dtype} "
                             f"(dtype={self.cfg.dtype!r}); convert it first")
        if not contiguous:
            raise ValueError("x must be C-contiguous (rows of hidden elements)")
        return t

    def check_fault(self) -> None:
        """Raise the fault a previous launch recorded, if any (reads pinned memory)."""
        rec = self._fault.array
        if int(rec["code"][0]) == 0:
            return
        info = decode_fault(rec.tobytes())
        self._recover()
        phase = _PHASES.get(info["phase"], f"phase {info['phase']}")
        if info["code_name"] == "timeout":
            raise FlashMoETimeout(
                f"the fused MoE kernel gave up waiting at the {phase}: block {info['block']} "
                f"(task {info['task']}) saw {info['counter']} of {info['expected']} after "
                f"{info['elapsed_ns'] / 1e9:.3f} s (rank {info['rank']}, peer {info['peer']})",
                info)
        raise KernelFault(f"the fused MoE kernel stopped: {info['code_name']} at the {phase} "
                          f"(block {info['block']}, value {info['counter']}, limit "
                          f"{info['expected']})", info)

    def _recover(self) -> None:
        # A failed launch leaves counters mid-way: clear them for the next launch.
        self._stream.sync()
        for name in ("state", "ring", "dep_rowtile", "dep_combine"):
            memory.zero(self._buffers[name], self._stream)
        self._stream.sync()
        self._fault.array[...] = np.zeros((), FAULT_RECORD)

    def _launch(self, stream, x_ptr: int, y_ptr: int, tokens: int, mode: str) -> None:
        cap = self.cfg.capacity(tokens)
        args = (np.uint64(int(self._layout.handle)), np.uint64(x_ptr), np.uint64(y_ptr),
                np.int32(tokens), np.int32(-1 if cap is None else cap), np.int32(MODES[mode]))
        _launch.launch_kernel(stream, self._kernel, (self.grid, 1, 1), (128, 1, 1), args,
                              smem=self.smem)

    def __call__(self, x: Any, out: Any = None, stream: Any = None,
                 return_routing: bool = False):
        """Forward pass.

        Parameters
        ----------
        x : numpy.ndarray or DLPack GPU tensor, [t, hidden], the storage dtype
            ``1 <= t <= cfg.tokens``.
        out : same kinds as x, optional
            Where to write y (GPU tensors only); required for CUDA-graph capture.
        stream : cuda.core Stream (or anything with ``__cuda_stream__``), optional
            Stream to run on (DLPack path); default: the layer's own stream.
        return_routing : bool
            Also return the kernel's Routing (synchronises).

        Returns
        -------
        y (and the Routing): NumPy for NumPy input; for GPU input ``out`` if given, else a
        new tensor of x's kind where possible (CuPy, PyTorch, JAX), else a DLPack view.
        """
        self.check_fault()
        if isinstance(x, np.ndarray):
            return self._call_numpy(x, out, return_routing)
        if not is_dlpack_gpu_tensor(x):
            raise TypeError(f"x must be a NumPy array or a DLPack GPU tensor, got "
                            f"{type(x).__name__}")
        return self._call_device(x, out, stream, return_routing)

    def _call_numpy(self, x: np.ndarray, out, return_routing: bool):
        if out is not None:
            raise ValueError("out= is for GPU tensors; NumPy input returns a new array")
        if self.cfg.dtype == "tfloat32" and x.dtype == np.float32:
            x = round_to(x, "tfloat32")
        t = self._validate(x.shape, x.dtype)
        x = np.ascontiguousarray(x)
        memory.copy_in(self._buffers["x_stage"], x, self._stream)
        self._launch(self._stream, self._ptr("x_stage"), self._ptr("y_stage"), t, "full")
        y = memory.download(self._buffers["y_stage"], (t, self.cfg.hidden), self._dtype,
                            self._stream)
        self.check_fault()
        if return_routing:
            return y, self.routing(t)
        return y

    def _call_device(self, x, out, stream, return_routing: bool):
        s, stream_ptr, capturing = _resolve_stream(self.device, self._stream, stream)
        if capturing and (out is None or return_routing):
            raise ValueError("while capturing a CUDA graph pass out= (no allocation inside "
                             "the capture) and return_routing=False (no synchronisation)")
        xv = view_tensor(x, stream_ptr)
        t = self._validate(xv.shape, xv.dtype, xv.is_c_contiguous)
        self._check_device(xv, "x")
        if out is not None:
            if not is_dlpack_gpu_tensor(out):
                raise TypeError("out must be a DLPack GPU tensor like x")
            ov = view_tensor(out, stream_ptr)
            if tuple(ov.shape) != (t, self.cfg.hidden) or ov.dtype != self._dtype or \
                    not ov.is_c_contiguous or ov.readonly:
                raise ValueError(f"out must be a writable C-contiguous [{t}, {self.cfg.hidden}] "
                                 f"{self._dtype} tensor; got {ov.shape} {ov.dtype}")
            self._check_device(ov, "out")
            y_ptr, result = ov.ptr, out
        else:
            buf = memory.alloc(self.device, t * self.cfg.hidden * self._dtype.itemsize, s)
            y_ptr, result = int(buf.handle), None
        self._launch(s, xv.ptr, y_ptr, t, "full")
        if result is None:
            result = export_tensor(buf, (t, self.cfg.hidden), self._dtype, like=x)
        if return_routing:
            s.sync()
            self.check_fault()
            return result, self.routing(t)
        return result

    def _check_device(self, view, name: str) -> None:
        if view.device_id != self.device.device_id:
            raise ValueError(f"{name} lives on GPU {view.device_id}; this layer runs on GPU "
                             f"{self.device.device_id}")
        if view.ptr % 16:
            raise ValueError(f"{name} must be 16-byte aligned (it is at {view.ptr:#x})")

    def routing(self, tokens: int) -> Routing:
        """The routing of the last forward pass of ``tokens`` tokens (synchronises)."""
        k = self.cfg.top_k
        s = self._stream
        experts = memory.download(self._buffers["topk_expert"], (tokens, k), np.int32, s)
        weights = memory.download(self._buffers["topk_weight"], (tokens, k), np.float32, s)
        rows = memory.download(self._buffers["token_rows"], (tokens, k), np.int32, s)
        return Routing(experts, weights, rows >= 0)

    def synchronize(self) -> None:
        """Wait for the layer's stream and raise any fault its kernels recorded."""
        self._stream.sync()
        self.check_fault()

    def stage(self, x: np.ndarray) -> int:
        """Copy x into the layer's input buffer; returns its token count (benchmarks)."""
        t = self._validate(x.shape, x.dtype)
        memory.copy_in(self._buffers["x_stage"], np.ascontiguousarray(x), self._stream)
        return t

    def launch_staged(self, tokens: int, mode: str = "full", stream=None) -> None:
        """Launch on the staged input and output buffers, stream-ordered (benchmarks)."""
        self._launch(self._stream if stream is None else stream, self._ptr("x_stage"),
                     self._ptr("y_stage"), tokens, mode)

    def staged_output(self, tokens: int) -> np.ndarray:
        """The staged output buffer as NumPy (synchronises, raises recorded faults)."""
        y = memory.download(self._buffers["y_stage"], (tokens, self.cfg.hidden), self._dtype,
                            self._stream)
        self.check_fault()
        return y

    @property
    def stream(self):
        """The layer's own stream."""
        return self._stream

    def buffer_ptr(self, name: str) -> int:
        """Device address of a weight or workspace buffer (plan names; benchmarks)."""
        if name not in self._buffers:
            raise KeyError(f"no buffer {name!r}; known: {sorted(self._buffers)}")
        return self._ptr(name)

    def run_mode(self, x: np.ndarray, mode: str) -> None:
        """Run a component on its own (tests): ``gate_only`` or ``dispatch_only``."""
        t = self.stage(x)
        self.launch_staged(t, mode)
        self.synchronize()

    def workspace(self, name: str, shape, dtype) -> np.ndarray:
        """Copy a workspace buffer out (tests and debugging)."""
        return memory.download(self._buffers[name], shape, dtype, self._stream)

    def fill_workspace(self, name: str, array: np.ndarray) -> None:
        """Copy an array into a workspace buffer (tests)."""
        memory.copy_in(self._buffers[name], np.ascontiguousarray(array), self._stream)

    def combine_only(self, tokens: int) -> np.ndarray:
        """Run only the combine on token_rows/topk_weight/y_expert as filled (tests)."""
        self._launch(self._stream, 0, self._ptr("y_stage"), tokens, "combine_only")
        y = memory.download(self._buffers["y_stage"], (tokens, self.cfg.hidden), self._dtype,
                            self._stream)
        self.check_fault()
        return y

    def state(self) -> dict:
        """The kernel's state words (epoch, counters) - for tests."""
        words = memory.download(self._buffers["state"], (STATE_WORDS,), np.uint32, self._stream)
        return {k: int(words[v]) for k, v in STATE.items()}

    def close(self) -> None:
        """Free the layer's GPU memory (also done when it is garbage collected)."""
        self._stream.sync()
        for buf in self._buffers.values():
            buf.close()
        self._buffers.clear()
        self._fault.close()


def _resolve_stream(device, default, stream):
    """(launch target, consumer stream pointer for DLPack, capturing a graph?)."""
    if stream is None:
        return default, int(default.handle), False
    from cuda.core import Stream

    if type(stream).__name__ == "GraphBuilder":
        return stream, -1, True  # ordering inside a capture is the capturer's business
    if isinstance(stream, Stream):
        return stream, int(stream.handle), False
    if hasattr(stream, "__cuda_stream__"):
        s = device.create_stream(stream)
        return s, int(s.handle), False
    raise TypeError(f"stream must be a cuda.core Stream or GraphBuilder, or expose "
                    f"__cuda_stream__; got {type(stream).__name__}")
