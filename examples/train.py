"""Fit a small MoE layer to a target layer: forward, backward and SGD steps.

    python examples/train.py                    # NumPy arrays, the fused kernels on the
                                                # CPU emulator (no GPU needed)
    python examples/train.py --dlpack           # the same loop on DLPack tensors
    python examples/train.py --backend gpu      # the same, the kernels on a GPU
    python examples/train.py --backend gpu --dlpack   # CuPy arrays on the GPU

What runs where: the layer's forward and backward are the fused kernels, on the
emulator (``--backend emulator``, the default) or the GPU; the loss, its gradient and
the optimizer step are NumPy on the host; the target layer is the NumPy oracle. With
``--dlpack`` the loop hands the layer tensors that speak only DLPack: on a CPU a small
stand-in (``CpuTensor`` below: what a framework's CPU tensor offers) read back with
``np.from_dlpack``; on a GPU CuPy arrays, and the results come back as CuPy arrays.
"""

from __future__ import annotations

import argparse

import numpy as np

from flashmoe_core import MoEConfig, MoELayer, MoEWeights, moe_forward, random_tokens


class CpuTensor:
    """A CPU tensor that offers DLPack and nothing else (a framework's tensor here)."""

    def __init__(self, array: np.ndarray) -> None:
        self._a = np.ascontiguousarray(array)

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def tensor_kind(backend: str, dlpack: bool):
    """(to_tensor, to_numpy) for the loop's inputs and outputs."""
    if not dlpack:
        return (lambda a: a), (lambda t: t)
    if backend == "gpu":
        import cupy

        return cupy.asarray, cupy.asnumpy
    return CpuTensor, np.from_dlpack


def train(backend: str = "emulator", dlpack: bool = False, steps: int = 40, lr: float = 0.4,
          say=print) -> list:
    """Fit a layer to a target layer; returns the loss of every step."""
    cfg = MoEConfig(tokens=64, hidden=64, ffn=96, experts=4, top_k=2, mlp="gated",
                    activation="relu", dtype="float32")
    target = MoEWeights.random(cfg, seed=1)
    weights = MoEWeights.random(cfg, seed=2)
    layer = MoELayer(cfg, weights, backend=backend)
    to_tensor, to_numpy = tensor_kind(backend, dlpack)
    batches = [random_tokens(cfg, seed=100 + i) for i in range(4)]
    targets = [moe_forward(cfg, target, x)[0] for x in batches]
    arrays = {n: a.copy() for n, a in weights.arrays().items()}
    velocity = {n: np.zeros_like(a) for n, a in arrays.items()}
    losses = []
    for step in range(steps):
        x, want = batches[step % len(batches)], targets[step % len(batches)]
        y, saved = layer(to_tensor(x), save_for_backward=True)
        err = to_numpy(y) - want
        loss = 0.5 * float(np.mean(err * err))
        dy = (err / err.size).astype(np.float32)         # d loss / d y
        _, grads = layer.backward(to_tensor(dy), saved)  # dx unused: x is data here
        for name, g in grads.arrays().items():           # SGD with momentum
            velocity[name] = 0.9 * velocity[name] + to_numpy(g)
            arrays[name] -= np.float32(lr) * velocity[name]
        layer.set_weights(MoEWeights(cfg, **arrays))
        losses.append(loss)
        if step % 5 == 0 or step == steps - 1:
            say(f"step {step:3d}  loss {loss:.6f}")
    layer.close()
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("emulator", "gpu"), default="emulator")
    p.add_argument("--dlpack", action="store_true", help="the loop on DLPack tensors")
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args(argv)
    losses = train(a.backend, a.dlpack, a.steps)
    print(f"loss {losses[0]:.6f} -> {losses[-1]:.6f} in {len(losses)} steps")
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
