"""The `kasmina` command: `info`, `bench`, `demo`."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from typing import Any, Sequence


def _shape_arg(text: str):
    from kasmina.bench import parse_shape
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kasmina", description="kasmina: the execution layer of "
                                "morphogenetic neural networks.")
    sub = p.add_subparsers(dest="command", metavar="{info,bench,demo,tune}")
    sub.required = True

    i = sub.add_parser("info", help="version, build, backends, devices and dispatcher choice",
                       description="Print the version, how the library was built, the backends "
                       "compiled in and available, the devices, and which kernel variant the "
                       "dispatcher picks for a shape and dtype (and why).")
    i.add_argument("--shape", type=_shape_arg, default=None, metavar="NxH:S",
                   help="shape to ask the dispatcher about (default 8192x768:16); every "
                   "available backend answers")
    i.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to ask the dispatcher about")
    i.add_argument("--json", action="store_true", help="print the raw dictionary as JSON")

    b = sub.add_parser("bench", help="time the KasminaLayer op against PyTorch eager, "
                       "torch.compile and the copy floor",
                       description="Time kasmina's layer op against kasmina.reference (plain "
                       "PyTorch) eager and under torch.compile, and against a copy of the same "
                       "bytes, for each shape, dtype and pass (fwd, fwd+bwd).")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--shapes", default=None, metavar="NxH:S,...",
                   help="comma-separated shapes (default: 16384x4096:64,8192x768:16,16x4096:64 "
                   "on CUDA; 8192x768:16,1024x4096:64,16x4096:64 on CPU)")
    b.add_argument("--dtypes", default=None, metavar="DT,...",
                   help="float32,bfloat16,float16 (default float32,bfloat16 on CUDA, float32 "
                   "on CPU)")
    b.add_argument("--quick", action="store_true", help="fewer repetitions and small shapes")
    b.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile column (compiling takes a while on CPU)")
    out = b.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    out.add_argument("--markdown", action="store_true",
                     help="print a Markdown table for docs/PERFORMANCE.md")

    t = sub.add_parser("tune", help="measure the CUDA launch candidates on this GPU and "
                       "cache the winners",
                       description="Time every rows-in-flight candidate of the CUDA forward "
                       "and backward for float32 and bfloat16 at one shape per shape class "
                       "(small 16x4096:64, medium 8192x768:16, large 16384x4096:64) and write "
                       "the winners to the tune cache, which `import kasmina` loads. Speed "
                       "only: results stay within SPEC section 9 whatever the setting.")
    t.add_argument("--out", default=None, metavar="PATH",
                   help="cache file (default $KASMINA_TUNE_CACHE or "
                   "~/.cache/kasmina/tune-v1.json)")
    t.add_argument("--quick", action="store_true", help="fewer repetitions")
    t.add_argument("--json", action="store_true", help="print the cache document as JSON")

    d = sub.add_parser("demo", help="grow a network on the digits data set and compare it "
                       "with the host alone",
                       description="Train an MLP with KasminaLayers on scikit-learn's 8x8 "
                       "digits while a controller germinates, grafts, fossilizes and culls "
                       "seeds; compare with the same host trained without seeds. Writes "
                       "demo.json and demo.png into --out. See docs/DEMO.md.")
    d.add_argument("--epochs", type=_positive, default=40)
    d.add_argument("--strategy", default="FIXED_RAMP", type=str.upper,
                   choices=["FIXED_RAMP", "PERFORMANCE_LINKED", "DRIFT_CONTROLLED",
                            "GRAD_NORM_GATED"],
                   help="how grafting seeds ramp alpha (SPEC section 7)")
    d.add_argument("--seeds", type=_positive, default=8, help="seeds per KasminaLayer")
    d.add_argument("--hidden", type=_positive, default=128,
                   help="width of the first hidden layer (the second is half of it)")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--out", default="./kasmina-out", help="folder for demo.json and demo.png")
    d.add_argument("--seed", type=int, default=0, help="random seed (data split, init, order)")
    d.add_argument("--repeats", type=_positive, default=1,
                   help="also run seeds seed+1 .. seed+N-1 (grown and host only) and print the "
                   "mean and spread of the comparison")
    d.add_argument("--no-baseline", action="store_true",
                   help="skip training the host without seeds (no comparison)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


# --------------------------------------------------------------------------
# info

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _call_info(shape, dtype: str) -> dict[str, Any]:
    """kasmina.info() for the query shape; passes only the arguments the
    front end's info() takes (rows, hidden, num_seeds, dtype)."""
    import torch

    import kasmina
    fn = kasmina.info
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    wanted = {"rows": shape.rows, "hidden": shape.hidden, "num_seeds": shape.seeds,
              "dtype": getattr(torch, dtype)}
    return fn(**{k: v for k, v in wanted.items() if k in params})


