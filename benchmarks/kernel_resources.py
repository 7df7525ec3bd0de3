"""Compile every Triton kernel launch fastgan's ops make for sm_90, without a GPU: does each compile, and
does any spill registers?

A kernel that spills registers to local memory on the GPU runs several times slower than one that does
not, and a kernel that Triton's GPU compiler rejects only fails on a GPU: the interpreter runs the same
code on a CPU either way. Triton's wheel ships ptxas and cuobjdump, so this script can compile each
launch for an H100 offline and read its resource usage.

    python benchmarks/kernel_resources.py             # the table; exit 1 on a compile error or on a spill
                                                      # at the benchmarks' sizes
    python benchmarks/kernel_resources.py --ops d_loss,bias_act --all
    PYTHONPATH=/path/to/other/triton python benchmarks/kernel_resources.py   # another Triton's verdict

It works in two phases, each in its own process. Triton decides at import whether ``@triton.jit`` gives
interpreted or compiled kernels, so one process cannot do both.

1. With ``TRITON_INTERPRET=1``, run the benchmark suites' fastgan contenders, built by the suites' own
   code at their sizes (see ``_workloads``), then every variant of each op at small sizes, on CPU tensors,
   with fastgan making its CUDA choices (Triton for ``impl="auto"``, the linear layer's CUDA tiles and
   its cuBLAS path for full-precision float32). Record every launch: kernel, arguments (a tensor as its
   dtype and 16-byte alignment), constexprs and launch options. The kernels are not executed (their
   outputs stay uninitialised; no wrapper reads one on the host), so large shapes cost only their
   allocation.
2. Without the interpreter, compile each distinct launch for ``GPUTarget("cuda", 90, 32)`` exactly as the
   JIT would: its own binder specialises the recorded arguments (ints equal to 1 become constants,
   16-byte aligned pointers and ints divisible by 16 get the divisibility hint). Then read REG / STACK /
   LOCAL from ``cuobjdump --dump-resource-usage``. Without that specialisation the register counts
   are far off: 255 registers and a 96-byte stack for d_loss's 4096-wide program, against 203 and none
   as launched.

The verdict is the installed Triton's: ptxas's register allocation moves between versions (the GPU
image's triton 3.6 spills in some float32 loss variants that 3.9 compiles cleanly). Uses Triton's binder
(``triton.runtime.jit.create_function_from_signature``, ``JITFunction._pack_args``), which is not a public
API. Tested with triton 3.9 and 3.6.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPS = ("d_loss", "g_loss", "bias_act", "linear_act", "batch_norm_act")

# ---- phase 1: record the launches (TRITON_INTERPRET=1) ------------------------------------------------

def _encode(value):
    import torch
    import triton.language as tl
    if isinstance(value, torch.Tensor):  # what the JIT specialises a pointer on: its dtype and 16-byte alignment
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned16": value.data_ptr() % 16 == 0}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


def _workloads(ops: tuple[str, ...]):
    """(label, thunk, at_benchmark_sizes) triples: first the benchmark suites' own fastgan contenders, built
    by the suites' code at their sizes (the op suites' problems, and the four training steps of
    bench_step when every op is asked for), then the other variants the ops can launch (every activation
    and loss kind, bfloat16 / float16 / float64, no bias or affine, eval mode, no gradient, double
    backward, TF32, int64 offsets) at small sizes, so that every kernel variant is compiled for sm_90. A compile error
    fails the check anywhere; a spill fails it at the benchmarks' sizes and is reported for the variants.
    Small spills there come and go with the Triton version (8-24 bytes where ptxas settles on 64 or 255
    registers), and a launch configuration is changed only on a measurement."""
    return _benchmark_workloads(ops) + _variant_workloads(ops)


def _benchmark_workloads(ops: tuple[str, ...]):
    import torch

    import bench_batch_norm_act
    import bench_layers
    import bench_losses
    import common

    from fastgan.ops import g_loss

    work = []
    for n in bench_losses.SIZES:
        if "d_loss" in ops:
            work.append((f"bench_losses n={n}", lambda n=n: bench_losses._run(
                bench_losses.fastgan_step, *bench_losses._input_sets(n)[0])))
        if "g_loss" in ops:  # bench_losses times d_loss; g_loss at the same sizes
            def run(n=n):
                fake = bench_losses._input_sets(n)[0][1]
                g_loss(fake, "nonsaturating").backward()
            work.append((f"g_loss n={n}", run))

    def layer(model, x, grad):
        bench_layers._step(model, list(model.parameters()), x, grad)

    if "linear_act" in ops:
        for batch, features in bench_layers.LINEAR_PROBLEMS:
            def run(batch=batch, features=features):
                model = bench_layers._contender("fastgan", bench_layers._linear_eager(features))
                layer(model, torch.randn(batch, features, requires_grad=True), torch.randn(batch, features))
            work.append((f"bench_layers linear B={batch} F={features}", run))
    if "bias_act" in ops:
        for kind, shape in bench_layers.CONV_INPUT.items():
            def run(kind=kind, shape=shape):
                eager = bench_layers._conv_eager(kind)
                x = torch.randn(shape, requires_grad=True)
                layer(bench_layers._contender("fastgan", eager), x, torch.randn_like(eager(x)))
            work.append((f"bench_layers {kind}", run))
        for layout in ("contiguous", "channels_last"):
            def run(layout=layout):
                x = bench_layers._bias_input(layout)
                layer(bench_layers._bias_models()["fastgan"], x, torch.randn_like(x))
            work.append((f"bench_layers bias+lrelu {layout}", run))
    if "batch_norm_act" in ops:
        for channels, size, layout in bench_batch_norm_act.SHAPES:
            def run(channels=channels, size=size, layout=layout):
                module, params, _ = bench_batch_norm_act._contender("fastgan", channels, "cpu")
                bench_batch_norm_act._step(module, params, *bench_batch_norm_act._inputs(channels, size, layout,
                                                                                          "cpu"))
            work.append((f"bench_batch_norm_act c={channels} {size}x{size} {layout}", run))
    if set(ops) == set(OPS):
        for problem in common.problems("cuda"):  # the GPU's problem sizes (DCGAN w64, batch 128)
            def run(problem=problem):
                trainer = common.make_contender("fastgan", problem, "cpu", problem.models())
                gen = torch.Generator().manual_seed(0)
                trainer.step(problem.real_batch(gen), problem.noise(gen))
            work.append((f"bench_step {problem.name}", run))
    return [(label, thunk, True) for label, thunk in work]


@contextlib.contextmanager
def _setting(obj, name: str, value):
    """``obj.name = value`` for the duration (torch's flag objects included, which mock.patch would delete)."""
    before = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, before)


