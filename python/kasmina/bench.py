"""`kasmina bench`: the KasminaLayer op against plain PyTorch, in one run.

For each shape, dtype and pass (forward; forward+backward) it times

* kasmina          - ``KasminaLayer.forward`` (and ``.backward``), the library op;
* eager            - ``kasmina.reference.forward``, the same math in PyTorch ops;
* compile          - the same under ``torch.compile``;
* graphs           - CUDA only: the kasmina call (forward; forward+backward
                     with the gradients' writes) captured once in a CUDA
                     graph on static inputs, then replayed: the time without
                     the host (the remedy for host-bound small batches,
                     docs/PYTHON.md);
* host             - the host's time per kasmina call (``time.perf_counter``
                     around the call; on CUDA without waiting for the GPU).
                     Where it comes close to the kasmina time the GPU
                     waited for the host: the row times the host (Python,
                     autograd, launches), not the kernels;
* floor            - a copy of the same bytes, measured in the same run:
                     forward: read x + write y (``y.copy_(x)``);
                     forward+backward: that + read x, dy + write dx
                     (``torch.add(x, dy, out=dx)``).

``% floor`` is floor time / op time (100% = as fast as moving the bytes).
CUDA: CUDA events, warm-up, L2 flushed before every timed call, median of
>= 50. CPU: ``time.perf_counter``, warm-up, median. Every seed is germinated
(kinds mixed) and walked to GRAFTING with alpha = 0.5 so the blend, the
telemetry and all blueprint gradients run.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

import kasmina

CUDA_SHAPES = "16384x4096:64,8192x768:16,16x4096:64"
CPU_SHAPES = "8192x768:16,1024x4096:64,16x4096:64"
QUICK_SHAPES = "1024x768:16,16x4096:64"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    rows: int
    hidden: int
    seeds: int

    def __str__(self) -> str:
        return f"{self.rows}x{self.hidden}:{self.seeds}"


def parse_shape(text: str) -> Shape:
    """``"NxH:S"`` -> Shape; raises ValueError with the expected form."""
    try:
        nh, s = text.strip().split(":")
        n, h = nh.lower().split("x")
        shape = Shape(int(n), int(h), int(s))
    except ValueError:
        raise ValueError(f"shape {text!r}: expected NxH:S, e.g. 8192x768:16") from None
    if shape.rows < 0 or shape.hidden <= 0 or shape.seeds <= 0 or shape.hidden % shape.seeds:
        raise ValueError(f"shape {text!r}: need N >= 0, H > 0, S > 0 and H % S == 0")
    return shape


def parse_shapes(text: str) -> list[Shape]:
    return [parse_shape(t) for t in text.split(",") if t.strip()]


def parse_dtypes(text: str) -> list[str]:
    out = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        if name not in DTYPES:
            raise ValueError(f"dtype {name!r}: expected one of float32, bfloat16, float16")
        canon = str(DTYPES[name]).removeprefix("torch.")
        if canon not in out:
            out.append(canon)
    return out


# --------------------------------------------------------------------------
# timing

class Timer:
    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.quick = quick
        self.cuda = device.type == "cuda"
        if self.cuda:
            # Larger than any L2 we target (H100: 50 MB), written before each call.
            self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device)

    host_ms: float | None = None  # the last call's median host time per fn()

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Median time of ``fn`` in milliseconds; ``host_ms`` then holds the
        median host time of one ``fn()`` (on CUDA not waiting for the GPU)."""
        if self.cuda:
            return self._cuda(fn)
        return self._cpu(fn)

    def _cuda(self, fn) -> float:
        for _ in range(3 if self.quick else 10):
            fn()
        torch.cuda.synchronize(self.device)
        reps = 50 if self.quick else 100
        pairs = []
        host = []
        for _ in range(reps):
            self.flush.zero_()
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
            b.record()
            pairs.append((a, b))
        torch.cuda.synchronize(self.device)
        self.host_ms = 1e3 * statistics.median(host)
        return statistics.median(a.elapsed_time(b) for a, b in pairs)

    def _cpu(self, fn) -> float:
        t0 = time.perf_counter()
        fn()  # warm-up (and a first estimate)
        first = time.perf_counter() - t0
        budget = 0.15 if self.quick else 1.0
        warm = 1 if self.quick else 2
        for _ in range(warm):
            fn()
        reps = int(min(200, max(5 if not self.quick else 3, budget / max(first, 1e-6))))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        self.host_ms = 1e3 * statistics.median(times)
        return self.host_ms