def _print_info(info: dict[str, Any]) -> None:
    import torch

    import kasmina
    info = dict(info)
    print(f"kasmina {info.pop('version', getattr(kasmina, '__version__', '?'))}")
    print(f"  package         {os.path.dirname(kasmina.__file__)}")
    if "compiler" in info:
        print(f"  built with      {info.pop('compiler')}")
    print(f"  torch           {info.pop('torch', torch.__version__)} (CUDA runtime "
          f"{torch.version.cuda or 'none'}; torch sees "
          f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA device(s))")
    archs = info.pop("cuda_architectures", None)
    if archs is not None:
        print(f"  CUDA archs      {archs or '(CUDA backend not compiled)'}")
    if "cpu_threads" in info:
        print(f"  CPU threads     {info.pop('cpu_threads')}")
    backends = info.pop("backends", None)
    if isinstance(backends, dict):
        print("backends")
        for name, b in backends.items():
            if isinstance(b, dict):
                state = ("available" if b.get("available") else
                         "compiled, not available" if b.get("compiled") else "not compiled")
                why = f" - {b['reason']}" if b.get("reason") else ""
                print(f"  {name:<10} {state}{why}")
            else:
                print(f"  {name:<10} {b}")
    devices = info.pop("devices", None)
    cuda_devices = info.pop("cuda_devices", None)
    if devices is not None:
        print("devices")
        for d in devices:
            print(f"  {d}")
        if cuda_devices:
            print(f"  (kasmina's CUDA backend sees: {', '.join(map(str, cuda_devices))})")
    shape = info.pop("dispatch_shape", None)
    dispatch = info.pop("dispatch", None)
    if dispatch is not None:
        if isinstance(shape, dict):
            print(f"dispatcher for x [{shape.get('rows')}, {shape.get('hidden')}] "
                  f"{shape.get('dtype')}, {shape.get('num_seeds')} seeds of mixed kinds, "
                  "all GRAFTING (forward)")
        else:
            print("dispatcher")
        if isinstance(dispatch, dict):
            for name, why in dispatch.items():
                print(f"  {name:<10} {why}")
        else:
            print(f"  {dispatch}")
    launch = info.pop("cuda_launch_config", None)
    tuned = info.pop("cuda_tuned_entries", None)
    if isinstance(launch, dict):
        def rows(v):
            return "default" if v == 0 else str(v)
        variants = ("automatic", "generic", "tma")
        v = launch.get("forward_variant", 0)
        print(f"CUDA launch     rows in flight: forward {rows(launch.get('forward_rows_in_flight'))}"
              f", backward {rows(launch.get('backward_rows_in_flight'))}; forward variant "
              f"{variants[v] if v in (0, 1, 2) else v}, TMA stages "
              f"{rows(launch.get('forward_stages', 0))}, lanes per row "
              f"{rows(launch.get('forward_group', 0))}, threads per CTA "
              f"{rows(launch.get('forward_block_threads', 0))}; "
              f"{tuned if tuned is not None else '?'} tuned entries (kasmina tune)")
    if "profiling" in info:
        on = info.pop("profiling")
        print(f"profiling       {'on' if on else 'off'} (KASMINA_PROFILE=1 or "
              "kasmina.profile.enable())")
    for k, v in info.items():  # anything newer than this command
        print(f"{k}: {v}")


def cmd_info(args) -> int:
    import torch

    import kasmina
    shape = args.shape
    if shape is None:
        from kasmina.bench import parse_shape
        shape = parse_shape("8192x768:16")
    try:
        info = _call_info(shape, args.dtype)
    except (ValueError, TypeError, RuntimeError) as exc:
        print(f"kasmina info: {exc}", file=sys.stderr)
        return 2
    if args.json:
        doc = {"kasmina": info, "package": os.path.dirname(kasmina.__file__),
               "torch_sees_cuda": torch.cuda.is_available(),
               "query": {"shape": str(shape), "dtype": args.dtype}}
        print(json.dumps(doc, indent=1, default=str))
        return 0
    _print_info(info)
    return 0


# --------------------------------------------------------------------------
# bench / demo

def cmd_bench(args) -> int:
    from kasmina.bench import emit, run_bench
    try:
        result = run_bench(device=args.device, shapes=args.shapes, dtypes=args.dtypes,
                           quick=args.quick, compile_=not args.no_compile)
    except ValueError as exc:
        print(f"kasmina bench: {exc}", file=sys.stderr)
        return 2
    print(emit(result, as_json=args.json, markdown=args.markdown))
    return 0


def cmd_tune(args) -> int:
    import json

    from kasmina.tune import run_tune
    try:
        doc = run_tune(out=args.out, quick=args.quick,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as exc:
        print(f"kasmina tune: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(f"wrote {doc['path']} ({len(doc['entries'])} entries)")
        for e in doc["entries"]:
            print(f"  {e['device']}  {e['elem_bytes']}-byte {e['shape_class']:<6} "
                  f"forward rows in flight {e['forward_rows_in_flight']} "
                  f"({e.get('forward_variant', 'automatic')}"
                  f"{', %d stages' % e['forward_stages'] if e.get('forward_stages') else ''}"
                  f"{', %d lanes per row' % e['forward_group'] if e.get('forward_group') else ''}), "
                  f"backward {e['backward_rows_in_flight']}")
    return 0


def cmd_demo(args) -> int:
    from kasmina.demo import DemoConfig, run_demo
    cfg = DemoConfig(epochs=args.epochs, strategy=args.strategy, seeds=args.seeds,
                     hidden=args.hidden, device=args.device, out=args.out, seed=args.seed,
                     baseline=not args.no_baseline, progress=not args.no_progress,
                     repeats=args.repeats)
    # Under `torchrun --nproc-per-node N`: one process group (gloo on the CPU,
    # NCCL on CUDA), DDP, lock-step lifecycle (docs/DISTRIBUTED.md).
    from kasmina import distributed
    from kasmina.demo import resolve_device
    started = distributed.init_from_env(resolve_device(cfg.device))
    try:
        run_demo(cfg)
    except ValueError as exc:
        print(f"kasmina demo: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            import torch.distributed as dist
            dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"info": cmd_info, "bench": cmd_bench, "demo": cmd_demo,
            "tune": cmd_tune}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