def _with_tf32(run) -> None:
    """run() with torch's CUDA matmuls allowed TF32 (what fastgan's linear layer follows)."""
    import torch
    matmul = torch.backends.cuda.matmul
    with (_setting(matmul, "fp32_precision", "tf32") if hasattr(matmul, "fp32_precision")
          else _setting(matmul, "allow_tf32", True)):
        run()


def _with_int64_offsets(run) -> None:
    """run() with the int64-offset kernels, which tensors of 2**31 elements or more take (too big here)."""
    import importlib
    with _setting(importlib.import_module("fastgan.ops.triton.bias_act"), "_index64", lambda t: True), \
            _setting(importlib.import_module("fastgan.ops.triton.linear_act"), "_index64", lambda t: True):
        run()


def _double_backward(out, *inputs):
    """d/d inputs of (the sum of the first-order input gradients squared): the R1 penalty's shape."""
    import torch
    grads = torch.autograd.grad(out.sum(), inputs, create_graph=True)
    sum(g.square().sum() for g in grads).backward()


def _variant_workloads(ops: tuple[str, ...]):
    import torch

    from fastgan import ops as F
    from fastgan.ops.activations import ACTIVATIONS
    from fastgan.ops.losses import LOSS_KINDS

    def leaf(*shape, dtype=torch.float32, channels_last=False, grad=True):
        t = torch.randn(*shape, dtype=dtype)
        if channels_last:
            t = t.to(memory_format=torch.channels_last)
        return t.requires_grad_(grad)

    # Every activation / loss kind in float32, every dtype with one of them: the kernels branch on each
    # separately (a variant per pair would only multiply the compile time).
    def pairs(names, first):
        return [(name, torch.float32) for name in names] + \
            [(first, dtype) for dtype in (torch.bfloat16, torch.float16, torch.float64)]

    work = []
    for kind, dtype in pairs(LOSS_KINDS, "nonsaturating"):
        for n in (100, 2000, 3000, 5000):  # one program (three block sizes); several and the finishing kernel
            if "d_loss" in ops:
                work.append((f"d_loss {kind} n={n} {dtype}", lambda kind=kind, n=n, dtype=dtype: F.d_loss(
                    leaf(n, dtype=dtype), leaf(n, dtype=dtype), kind, impl="triton").loss.backward()))
            if "g_loss" in ops:
                work.append((f"g_loss {kind} n={n} {dtype}", lambda kind=kind, n=n, dtype=dtype: F.g_loss(
                    leaf(n, dtype=dtype), kind, impl="triton").backward()))
        if "d_loss" in ops:
            work.append((f"d_loss {kind} {dtype} no grad", lambda kind=kind, dtype=dtype: F.d_loss(
                leaf(100, dtype=dtype, grad=False), leaf(100, dtype=dtype, grad=False), kind, impl="triton")))
        if "g_loss" in ops:
            work.append((f"g_loss {kind} {dtype} no grad", lambda kind=kind, dtype=dtype: F.g_loss(
                leaf(100, dtype=dtype, grad=False), kind, impl="triton")))
    for act, dtype in pairs(ACTIVATIONS, "lrelu"):
        if "bias_act" in ops:
            def run(act=act, dtype=dtype):
                x, b = leaf(3, 7, 5, 3, dtype=dtype), leaf(7, dtype=dtype)
                _double_backward(F.bias_act(x, b, act=act, gain=1.5, impl="triton"), x, b)
                F.bias_act(leaf(3, 7, 5, 3, dtype=dtype), None, act=act, clamp=0.5, impl="triton").sum().backward()
            work.append((f"bias_act {act} {dtype}", run))
        if "linear_act" in ops:
            def run(act=act, dtype=dtype):
                x, w, b = leaf(17, 33, dtype=dtype), leaf(65, 33, dtype=dtype), leaf(65, dtype=dtype)
                _double_backward(F.linear_act(x, w, b, act=act, impl="triton"), x, w, b)
                F.linear_act(leaf(17, 33, dtype=dtype), leaf(65, 33, dtype=dtype), None, act=act,
                             impl="triton").sum().backward()
            work.append((f"linear_act {act} {dtype}", run))
            if dtype == torch.float32:  # with TF32 allowed, float32 goes to the Triton matmul, not to cuBLAS
                work.append((f"linear_act {act} {dtype} TF32", lambda run=run: _with_tf32(run)))
        if "batch_norm_act" in ops:
            def run(act=act, dtype=dtype):
                acc = torch.float64 if dtype == torch.float64 else torch.float32
                for shape, cl in (((8, 6, 5, 5), False), ((8, 6, 5, 5), True), ((9, 6), False),
                                  ((64, 64, 32, 32), False)):  # the last: the split (several-program) path
                    c = shape[1]
                    x, w, b = leaf(*shape, dtype=dtype, channels_last=cl), leaf(c, dtype=acc), leaf(c, dtype=acc)
                    rm, rv = torch.zeros(c, dtype=acc), torch.ones(c, dtype=acc)
                    _double_backward(F.batch_norm_act(x, w, b, rm, rv, True, act=act, impl="triton"), x, w, b)
                    F.batch_norm_act(x, None, None, rm, rv, False, act=act, impl="triton").sum().backward()
                    F.batch_norm_act(x, None, None, rm, rv, True, momentum=None, act=act, impl="triton",
                                     num_batches_tracked=torch.tensor(3)).sum().backward()
            work.append((f"batch_norm_act {act} {dtype}", run))
    for dtype in (torch.float32, torch.bfloat16):  # float32: bias_act after cuBLAS; bfloat16: the matmul kernel
        if "bias_act" in ops:
            work.append((f"bias_act int64 offsets {dtype}", lambda dtype=dtype: _with_int64_offsets(
                lambda: F.bias_act(leaf(3, 7, 5, 3, dtype=dtype), leaf(7, dtype=dtype), act="lrelu",
                                   impl="triton").sum().backward())))
        if "linear_act" in ops:
            work.append((f"linear_act int64 offsets {dtype}", lambda dtype=dtype: _with_int64_offsets(
                lambda: F.linear_act(leaf(17, 33, dtype=dtype), leaf(65, 33, dtype=dtype), leaf(65, dtype=dtype),
                                     act="lrelu", impl="triton").sum().backward())))
    return [(label, thunk, False) for label, thunk in work]