# --------------------------------------------------------------------------
# the cases

KIND_MIX = (kasmina.Kind.RESIDUAL, kasmina.Kind.ATTENTION, kasmina.Kind.MLP, kasmina.Kind.CONV)


def make_layer(shape: Shape, device: torch.device):
    """A layer whose every seed blends: kinds mixed, walked to GRAFTING, alpha 0.5."""
    layer = kasmina.KasminaLayer(shape.hidden, shape.seeds,
                                 max_blueprints=max(64, shape.seeds + 1)).to(device)
    chunk = shape.hidden // shape.seeds
    for s in range(shape.seeds):
        kind = KIND_MIX[s % len(KIND_MIX)]
        if kind == kasmina.Kind.CONV and chunk < 3:
            kind = kasmina.Kind.MLP
        layer.germinate(s, kind, strategy=kasmina.Strategy.FIXED_RAMP, ramp_steps=2)
        layer.transition(s, kasmina.Stage.TRAINING)
        layer.transition(s, kasmina.Stage.GRAFTING)
    layer.step(0.0)  # FIXED_RAMP with ramp_steps 2: alpha 0 -> 0.5
    stages = set(layer.stages())
    if stages != {kasmina.Stage.GRAFTING}:
        raise RuntimeError(f"bench setup: expected every seed GRAFTING, got {sorted(stages)}")
    with torch.no_grad():  # give the blueprints non-trivial values
        g = torch.Generator(device="cpu").manual_seed(0)
        layer.weights.add_((0.1 * torch.randn(layer.weights.shape, generator=g)).to(device))
    return layer


def reference_args(layer, device):
    infos = [layer.seed_info(s) for s in range(layer.num_seeds)]
    i32 = dict(dtype=torch.int32, device=device)
    stage = torch.tensor([int(i["stage"]) for i in infos], **i32)
    kind = torch.tensor([int(i["kind"]) for i in infos], **i32)
    blueprint = torch.tensor([int(i["blueprint"]) for i in infos], **i32)
    return stage, kind, blueprint


def training_step(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dy: torch.Tensor,
                  params) -> Callable[[], None]:
    """One training step of ``op`` as a call: the gradients of a copy of x
    (which requires grad) and of ``params`` reset to None, then
    ``op(x).backward(dy)``. Also scripts/bench_overhead.py's."""
    xg = x.detach().clone().requires_grad_()

    def run():
        xg.grad = None
        for p in params:
            p.grad = None
        op(xg).backward(dy)
    return run


