"""Count a union kernel's instructions for Hopper on a machine without a GPU.

Compiles one of union_kernels.py's kernels for sm_90 with triton.compile (the launch's own
specialisation: pointers and strides divisible by 16), disassembles it with the cuobjdump that
Triton's wheel carries, and prints each loop's instructions a thread an iteration by opcode,
with the kernel's registers and stack (spills), and how many of them run while the warpgroup
has no wgmma in flight (after a wait for all, before the next issue: the tensor cores idle for
it unless another program's matmuls fill them). Counting before timing: a loop that loses
instructions between two wgmma waits is shorter on the critical path; on an H200 the local
passes' rates went with that share.
Use the Triton the GPU runs (the device image's torch 2.11 has Triton 3.6; newer ones compile
differently), e.g. in a venv over this one: `pip install --no-deps triton==3.6.0`.

Usage: python tools/kernels/sass_probe.py KERNEL [local|upper] [long|seed|rotary] [rows cols warps stages]
       python tools/kernels/sass_probe.py gluon|gluon_ws|gluon_dq|gluon_dkdv [rows stages [full|union]]
  KERNEL: fwd, dq or dkdv; gluon: gluon_probe.py's forward (default 64 rows, 2 stages), gluon_ws
  gluon_ws_probe.py's (64 rows a warpgroup, two a program, 3 stages), gluon_dq and gluon_dkdv
  the op's backward kernels (longctx/kernels/hopper_kernels.py, with the RoPE epilogue); causal
  unless `full`, with the long preset's weights (5 branches) under `union`; each line ends with ptxas's verdict on whether it serialises the
  wgmma (its note's code: C7514, C7512); tiles default to union.CONFIG (long, rotary) or union.SMALL_CONFIG (seed);
  long: the long preset's layout (L = 2048, 5 branches, causal); seed: head_split's (L = 1024,
  3 branches, one a head, full); rotary: long, with the backward rotating dQ and dK back
  (attention/rotary.py).
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from longctx.kernels import union
from longctx.kernels.union_kernels import KERNELS

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16", "DQ": "*bf16", "DK": "*bf16",
            "DV": "*bf16", "LSE": "*fp32", "STATS": "*fp32", "COS": "*fp32", "SIN": "*fp32"}
LAYOUTS = {"long": dict(L=2048, N_BR=5, CAUSAL=True, SPLIT=0), "seed": dict(L=1024, N_BR=1, CAUSAL=False, SPLIT=3)}
LAYOUTS["rotary"] = LAYOUTS["long"]  # compiled with the backward rotating dQ and dK back (ROPE)


def compile_sm90(name: str, which: str, preset: str, rows: int, cols: int, warps: int, stages: int):
    """The kernel compiled for sm_90 as a launch on `preset`'s layout would specialise it."""
    fn = KERNELS[name][which == "upper"]
    options = union.tile_options(name, rows, cols, warps, stages)  # BM and BN are constexprs here
    constants = dict(LAYOUTS[preset], D=64, BM=options.pop("BM"), BN=options.pop("BN"))
    if which == "upper":
        constants.pop("SPLIT")
    if name != "fwd":
        constants["ROPE"] = preset == "rotary"  # attention/rotary.py's backward
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg in POINTERS:
            signature[arg] = POINTERS[arg]
        else:
            signature[arg] = "fp32" if arg in ("qk_scale", "scale") else "i32"
        if arg in POINTERS or re.fullmatch(r"s[a-z]{2}", arg) or arg == "T":  # strides, T: multiples of 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_gluon_sm90(name: str, rows: int, stages: int, causal: bool = True, branches: int = 1):
    """gluon_probe.py's (or gluon_ws_probe.py's) forward, or the op's dQ or dK/dV kernel, compiled
    for sm_90 (bf16, head dim 64, rows × 64 TMA boxes)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gluon_probe
    import gluon_ws_probe
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from longctx.kernels import hopper_kernels

    box = f"tensordesc<bf16[{rows}, 64],{gl.NVMMASharedLayout.get_default_for([rows, 64], gl.bfloat16)!r}>"
    if name in ("gluon_dq", "gluon_dkdv"):  # the op's kernels (hopper_kernels), with attention/rotary.py's epilogue
        fn = hopper_kernels.dq if name == "gluon_dq" else hopper_kernels.dkdv
        signature = {arg: box for arg in ("q_desc", "k_desc", "v_desc", "do_desc")}
        signature.update(o_ptr="*bf16", lse_ptr="*fp32", dq_ptr="*bf16", dk_ptr="*bf16", dv_ptr="*bf16",
                         stats_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32", sgb="i32", sgt="i32", sgh="i32")
        signature.update(T="i32", H="i32", W="i32", R="i32", h0="i32", nh="i32", BH="i32", qk_scale="fp32",
                         scale="fp32")
    else:
        fn = gluon_probe._fwd if name == "gluon" else gluon_ws_probe._fwd_ws
        signature = {arg: box for arg in ("q_desc", "k_desc", "v_desc", "o_desc")}
        signature.update(lse_ptr="*fp32", T="i32", H="i32", W="i32", R="i32", h0="i32", nh="i32", qk_scale="fp32")
    signature.update(STAGES="constexpr", CAUSAL="constexpr", N_BR="constexpr", num_warps="constexpr")
    constants = {"STAGES": stages, "CAUSAL": causal, "N_BR": branches, "num_warps": rows // 16}
    if name in ("gluon_dq", "gluon_dkdv"):
        signature["ROPE"] = "constexpr"
        constants["ROPE"] = True
    signature = {arg: signature[arg] for arg in fn.arg_names}
    src = GluonASTSource(fn, signature, constexprs=constants)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": rows // 16})


def serialised(kernel) -> str:
    """ptxas's notes (C75xx) on serialising the kernel's wgmma, or "no": C7514, accumulator
    registers read by other instructions while a wgmma may still write them; C7512, too few
    registers (a warp-specialised kernel's register budget is its launch's, whatever its
    partitions ask for)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        ptxas = get_ptxas(90).path  # the one Triton compiles sm_90 with (its wheel may carry two)
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    notes = sorted(set(re.findall(r"\((C75\d\d)\)[^\n]*serializ", out.stdout + out.stderr)))
    return ", ".join(notes) or "no"


def tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loops(sass: str):
    """(first address, instructions) of each loop: the code between a backward branch and its target."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    index = {address: i for i, (address, _) in enumerate(code)}
    for i, (address, text) in enumerate(code):
        target = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address and int(target.group(1), 16) in index:
            start = index[int(target.group(1), 16)]
            yield code[start][0], [t for _, t in code[start:i + 1]]


def exposed(body) -> int:
    """Instructions of one iteration that run while this warpgroup has no wgmma in flight: from a
    wait for all of them (WARPGROUP.DEPBAR.LE gsb0, 0x0) to the next HGMMA, the loop taken as a
    cycle (a second pass, so the state at the back edge carries over)."""
    busy, count = False, 0
    for n, text in enumerate(body + body):
        if "HGMMA" in text:
            busy = True
        elif re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b", text):
            busy = False
        count += n >= len(body) and not busy
    return count


def programs_per_sm(registers: int, warps: int, shared: int) -> int:
    """How many programs of a kernel an H100/H200 SM holds at once: 65,536 registers, given out a
    warp at a time in units of 256 (a thread's count rounded up to 8); 228 KB of shared memory,
    1 KB of it reserved a program; at most 64 warps and 32 programs."""
    by_registers = 65536 // (-(-registers // 8) * 8 * 32 * warps)
    return min(by_registers, 233472 // (shared + 1024), 64 // warps, 32)


def opcode(instruction: str) -> str:
    words = instruction.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def main(argv):
    name = argv[0] if argv else sys.exit(__doc__)
    if name.startswith("gluon"):
        rows, stages = [int(x) for x in argv[1:3]] or (64, 3 if name == "gluon_ws" else 2)
        causal, branches = argv[3:4] != ["full"], 5 if argv[3:4] == ["union"] else 1
        preset = ("causal segments" if causal else "segments") + (", 5 branches' weights" if branches > 1 else "")
        warps = rows // 16 * (2 if name == "gluon_ws" else 1)  # gluon_ws: two warpgroups a program
        which, cols = "backward" if name in ("gluon_dq", "gluon_dkdv") else "forward", rows
        kernel = compile_gluon_sm90(name, rows, stages, causal, branches)
    else:
        which = argv[1] if len(argv) > 1 else "local"
        preset = argv[2] if len(argv) > 2 else "long"
        config = union.SMALL_CONFIG if preset == "seed" else union.CONFIG
        rows, cols, warps, stages = [int(x) for x in argv[3:7]] or config[name]
        kernel = compile_sm90(name, which, preset, rows, cols, warps, stages)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    print(f"{name} {which} ({preset}; rows {rows}, cols {cols}, {warps} warps, {stages} stages), Triton "
          f"{triton.__version__}: {regs.group(1)} registers, {regs.group(2)} bytes of stack, "
          f"{kernel.metadata.shared} bytes of shared memory: "
          f"{programs_per_sm(int(regs.group(1)), warps, kernel.metadata.shared)} programs an SM; "
          f"{sass.count(';')} instructions in all; wgmma serialised by ptxas: {serialised(kernel)}")
    for address, body in loops(sass):
        counts = collections.Counter(opcode(t) for t in body)
        print(f"  loop at {address:#x}: {len(body)} instructions an iteration, {exposed(body)} with no wgmma "
              "in flight; " + ", ".join(f"{op} {n}" for op, n in counts.most_common(14)))

if __name__ == "__main__":
    main(sys.argv[1:])