def record(ops: tuple[str, ...]) -> list[dict]:
    import triton.runtime.interpreter as interpreter

    launches, seen = [], {}
    current = {"label": "", "sizes": True}

    def recording_run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        values = dict(zip(self.arg_names, args)) | kwargs
        entry = {"module": self.fn.__module__, "kernel": self.fn.__name__,
                 "args": {k: _encode(v) for k, v in values.items()}, "options": options}
        key = json.dumps(entry, sort_keys=True)
        if key not in seen:
            seen[key] = entry | {"first_seen": current["label"], "sizes": current["sizes"]}
            launches.append(seen[key])
        elif current["sizes"] and not seen[key]["sizes"]:
            seen[key].update(first_seen=current["label"], sizes=True)
        return None  # not executed: only the launch's shape matters here

    interpreter.InterpretedFunction.run = recording_run
    # Make the choices fastgan makes for CUDA tensors: the Triton kernels for impl="auto" (as `fastgan
    # info` shows on a GPU), and the linear layer's CUDA launches (tiles, cuBLAS for full-precision float32).
    import importlib  # (fastgan.ops.linear_act as an attribute is the function, not its module)
    importlib.import_module("fastgan._dispatch").auto_impl = lambda op, device: "triton"
    importlib.import_module("fastgan.ops.linear_act")._EXT = None  # the CPU-only eager shortcut to C++
    importlib.import_module("fastgan.ops.triton.linear_act")._on_cuda = lambda t: True
    for label, thunk, sizes in _workloads(ops):
        current.update(label=label, sizes=sizes)
        thunk()
    return launches


