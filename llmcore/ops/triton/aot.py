"""Ahead-of-time compilation of the Triton kernels for a GPU that is not here.

Inside ``with compiling_for("sm_90") as kernels:`` Triton believes it drives a GPU of that
architecture. The real launchers (attention, norms, cross-entropy) run on small CPU tensors,
and every kernel launch is compiled for the architecture instead of run: outputs stay
unwritten, nothing executes. A kernel whose shared memory exceeds what a block may use on
that architecture raises Triton's ``OutOfResources``, as loading it on such a GPU would, so
the launchers' fallbacks take the path they would take there; so does one that needs more
of Blackwell's tensor memory than its 512 columns (Triton compiles such a kernel to a trap
and refuses to load it). ``kernels`` collects one :class:`Kernel` per compiled
specialization: registers, stack bytes (spills), shared and tensor memory, which
tensor-core instructions its dots became (tcgen05, wgmma or mma.sync) and whether it uses
TMA (the dQ reductions of ``LLMCORE_TRITON_DQ=tma``, the descriptor loads of ``LLMCORE_TRITON_LOADS``).

This is how CI, which has no GPU, checks that every kernel compiles for the GPUs we support
and fits their shared and tensor memory (tests/test_triton_aot.py); the interpreter tests check the
numerics. ``python -m llmcore.ops.triton.aot --arch sm_90`` prints the table for the
problems :func:`survey` launches. Registers and spills come from ``cuobjdump``, which the
Triton wheel carries; they are Triton-version dependent, so compare them within one version.

It uses two of Triton's hooks, ``triton.runtime.driver.set_active`` (a stand-in driver that
names the target) and ``triton.knobs.runtime.jit_cache_hook`` (called before each compile;
returning True skips it), written against Triton 3.9. Not thread-safe; not reentrant; and not in a
process that imported Triton under ``TRITON_INTERPRET=1`` (Triton's own library is then interpreted
for good), such as a CPU test session: tests run it in a subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional, Union

import torch

from llmcore.ops.triton import _loader

__all__ = ["Arch", "ARCHS", "Kernel", "compiling_for", "survey", "CASES"]


@dataclass(frozen=True)
class Arch:
    name: str
    capability: int
    shared: int  # bytes of shared memory one block may use (the opt-in maximum)
    multiprocessors: int  # only sizes grids (the norm backward); the compiled code does not depend on it
    examples: str


ARCHS = {a.name: a for a in (
    Arch("sm_80", 80, 166912, 108, "A100"),
    Arch("sm_86", 86, 101376, 84, "RTX 30xx, A10, A40"),
    Arch("sm_89", 89, 101376, 128, "RTX 40xx, L4, L40"),
    Arch("sm_90", 90, 232448, 132, "H100, H200"),
    Arch("sm_100", 100, 232448, 148, "B200"),
    Arch("sm_120", 120, 101376, 170, "RTX 50xx"),
)}


TENSOR_MEMORY_COLUMNS = 512  # per SM on sm_100 (B200), 32-bit columns of 128 lanes: the limit Triton checks at load


@dataclass
class Kernel:
    """One compiled specialization of a kernel."""

    name: str
    dtype: str  # element type of the kernel's first pointer argument
    constants: dict  # constexpr (and specialized-to-1) arguments by name
    num_warps: int
    num_stages: int
    shared: int  # bytes
    registers: Optional[int]  # per thread; None without cuobjdump
    stack: Optional[int]  # bytes of per-thread stack: register spills
    tensor_cores: str  # "tcgen05" (Blackwell), "wgmma" (Hopper), "mma.sync" or "none": what the dots became
    tma: str  # what it asks of the Tensor Memory Accelerator: "reduce" (cp.reduce.async.bulk.tensor: the dQ tiles of
    # LLMCORE_TRITON_DQ=tma), "copy" (cp.async.bulk.tensor: tiles loaded through descriptors, LLMCORE_TRITON_LOADS),
    # both ("reduce+copy") or "none"
    tensor_memory: int  # columns of Blackwell's tensor memory (the dots' accumulators; 512 exist), 0 before Blackwell
    fits: bool  # shared and tensor memory within the architecture's limits (a kernel that does not fit is never run)
    warp_groups: int = 0  # warp groups of a warp-specialized kernel (producer and consumers: setmaxnreg), else 0
    # TMA copies whose descriptor block has another element count than the shared-memory buffer they fill: the
    # copy brings more (or fewer) bytes than the buffer and its barrier expect, which hangs the kernel (0 is right)
    tma_mismatches: int = 0

    def over(self, arch: "Arch") -> Optional[tuple[int, int, str]]:
        """(need, limit, what) for the first resource this kernel exceeds on ``arch``, or None."""
        if self.shared > arch.shared:
            return self.shared, arch.shared, "shared memory"
        if self.tensor_memory > TENSOR_MEMORY_COLUMNS:
            return self.tensor_memory, TENSOR_MEMORY_COLUMNS, "tensor memory"
        return None

    def label(self) -> str:
        keep = ("HEAD_DIM", "CAUSAL", "VARLEN", "MASK_KIND", "DROPOUT", "GROUP", "GROUPED", "DQ_ATOMIC", "DQ_TMA",
                "KV_DESC", "QD_DESC", "WS",
                "RMS", "HAS_RES", "STAGES", "CHUNKED", "BLOCK_M", "BLOCK_N", "BLOCK_C", "BLOCK_V", "ROWS")
        consts = " ".join(f"{k}={self.constants[k]}" for k in keep if k in self.constants)
        return f"{self.name} {self.dtype} {consts}"


class _OfflineDriver:
    """What Triton's JIT asks of a driver before it compiles: a device, a stream and the target."""

    def __init__(self, target, device: str):
        self.target, self.device = target, device

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def _cuobjdump() -> Optional[str]:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.access(bundled, os.X_OK) else shutil.which("cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[Optional[int], Optional[int]]:
    """(registers, stack bytes) of the cubin's kernel, from ``cuobjdump --dump-resource-usage``."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


def _describe(jit, compile: dict, compiled, arch: Arch) -> Kernel:
    names = jit.arg_names
    constants = {names[path[0]]: v for path, v in compile["constants"].items() if len(path) == 1}
    pointers = [t for t in compile["signature"].values() if isinstance(t, str) and t.startswith("*")]
    ptx = compiled.asm.get("ptx", "")
    cores = ("tcgen05" if "tcgen05.mma" in ptx else "wgmma" if "wgmma.mma_async" in ptx
             else "mma.sync" if re.search(r"\bmma\.sync", ptx) else "none")
    tma = "+".join(kind for kind, instr in (("reduce", "cp.reduce.async.bulk.tensor"), ("copy", "cp.async.bulk.tensor"))
                   if instr in ptx) or "none"
    regs, stack = _resource_usage(compiled.asm["cubin"])
    k = Kernel(jit.__name__, pointers[0][1:] if pointers else "", constants, compile["num_warps"],
               compile["num_stages"], compiled.metadata.shared, regs, stack, cores, tma,
               getattr(compiled.metadata, "tmem_size", None) or 0, True)
    k.fits = k.over(arch) is None
    if "setmaxnreg" in ptx:
        k.warp_groups = compiled.metadata.num_warps // 4
    k.tma_mismatches = len(_tma_mismatches(compiled.asm.get("ttgir", "")))
    return k


_TMA_COPY = re.compile(r"async_tma_copy_global_to_local .*?: !tt\.tensordesc<tensor<([\dx]+)x\w+[,>].*?"
                       r"-> !ttg\.memdesc<([\dx]+)x\w+[,>]")


def _tma_mismatches(ttgir: str) -> list[str]:
    """The TMA copies in ``ttgir`` whose descriptor block and destination buffer differ in element count."""
    def count(dims: str) -> int:
        n = 1
        for d in dims.split("x"):
            n *= int(d)
        return n

    return [m.group(0)[:200] for m in _TMA_COPY.finditer(ttgir) if count(m.group(1)) != count(m.group(2))]


@contextmanager
def compiling_for(arch: Union[str, Arch]) -> Iterator[list[Kernel]]:
    """Within: Triton kernel launches (on any device) are compiled for ``arch``, not run.

    Yields the list that collects a :class:`Kernel` per compiled specialization, in launch
    order, including those that did not fit (which raised ``OutOfResources`` at launch).
    """
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime import driver
    from triton.runtime.errors import OutOfResources

    if isinstance(arch, str) and arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHS)} (or an Arch)")
    a = ARCHS[arch] if isinstance(arch, str) else arch
    if type(triton.language.standard.sum).__name__ != "JITFunction":
        raise RuntimeError("Triton was imported with TRITON_INTERPRET=1, which makes its own library interpreted: "
                           "nothing can be compiled in this process. Run without it (python -m llmcore.ops.triton.aot)")
    if _loader.offline() is not None:
        raise RuntimeError(f"already compiling for {_loader.offline().name}: compiling_for does not nest")
    target = GPUTarget("cuda", a.capability, 32)
    device = f"aot:{a.name}"  # a device key no GPU has: the JIT's per-device caches stay apart
    kernels: list[Kernel] = []
    done: dict = {}

    def hook(*, key, fn, compile, **_):
        jit = fn.jit_function
        k = done.get((id(jit), str(key)))
        if k is None:
            src = ASTSource(jit, compile["signature"], compile["constants"], compile["configs"][0])
            options = {o: compile[o] for o in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")}
            k = _describe(jit, compile, triton.compile(src, target=target, options=options), a)
            done[(id(jit), str(key))] = k
            kernels.append(k)
        if not k.fits:
            raise OutOfResources(*k.over(a))
        return True  # compiled; skip the launch

    previous_driver, previous_hook = getattr(driver, "_active", None), knobs.runtime.jit_cache_hook
    driver.set_active(_OfflineDriver(target, device))
    knobs.runtime.jit_cache_hook = hook
    _loader._OFFLINE.append(a)
    try:
        yield kernels
    finally:
        _loader._OFFLINE.pop()
        knobs.runtime.jit_cache_hook = previous_hook
        driver.set_active(previous_driver)
        for (_, interpreted), mod in list(_loader._MODULES.items()):
            if not interpreted:
                for v in vars(mod).values():
                    caches = getattr(v, "device_caches", None)
                    if isinstance(caches, dict):
                        caches.pop(device, None)


# ---------------------------------------------------------------------------------------
# the problems a survey launches: each a callable running one op forward and backward


@contextmanager
def _env(name: str, value: str):
    """Environment variable ``name`` set to ``value`` ("" unsets it) for the duration: a survey ignores the
    caller's."""
    previous = os.environ.pop(name, None)
    if value:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if previous is not None:
            os.environ[name] = previous


def _attention(head_dim: int, dtype=torch.bfloat16, causal: bool = False, gqa: int = 1, mask: Optional[str] = None,
               dropout: float = 0.0, packed: bool = False, dq: str = "", loads: str = "",
               ws: str = "") -> Callable[[], None]:
    """dq: LLMCORE_TRITON_DQ for the backward ("atomic", "tma": dQ inside the dK/dV kernel); loads:
    LLMCORE_TRITON_LOADS for the whole call ("desc": streamed tiles through tensor descriptors); ws:
    LLMCORE_TRITON_WS ("1": the warp-specialized kernels)."""
    def run():
        with _env("LLMCORE_TRITON_LOADS", loads), _env("LLMCORE_TRITON_WS", ws):
            _run()

    def _run():
        from llmcore.ops.triton import attention

        heads, rows = 4, 128
        kv = heads // gqa
        if packed:
            cu = torch.tensor([0, 40, 128], dtype=torch.int32)
            q = torch.zeros(rows, heads, head_dim, dtype=dtype, requires_grad=True)
            k, v = (torch.zeros(rows, kv, head_dim, dtype=dtype, requires_grad=True) for _ in range(2))
            out = attention.varlen(q, k, v, cu, cu, 88, 88, dropout, causal, head_dim ** -0.5)
        else:
            q = torch.zeros(2, heads, rows, head_dim, dtype=dtype, requires_grad=True)
            k, v = (torch.zeros(2, kv, rows, head_dim, dtype=dtype, requires_grad=True) for _ in range(2))
            m = None
            if mask == "bool":
                m = torch.ones(2, 1, rows, rows, dtype=torch.bool)
            elif mask == "additive":
                m = torch.zeros(1, heads, rows, rows, dtype=dtype)
            out = attention.sdpa(q, k, v, m, dropout, causal, head_dim ** -0.5, torch.Size([2]))
        with _env("LLMCORE_TRITON_DQ", dq):
            out.backward(torch.zeros_like(out))
    run.min_capability = 90 if dq == "tma" or loads == "desc" or ws else 0  # TMA: Hopper and newer (else pointers)
    return run


def _norm(rms: bool, cols: int, dtype, **bwd) -> Callable[[], None]:
    """bwd: the backward's launch settings (norm.backward_launch), e.g. stages=2 (software-pipelined)."""
    def run():
        from llmcore.ops.triton import norm

        x, r = (torch.zeros(8, cols, dtype=dtype, requires_grad=True) for _ in range(2))
        w = torch.ones(cols, dtype=dtype, requires_grad=True)
        if rms:
            y, s = norm.rms_norm(x, w, residual=r)
        else:
            y, s = norm.layer_norm(x, w, torch.zeros(cols, dtype=dtype, requires_grad=True), residual=r)
        with norm.backward_launch(**bwd):
            torch.autograd.backward((y, s), (torch.zeros_like(y), torch.zeros_like(s)))
    return run


def _cross_entropy(vocab: int, dtype) -> Callable[[], None]:
    def run():
        from llmcore.ops import linear_cross_entropy

        h = torch.zeros(8, 64, dtype=dtype, requires_grad=True)
        w = torch.zeros(vocab, 64, dtype=dtype, requires_grad=True)
        linear_cross_entropy(h, w, torch.zeros(8, dtype=torch.long), backend="triton").backward()
    return run


def _rotary(heads: int, head_dim: int, dtype) -> Callable[[], None]:
    def run():
        from llmcore.ops.rotary import _rotate

        x = torch.zeros(8, heads, head_dim, dtype=dtype)
        cos = sin = torch.zeros(8, head_dim, dtype=torch.float32)
        _rotate(x, cos, sin, False, True)
        _rotate(x, cos, sin, True, True)
    return run


def _cases() -> dict[str, Callable[[], None]]:
    cases = {}
    for d in (16, 32, 48, 64, 80, 96, 128, 160, 256):
        for causal in (False, True):
            cases[f"attention d{d} bf16{' causal' if causal else ''}"] = _attention(d, causal=causal)
    cases.update({
        "attention d128 fp16 causal": _attention(128, torch.float16, causal=True),
        "attention d64 fp32": _attention(64, torch.float32),
        "attention d256 fp32 causal": _attention(256, torch.float32, causal=True),
        "attention d64 bf16 gqa4 bool-mask": _attention(64, gqa=4, mask="bool"),
        "attention d128 bf16 causal gqa4": _attention(128, causal=True, gqa=4),
        "attention d96 bf16 additive-mask dropout": _attention(96, mask="additive", dropout=0.1),
        "attention d128 bf16 causal dropout": _attention(128, causal=True, dropout=0.1),
        "attention d128 bf16 causal dq-atomic": _attention(128, causal=True, dq="atomic"),
        "attention d128 bf16 causal dq-tma": _attention(128, causal=True, dq="tma"),
        "attention d128 bf16 dq-tma": _attention(128, dq="tma"),
        "attention d128 bf16 desc": _attention(128, loads="desc"),
        "attention d128 bf16 causal desc": _attention(128, causal=True, loads="desc"),
        "attention d80 bf16 causal gqa4 desc": _attention(80, causal=True, gqa=4, loads="desc"),
        "attention d128 bf16 causal dq-tma desc": _attention(128, causal=True, dq="tma", loads="desc"),
        "attention d128 bf16 causal ws": _attention(128, causal=True, ws="1"),
        "attention d64 bf16 ws": _attention(64, ws="1"),
        "varlen d64 bf16 causal gqa2 dq-tma": _attention(64, causal=True, gqa=2, packed=True, dq="tma"),
        "varlen d128 bf16 causal desc": _attention(128, causal=True, packed=True, loads="desc"),
        "varlen d128 bf16 causal gqa2": _attention(128, causal=True, gqa=2, packed=True),
        "varlen d64 bf16": _attention(64, packed=True),
        "layer_norm 4096 bf16 residual": _norm(False, 4096, torch.bfloat16),
        "layer_norm 1000 fp32 residual": _norm(False, 1000, torch.float32),
        "rms_norm 4096 bf16 residual": _norm(True, 4096, torch.bfloat16),
        "layer_norm 4096 bf16 residual, 2-stage backward": _norm(False, 4096, torch.bfloat16, stages=2),
        "layer_norm 4096 bf16 residual, split backward": _norm(False, 4096, torch.bfloat16, split=True),
        "rms_norm 8192 bf16 residual": _norm(True, 8192, torch.bfloat16),
        "rms_norm 8192 bf16 residual, split backward": _norm(True, 8192, torch.bfloat16, split=True),
        "layer_norm 16384 bf16 residual": _norm(False, 16384, torch.bfloat16),
        "rms_norm 65536 fp16 residual": _norm(True, 65536, torch.float16),
        "cross_entropy vocab 128256 bf16": _cross_entropy(128256, torch.bfloat16),
        "cross_entropy vocab 30522 fp32": _cross_entropy(30522, torch.float32),
        "rotary 32 heads d128 bf16": _rotary(32, 128, torch.bfloat16),
        "rotary 6 heads d64 fp32": _rotary(6, 64, torch.float32),
    })
    return cases


CASES = _cases()


def survey(arch: Union[str, Arch], cases: Optional[list[str]] = None) -> dict[str, list[Kernel]]:
    """Compiles what each case (a name in :data:`CASES`; all by default) launches for ``arch``: name -> kernels.

    A kernel already compiled by an earlier case is listed under that case only. Cases that need a newer
    architecture (``min_capability``: the TMA ones) are left out, unless named in ``cases``.
    """
    out = {}
    with compiling_for(arch) as kernels:
        a = _loader.offline()
        for name in cases if cases is not None else list(CASES):
            if cases is None and getattr(CASES[name], "min_capability", 0) > a.capability:
                continue
            start = len(kernels)
            CASES[name]()
            out[name] = kernels[start:]
    return out


def _table(arch: Arch, result: dict[str, list[Kernel]]) -> str:
    lines = [f"## {arch.name} ({arch.examples}): shared memory limit {arch.shared // 1024} KB per block", "",
             "| case | kernel | warps | stages | registers | stack (B) | shared (KB) | tensor memory (columns) | "
             "tensor cores | TMA | fits |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, kernels in result.items():
        for k in kernels:
            warps = f"{k.num_warps} ({k.warp_groups} warp groups)" if k.warp_groups else k.num_warps
            tma = k.tma + (f" ({k.tma_mismatches} copies unlike their buffers!)" if k.tma_mismatches else "")
            lines.append(f"| {case} | {k.label()} | {warps} | {k.num_stages} | {k.registers} | {k.stack} | "
                         f"{k.shared / 1024:.1f} | {k.tensor_memory or '-'} | {k.tensor_cores} | {tma} | "
                         f"{'yes' if k.fits else 'NO'} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmcore.ops.triton.aot",
                                description="Compile llmcore's Triton kernels for a GPU architecture (no GPU needed) "
                                            "and print registers, spills, shared memory and tensor-core use.")
    p.add_argument("--arch", action="append", choices=sorted(ARCHS), help="repeatable; default sm_90")
    p.add_argument("--case", action="append", choices=sorted(CASES), metavar="CASE",
                   help="repeatable; default: every case (" + "; ".join(CASES) + ")")
    p.add_argument("--json", metavar="PATH", help="also write the kernels as JSON")
    args = p.parse_args(argv)
    import triton

    print(f"# llmcore Triton kernels compiled ahead of time (Triton {triton.__version__}; nothing ran)\n\n"
          "Registers per thread and stack bytes (spills) from cuobjdump; shared memory per block; tensor memory "
          "(Blackwell: 512 columns); the tensor-core "
          "instructions the dots became; TMA use (reduce: the dQ tiles of LLMCORE_TRITON_DQ=tma; copy: tiles loaded "
          "through tensor descriptors, LLMCORE_TRITON_LOADS, and the warp-specialized kernels of LLMCORE_TRITON_WS, "
          "whose warps column also counts their warp groups: producer and consumers). A row with fits "
          "NO is a launch Triton would refuse on that GPU; the launcher's smaller replacement follows it. "
          "Written by `python -m llmcore.ops.triton.aot`.\n", flush=True)
    report = {}
    for name in args.arch or ["sm_90"]:
        result = survey(name, args.case)
        print(_table(ARCHS[name], result) + "\n", flush=True)
        report[name] = {case: [asdict(k) for k in ks] for case, ks in result.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