def capture(step: Callable[[], Any], params, device: torch.device) -> Callable[[], None]:
    """``step`` captured in a CUDA graph on ``device``, returned as its
    replay: the warm-up on a side stream, then the gradients of ``params``
    set to None so that the captured backward writes them (PyTorch's
    whole-step recipe, docs/PYTHON.md). tests/python/test_gpu.py checks that
    its replays give eager's bits."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def bench_case(shape: Shape, dtype_name: str, device: torch.device, timer: Timer, *,
               compile_: bool, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    layer = make_layer(shape, device)
    stage, kind, blueprint = reference_args(layer, device)
    x = torch.randn(shape.rows, shape.hidden, device=device).to(dtype)
    dy = torch.randn(shape.rows, shape.hidden, device=device).to(dtype)
    y_out = torch.empty_like(x)
    dx_out = torch.empty_like(x)
    w = layer.weights.detach().clone().requires_grad_()
    sc = layer.scales.detach().clone().requires_grad_()
    al = layer.alpha.detach().clone().requires_grad_()
    ref = kasmina.reference.forward

    def ref_call(fn, xx):
        return fn(xx, stage, kind, blueprint, al, w, sc)[0]

    compiled = None
    if compile_:
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        compiled = torch.compile(ref, dynamic=False)

    def fwd(op):
        def run():
            with torch.no_grad():
                op(x)
        return run

    def fwdbwd(op, params):
        return training_step(op, x, dy, params)

    def graphs(pas: str) -> Callable[[], Any]:
        # Built at the first call (inside the timer's try: a failure is
        # reported as graphs_error, not raised), on a copy of the layer.
        built: dict[str, Callable[[], Any]] = {}

        def run():
            if "replay" not in built:
                gl = copy.deepcopy(layer)
                if pas == "fwd":
                    def step():
                        with torch.no_grad():
                            gl(x)
                    built["replay"] = capture(step, [], device)
                else:
                    xs = x.detach().clone().requires_grad_()
                    built["replay"] = capture(lambda: gl(xs).backward(dy),
                                              [xs, *gl.parameters()], device)
            built["replay"]()
        return run

    kasmina_op = layer
    eager_op = lambda xx: ref_call(ref, xx)  # noqa: E731
    comp_op = (lambda xx: ref_call(compiled, xx)) if compiled is not None else None  # noqa: E731
    lparams = [layer.weights, layer.scales, layer.alpha]
    rparams = [w, sc, al]

    # Same math? (a benchmark of a wrong answer is worthless)
    with torch.no_grad():
        yk = layer(x).float()
        yr = ref(x, stage, kind, blueprint, al, w, sc)[0].float()
        rel_err = float((yk - yr).norm() / yr.norm().clamp_min(1e-30)) if yr.numel() else 0.0

    elt = x.element_size() * shape.rows * shape.hidden
    rows = []
    for pas in PASSES:
        res: dict[str, Any] = {"shape": str(shape), "rows": shape.rows, "hidden": shape.hidden,
                               "seeds": shape.seeds, "dtype": dtype_name, "pass": pas,
                               "rel_err_vs_reference": rel_err, "kasmina_host_ms": None}
        if pas == "fwd":
            cases = {"kasmina": fwd(kasmina_op), "eager": fwd(eager_op),
                     "compile": fwd(comp_op) if comp_op else None,
                     "graphs": graphs(pas) if timer.cuda else None}
            floor = [lambda: y_out.copy_(x)]
            res["floor_bytes"] = 2 * elt
        else:
            cases = {"kasmina": fwdbwd(kasmina_op, lparams), "eager": fwdbwd(eager_op, rparams),
                     "compile": fwdbwd(comp_op, rparams) if comp_op else None,
                     "graphs": graphs(pas) if timer.cuda else None}
            floor = [lambda: y_out.copy_(x), lambda: torch.add(x, dy, out=dx_out)]
            res["floor_bytes"] = 5 * elt
        for name, fn in cases.items():
            if fn is None:
                res[f"{name}_ms"] = None
                continue
            progress(f"{shape} {dtype_name} {pas}: {name}")
            try:
                res[f"{name}_ms"] = timer(fn)
                if name == "kasmina":
                    res["kasmina_host_ms"] = timer.host_ms
            except Exception as exc:  # a failing baseline must not hide the others
                res[f"{name}_ms"] = None
                res[f"{name}_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        progress(f"{shape} {dtype_name} {pas}: floor")
        res["floor_ms"] = sum(timer(f) for f in floor)
        k = res["kasmina_ms"]
        res["floor_gbps"] = res["floor_bytes"] / (res["floor_ms"] * 1e6) if res["floor_ms"] else None
        res["pct_of_floor"] = 100.0 * res["floor_ms"] / k if k else None
        res["speedup_vs_eager"] = res["eager_ms"] / k if k and res["eager_ms"] else None
        res["speedup_vs_compile"] = res["compile_ms"] / k if k and res["compile_ms"] else None
        g = res["graphs_ms"]
        res["pct_of_floor_graphs"] = 100.0 * res["floor_ms"] / g if g else None
        rows.append(res)
    return rows


# --------------------------------------------------------------------------
# output

COLUMNS = (("shape", "shape", "{}"), ("dtype", "dtype", "{}"), ("pass", "pass", "{}"),
           ("kasmina_ms", "kasmina ms", "{:.4f}"), ("kasmina_host_ms", "host ms", "{:.4f}"),
           ("graphs_ms", "graphs ms", "{:.4f}"), ("pct_of_floor_graphs", "% floor graphs", "{:.0f}%"),
           ("eager_ms", "eager ms", "{:.4f}"),
           ("compile_ms", "compile ms", "{:.4f}"), ("floor_ms", "floor ms", "{:.4f}"),
           ("pct_of_floor", "% floor", "{:.0f}%"), ("speedup_vs_eager", "vs eager", "{:.2f}x"),
           ("speedup_vs_compile", "vs compile", "{:.2f}x"))


def _cell(row, key, fmt):
    v = row.get(key)
    return "-" if v is None else fmt.format(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    cells = [[h for _, h, _ in COLUMNS]] + [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in
                               enumerate(zip(c, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


HOST_MS_NOTE = ("host ms = the host's time per kasmina call (on CUDA not waiting for the GPU): "
                "where it comes close to kasmina ms, the row times the host, not the kernels")


def format_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|"
    body = ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    note = (f"Measured by `kasmina bench` on {meta['device_name']} ({meta['device']}), "
            f"torch {meta['torch']}, kasmina {meta['kasmina']}; {meta['method']}. "
            f"Shape is NxH:S; % floor = copy-floor time / kasmina time; {HOST_MS_NOTE}.")
    return "\n".join([note, "", head, sep, *body])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kasmina bench: --device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def run_bench(*, device: str = "auto", shapes: str | None = None, dtypes: str | None = None,
              quick: bool = False, compile_: bool = True,
              log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict[str, Any]:
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    notes = []
    if shapes is None:
        shapes = QUICK_SHAPES if quick else (CUDA_SHAPES if cuda else CPU_SHAPES)
        if not cuda and not quick:
            notes.append(f"CPU: default shapes are smaller than the CUDA ones ({CUDA_SHAPES}) "
                         "so the run finishes in a couple of minutes")
    if dtypes is None:
        dtypes = "float32,bfloat16" if cuda else "float32"
    shape_list = parse_shapes(shapes)
    dtype_list = parse_dtypes(dtypes)
    for n in notes:
        log(f"note: {n}")
    if cuda:
        dev_name = torch.cuda.get_device_name(dev)
        method = "CUDA events, warm-up, L2 flushed before every call, median of " + \
                 ("50" if quick else "100")
    else:
        import platform
        dev_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        method = "time.perf_counter, warm-up, median of 3-200 calls"
    timer = Timer(dev, quick)
    total = len(shape_list) * len(dtype_list)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, (shape, dt) in enumerate(((s, d) for s in shape_list for d in dtype_list), 1):
        def progress(msg, i=i):
            log(f"[{i}/{total} {time.perf_counter() - t0:6.1f}s] {msg}")
        rows.extend(bench_case(shape, dt, dev, timer, compile_=compile_, progress=progress))
    meta = {"device": str(dev), "device_name": dev_name, "torch": torch.__version__,
            "kasmina": getattr(kasmina, "__version__", "unknown"), "method": method,
            "quick": quick, "compile": compile_, "notes": notes,
            "wall_s": time.perf_counter() - t0}
    return {"meta": meta, "rows": rows}


def _finite_or_null(o):
    """NaN/inf are not JSON: write them as null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite_or_null(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_or_null(v) for v in o]
    return o


def emit(result: dict[str, Any], *, as_json: bool, markdown: bool) -> str:
    if as_json:
        return json.dumps(_finite_or_null(result), indent=1, allow_nan=False, default=str)
    if markdown:
        return format_markdown(result["rows"], result["meta"])
    m = result["meta"]
    head = f"kasmina bench on {m['device_name']} ({m['device']}): {m['method']}"
    tail = [f"note: {n}" for n in m["notes"]]
    if m["device"].startswith("cuda"):
        tail.append(f"note: {HOST_MS_NOTE}")
    return "\n".join([head, "", format_table(result["rows"]), *tail])
