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
Then a training step on the same input (grads reset to None, forward,
backward(dy)): the layer's, and for scale the same step through a trivial
Python torch.autograd.Function (y = 2x; dx = 2 dy) and through native
autograd (x * 2). The layer's step costs what autograd and a Python
Function cost, plus its two binding calls; on CUDA, autograd also hands
the backward to its device thread.

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
from kasmina.bench import training_step


def measure(rows, calls, repeats, sync):
    """Median and best us per call of each row's function, interleaved.

    rows: name -> (fn, grad). The rows take turns within each repeat (one
    batch of `calls` calls of each row, then the next repeat), so a change of
    the host's speed during the run (other tenants, frequency) moves every
    row alike instead of whichever row ran then; the median of the repeats
    and the fastest repeat are reported.
    """
    for fn, grad in rows.values():
        with torch.set_grad_enabled(grad):
            for _ in range(200):
                fn()
    sync()
    times = {name: [] for name in rows}
    for _ in range(repeats):
        for name, (fn, grad) in rows.items():
            with torch.set_grad_enabled(grad):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                sync()
                times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


class _Double(torch.autograd.Function):
    """y = 2x through a Python autograd.Function: the floor of a step through one."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, dy):
        return dy * 2


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

    op_args = (x, layer.seed_stage, layer.seed_kind, layer.seed_blueprint, layer.alpha,
               layer.weights, layer.scales,
               layer.workspace if dev.type == "cuda" else None, None, 1e-6, None, None, None,
               "auto")
    y = torch.empty_like(x)
    tel = torch.empty(8, 8, device=dev)
    nf = torch.empty(8, dtype=torch.int64, device=dev)
    b = _ops.resolve_backend("auto", x)
    stream = None  # the binding asks PyTorch for the current stream
    ws = layer.workspace if dev.type == "cuda" else None
    raw = (x, y, tel, nf, layer.seed_stage, layer.seed_kind, layer.seed_blueprint,
           layer.alpha.detach(), layer.weights.detach(), layer.scales.detach(), ws, 1e-6,
           None, None, b, stream)
    module_call = torch.nn.Module.__call__
    # The parts' arguments bound once: `layer.alpha` in a lambda would time
    # nn.Module.__getattr__ (a Python method, ~1-2 us) too, which the layer's
    # own call never runs (it reads the module's dicts).
    alpha, weights, scales = layer.alpha, layer.weights, layer.scales
    buffers, config = layer._buffers, layer._config
    eager_ok, layer_call, layer_forward = _ops.eager_ok, _C.layer_call, _C.layer_forward
    # name -> (function, gradients enabled); every row but the second runs
    # under no_grad.
    rows = {
        "layer": (lambda: layer(x), False),
        "layer_grad": (lambda: layer(x), True),
        "op": (lambda: torch.ops.kasmina.forward(*op_args), False),
        "binding": (lambda: _C.forward(*raw), False),
        "add": (lambda: x + 1, False),
        # Where the layer's time goes: its parts, each alone.
        "nn.Module.__call__ + layer.forward": (lambda: module_call(layer, x), False),
        "layer.forward (no Module.__call__)": (lambda: layer.forward(x), False),
        "_C.layer_call (KasminaLayer.__call__)": (lambda: layer_call(layer, x), False),
        "torch.empty_like(x)": (
            lambda: torch.empty_like(x, memory_format=torch.contiguous_format), False),
        "_ops.eager_ok(x, 3 params)": (lambda: eager_ok(x, alpha, weights, scales), False),
        "_C.layer_forward (the binding)": (
            lambda: layer_forward(x, y, alpha, weights, scales, buffers, config, "auto"), False),
        "nothing (the timing loop itself)": (lambda: None, False),
    }
    # The torch state that _C.layer_call reads on every call, each call alone
    # from Python (the binding calls the same C functions without the
    # Python frame, so these are upper bounds).
    C = torch._C
    group = (x, alpha, weights, scales)
    rows.update({
        "torch._C._has_torch_function(4 tensors)": (lambda: C._has_torch_function(group), False),
        "torch._C._len_torch_dispatch_stack()": (C._len_torch_dispatch_stack, False),
        "functorch peek_interpreter_stack()": (C._functorch.peek_interpreter_stack, False),
        "torch._C._get_tracing_state()": (C._get_tracing_state, False),
        "torch._C.is_grad_enabled()": (C.is_grad_enabled, False),
        "x.is_neg()": (x.is_neg, False),
        "x._version": (lambda: x._version, False),
        "torch.compiler.is_compiling()": (torch.compiler.is_compiling, False),
        "torch.compiler.is_dynamo_compiling()": (
            getattr(torch.compiler, "is_dynamo_compiling", lambda: False), False),
    })
    if dev.type == "cuda":
        rows["torch._C._cuda_getDevice()"] = (C._cuda_getDevice, False)
        rows["torch._C._cuda_isCurrentStreamCapturing()"] = (
            C._cuda_isCurrentStreamCapturing, False)
    r = measure(rows, args.calls, args.repeats, sync)

    dy = torch.randn_like(x)
    steps = {
        "layer": (training_step(layer, x, dy, [alpha, weights, scales]), True),
        "Python autograd.Function (y = 2x)": (training_step(_Double.apply, x, dy, []), True),
        "native autograd (x * 2)": (training_step(lambda t: t * 2, x, dy, []), True),
    }
    step_calls = max(100, args.calls // 10)
    rs = measure(steps, step_calls, args.repeats, sync)

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {dev} ({name}), torch {torch.__version__}, kasmina {kasmina.__version__}")
    print(f"DLPack C exchange API: {_C.has_exchange_api(x)}")
    print(f"(median of {args.repeats} repeats of {args.calls} calls, rows interleaved; "
          "best repeat in brackets)")
    print(f"KasminaLayer.forward      {r['layer'][0]:8.2f} us/call (no_grad)   [{r['layer'][1]:.2f}]")
    print(f"KasminaLayer.forward      {r['layer_grad'][0]:8.2f} us/call (params require grad)   "
          f"[{r['layer_grad'][1]:.2f}]")
    print(f"torch.ops.kasmina.forward {r['op'][0]:8.2f} us/call   [{r['op'][1]:.2f}]")
    print(f"kasmina._C.forward        {r['binding'][0]:8.2f} us/call   [{r['binding'][1]:.2f}]")
    print(f"x + 1 (trivial torch op)  {r['add'][0]:8.2f} us/call   [{r['add'][1]:.2f}]")
    print(f"layer overhead vs x + 1:  {r['layer'][0] / r['add'][0]:8.1f}x")
    print("parts (each alone, no_grad):")
    for k in list(rows)[5:]:
        print(f"  {k:38s} {r[k][0]:8.2f} us/call   [{r[k][1]:.2f}]")
    print(f"training step (grads reset, forward, backward; {args.repeats} repeats of "
          f"{step_calls} steps):")
    for k, (med, best) in rs.items():
        print(f"  {k:38s} {med:8.2f} us/step   [{best:.2f}]")


if __name__ == "__main__":
    main()