# ---- phase 2: compile each launch for sm_90 and read its resource usage -----------------------------

def _argument(value):
    """A recorded argument back as a value the JIT's binder specialises as it did the real one: a tensor of
    the dtype with the same 16-byte alignment (its data is never read), a tl.dtype, or the plain value
    (ints equal to 1 and divisible by 16, and None, are specialised by their value)."""
    import torch
    import triton.language as tl
    if isinstance(value, dict) and "tensor" in value:
        dtype = getattr(torch, value["tensor"])
        base = torch.empty(64, dtype=dtype)  # CPU allocations are 64-byte aligned
        return base if value["aligned16"] else base[1:]
    if isinstance(value, dict) and "tl_dtype" in value:
        return tl.dtype(value["tl_dtype"])
    return value


def compile_launch(launch: dict):
    """``triton.compile`` of one recorded launch for sm_90, specialised as the JIT specialises it (its own
    binder: ints equal to 1 become constants, 16-byte aligned pointers and ints divisible by 16 get the
    divisibility hint, None becomes a constant), with the launch's options."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {name: _argument(value) for name, value in launch["args"].items()}
    kwargs.update(launch["options"], debug=False)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    source = ASTSource(fn, signature, constexprs, attrs)
    try:
        return triton.compile(source, target=target, options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - the compiler's verdict on this launch (the tool's own errors raise)
        raise KernelCompileError(f"{type(exc).__name__}: {str(exc)[:300]}") from exc


class KernelCompileError(Exception):
    """Triton's compiler rejected a launch."""


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / LOCAL / SHARED of a cubin from cuobjdump: the largest over its functions (the kernel
    and any non-inlined device function)."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = {"REG": 0, "STACK": 0, "LOCAL": 0, "SHARED": 0}
    reports = [line for line in out.splitlines() if "REG:" in line]
    if not reports:  # no report must not read as "no spill"
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    for line in reports:
        fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
        for key in usage:
            usage[key] = max(usage[key], int(fields[key]))
    return usage


