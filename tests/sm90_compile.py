"""Compiling Triton kernels for sm_90 without a GPU, shared by the forward and backward tests.

Under TRITON_INTERPRET=1 triton.jit hands back interpreter objects, so the compile runs in a fresh
interpreter-free subprocess (`run_compile_script`) with an empty Triton cache, where ptxas must run
and report registers and spills. The child script imports `compile_one` and `jit_function` from here.
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def compile_one(jit_fn, types, constexprs, divisible, num_warps, num_stages):
    """Compile jit_fn for sm_90; {cubin bytes, shared memory, registers, spill bytes}."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    aligned = BaseBackend.parse_attr("D")   # what a launch with 16-aligned pointers / D sees
    names = jit_fn.arg_names
    sig = {a: "constexpr" if a in constexprs else types[a] for a in names}
    attrs = {(names.index(a),): aligned for a in divisible}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):   # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
        k = triton.compile(ASTSource(jit_fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
    log = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return dict(cubin=len(k.asm.get("cubin", b"")), shared=k.metadata.shared,
                regs=int(regs[-1]) if regs else None, spills=int(spills[-1]) if spills else None)


def jit_function(kernel):
    """The JITFunction under autotune / heuristics wrappers."""
    import triton
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def run_compile_script(script: str, cache_dir, timeout: float):
    """Run `script` in a child without the interpreter; return the JSON it prints after 'RESULT '."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache_dir), TRITON_DUMP_PTXAS_LOG="1", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])
