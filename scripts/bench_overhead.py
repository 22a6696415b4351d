#!/usr/bin/env python3
"""Eager per-call host overhead of KasminaLayer.forward, in microseconds.

A tiny input (8 rows x 64 features, 8 seeds, all GRAFTING) makes the kernel's
own work negligible, so the median wall time per call is the cost of getting
there. Rows, from the full module call down to the bare binding:
- KasminaLayer.forward under no_grad (the eager path: KasminaLayer.__call__
  calls _C.layer_call, which runs nn.Module.__call__'s and forward's eager
  checks, allocates y and launches; telemetry written into the buffers);
- KasminaLayer.forward with gradients (through kasmina._ops.EagerForward, a
  torch.autograd.Function; forward only, no backward);
- torch.ops.kasmina.forward (the registered custom op: torch.library's Python
  dispatch; what torch.compile sees);
- kasmina._C.forward (the bare binding: DLPack C exchange views, checks,
  launch);
- x + 1, a trivial torch op on the same tensor.

    python scripts/bench_overhead.py [--device cpu|cuda] [--calls 5000]

On a busy CPU machine run it with OMP_NUM_THREADS=1: the CPU backend's
OpenMP team otherwise waits for cores taken by other processes, which is
scheduling noise, not call overhead.
"""

import argparse
import statistics
import time

import torch

import kasmina
from kasmina import _C, _ops


# The fastest repeat of the latest measurement: on a noisy host (other
# tenants, frequency changes) the median moves by tens of percent between
# runs, the best repeat much less.
BEST = [0.0]


def per_call_us(fn, calls, repeats, sync):
    for _ in range(200):
        fn()
    sync()
    medians = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        medians.append((time.perf_counter() - t0) / calls * 1e6)
    BEST[0] = min(medians)
    return statistics.median(medians)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    layer = kasmina.KasminaLayer(64, 8)
    for s in range(8):
        layer.germinate(s, s % 4)
        layer.transition(s, "TRAINING")
        layer.transition(s, "GRAFTING")
    layer.to(dev)
    x = torch.randn(8, 64, device=dev)

    grad_us = per_call_us(lambda: layer(x), args.calls, args.repeats, sync)
    grad_best = BEST[0]
    with torch.no_grad():
        layer_us = per_call_us(lambda: layer(x), args.calls, args.repeats, sync)
        layer_best = BEST[0]
        op_args = (x, layer.seed_stage, layer.seed_kind, layer.seed_blueprint, layer.alpha,
                   layer.weights, layer.scales,
                   layer.workspace if dev.type == "cuda" else None, None, 1e-6, None, None, None,
                   "auto")
        op_us = per_call_us(lambda: torch.ops.kasmina.forward(*op_args), args.calls,
                            args.repeats, sync)
        y = torch.empty_like(x)
        tel = torch.empty(8, 8, device=dev)
        nf = torch.empty(8, dtype=torch.int64, device=dev)
        b = _ops.resolve_backend("auto", x)
        stream = None  # the binding asks PyTorch for the current stream
        ws = layer.workspace if dev.type == "cuda" else None
        raw = (x, y, tel, nf, layer.seed_stage, layer.seed_kind, layer.seed_blueprint,
               layer.alpha.detach(), layer.weights.detach(), layer.scales.detach(), ws, 1e-6,
               None, None, b, stream)
        binding_us = per_call_us(lambda: _C.forward(*raw), args.calls, args.repeats, sync)
        binding_best = BEST[0]
        add_us = per_call_us(lambda: x + 1, args.calls, args.repeats, sync)
        add_best = BEST[0]
        # Where the layer's time goes: its parts, each alone.
        module_call = torch.nn.Module.__call__
        parts = {
            "nn.Module.__call__ + layer.forward": lambda: module_call(layer, x),
            "layer.forward (no Module.__call__)": lambda: layer.forward(x),
            "_C.layer_call (KasminaLayer.__call__)": lambda: _C.layer_call(layer, x),
            "torch.empty_like(x)": lambda: torch.empty_like(x, memory_format=torch.contiguous_format),
            "_ops.eager_ok(x, 3 params)": lambda: _ops.eager_ok(x, layer.alpha, layer.weights,
                                                                layer.scales),
            "_C.layer_forward (the binding)": lambda: _C.layer_forward(
                x, y, layer.alpha, layer.weights, layer.scales, layer._buffers, layer._config,
                "auto"),
        }
        part_us = {k: per_call_us(f, args.calls, args.repeats, sync) for k, f in parts.items()}

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {dev} ({name}), torch {torch.__version__}, kasmina {kasmina.__version__}")
    print(f"DLPack C exchange API: {_C.has_exchange_api(x)}")
    print(f"(median of {args.repeats} repeats of {args.calls} calls; best repeat in brackets)")
    print(f"KasminaLayer.forward      {layer_us:8.2f} us/call (no_grad)   [{layer_best:.2f}]")
    print(f"KasminaLayer.forward      {grad_us:8.2f} us/call (params require grad)   [{grad_best:.2f}]")
    print(f"torch.ops.kasmina.forward {op_us:8.2f} us/call")
    print(f"kasmina._C.forward        {binding_us:8.2f} us/call   [{binding_best:.2f}]")
    print(f"x + 1 (trivial torch op)  {add_us:8.2f} us/call   [{add_best:.2f}]")
    print(f"layer overhead vs x + 1:  {layer_us / add_us:8.1f}x")
    print("parts (each alone, no_grad):")
    for k, v in part_us.items():
        print(f"  {k:34s} {v:8.2f} us/call")


if __name__ == "__main__":
    main()