def compile_launches(launches: list[dict]) -> list[dict]:
    """One row per launch: its resource usage, or the compiler's error (``error``)."""
    rows = []
    for launch in launches:
        shown = {k: v["tl_dtype"] if isinstance(v, dict) else v for k, v in launch["args"].items()
                 if k.startswith("BLOCK") or k in ("ROWS", "CHUNK", "ACC")}
        row = {"kernel": launch["kernel"], "first_seen": launch.get("first_seen", "?"),
               "sizes": launch.get("sizes", True), "num_warps": launch["options"].get("num_warps", 4),
               "blocks": shown, "error": None}
        try:
            row.update(_resource_usage(compile_launch(launch).asm["cubin"]))
        except KernelCompileError as exc:
            row.update(REG=0, STACK=0, LOCAL=0, SHARED=0, error=str(exc))
        rows.append(row)
    return rows


def all_kernels(ops: tuple[str, ...]) -> list[str]:
    """The @triton.jit kernels (names ending in _kernel) that ``ops`` own: each op's module in
    fastgan/ops/triton, the loss module's kernels split by their d_ / g_ prefix."""
    import importlib

    from triton.runtime.jit import JITFunction
    names = set()
    for op in ops:
        module = importlib.import_module(f"fastgan.ops.triton.{'losses' if op.endswith('_loss') else op}")
        names |= {n for n, v in vars(module).items() if isinstance(v, JITFunction) and n.endswith("_kernel")
                  and (not op.endswith("_loss") or n.startswith(f"_{op}"))}
    return sorted(names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--record-only", action="store_true",
                        help="phase 1 only (run with TRITON_INTERPRET=1): print the recorded launches as JSON")
    parser.add_argument("--all", action="store_true", help="also list the variants that compile without spills")
    parser.add_argument("--launches", metavar="JSON", help="phase 2 only: compile the launches of this file "
                        "(the output of --record-only, possibly edited)")
    args = parser.parse_args(argv)
    ops = tuple(o for o in args.ops.split(",") if o)
    unknown = set(ops) - set(OPS)
    if unknown:
        parser.error(f"--ops: unknown {sorted(unknown)}; expected a subset of {','.join(OPS)}")
    if args.record_only:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--record-only runs the ops through Triton's interpreter: set TRITON_INTERPRET=1")
        json.dump(record(ops), sys.stdout)
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this process compiles real kernels (the recording runs in a child)")
    if args.launches:
        launches = json.loads(Path(args.launches).read_text())
    else:
        env = dict(os.environ, TRITON_INTERPRET="1",
                   PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        # fastgan's own launch configuration, not an experiment's (this knob moves the BatchNorm paths)
        env.pop("FASTGAN_BN_SINGLE_PASS_MAX_ELEMENTS", None)
        child = subprocess.run([sys.executable, __file__, "--record-only", "--ops", ",".join(ops)], env=env,
                               capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 2
        launches = json.loads(child.stdout)
    rows = compile_launches(launches)
    # Every kernel of the ops must have been launched by a workload (not asked of a given launch file).
    missed = [] if args.launches else sorted(set(all_kernels(ops)) - {r["kernel"] for r in rows})
    print(f"{'kernel':34} {'warps':>5} {'REG':>4} {'STACK':>5} {'LOCAL':>5}  blocks  (first seen in)")
    spills = variant_spills = errors = 0
    for r in rows:
        spilled = bool(r["STACK"] or r["LOCAL"])
        if r["error"]:
            errors += 1
            flag = f"  <-- DOES NOT COMPILE: {r['error']}"
        elif spilled and r["sizes"]:
            spills += 1
            flag = "  <-- spills"
        elif spilled:
            variant_spills += 1
            flag = "  (spills; a variant, reported only)"
        else:
            flag = ""
        if r["sizes"] or flag or args.all:
            print(f"{r['kernel']:34} {r['num_warps']:>5} {r['REG']:>4} {r['STACK']:>5} {r['LOCAL']:>5}  "
                  f"{r['blocks']}  ({r['first_seen']}){flag}")
    at_sizes = sum(r["sizes"] for r in rows)
    print(f"{len(rows)} distinct launches ({at_sizes} at the benchmarks' sizes, listed; the other variants "
          f"{'listed too' if args.all else 'listed with --all'}): {spills} at those sizes with spills, "
          f"{variant_spills} variants with spills (reported only), {errors} that do not compile")
    if missed:
        print(f"kernels no workload launched (add a workload to _workloads): {', '.join(missed)}")
    return 1 if spills or errors or missed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
