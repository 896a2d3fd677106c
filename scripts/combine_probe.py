"""Launch shapes for combine.py's kernels, timed on the pieces of the long preset's layout.

Run 38's profile had the merge at ~1 TB/s where the sum kernel moved ~2 TB/s (both read each
piece's rows once and write one (B, T, H, D) tensor). This times both kernels for a few
(elements per program, warps), against a device copy of the same bytes, and checks each
result against the default launch's (docs/performance.md, runs 41–42 and 48–49).
Usage: python3 scripts/combine_probe.py [T ...]   (default 32768 131072; the long preset's layout)
"""
import sys

import torch
import triton
from triton.testing import do_bench

from longctx.attention import combine
from longctx.attention.improved import _layout, attend_pieces, piece_grads


def main(lengths):
    H, D = 12, 64
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for T in lengths:
        segs = tuple(2048 * 2**i for i in range(5) if 2048 * 2**i <= T)
        dils = tuple(2**i for i in range(len(segs)))
        q, k, v, dout = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        pieces, _ = _layout(T, H, segs, dils, False)
        outs, lses = attend_pieces(q, k, v, pieces, True, D**-0.5)
        out, lse = combine.merge_pieces(q, pieces, outs, lses)
        parts = [piece_grads((dout, q, k, v, out), lse, p, True, D**-0.5)[0] for p in pieces]
        geoms = tuple(map(combine.piece_geometry, pieces))
        o_strides, l_strides, p_strides = combine._strides(outs, 4), combine._strides(lses, 3), combine._strides(parts, 4)
        read = sum(o.numel() * 2 for o in outs)
        moved = {"merge": read + sum(x.numel() * 4 for x in lses) + out.numel() * 2 + lse.numel() * 4,
                 "sum": sum(x.numel() * 2 for x in parts) + out.numel() * 2}
        big = torch.empty(moved["merge"] // 2, dtype=torch.uint8, device="cuda")
        ms = do_bench(lambda: big.clone())
        print(f"T={T}: {len(pieces)} pieces; device copy of {moved['merge'] / 1e6:.0f} MB: {ms * 1e3:.1f} us, "
              f"{moved['merge'] / ms / 1e9:.2f} TB/s")
        ref_out, ref_lse = out.float(), lse
        ref_sum = combine.sum_pieces(q, pieces, parts).float()
        for tile, warps in [(4096, 4), (2048, 4), (4096, 8), (2048, 2), (8192, 8), (1024, 4), (2048, 8)]:
            row = [f"  tile {tile:5d} warps {warps}:"]
            o, l = torch.empty_like(q), torch.empty_like(lse)
            ms = do_bench(lambda: combine._launch(combine._merge_kernel, o, l, tuple(outs), tuple(lses), tile=tile, warps=warps,
                                                  GEOMS=geoms, O_STRIDES=o_strides, L_STRIDES=l_strides))
            err = max((o.float() - ref_out).abs().max().item(), (l - ref_lse).abs().max().item())
            row.append(f"merge {ms * 1e3:6.1f} us {moved['merge'] / ms / 1e9:4.2f} TB/s (max diff {err:.1e})")
            g = torch.empty_like(q)
            ms = do_bench(lambda: combine._launch(combine._sum_kernel, g, tuple(parts), tile=tile, warps=warps, GEOMS=geoms,
                                                  STRIDES=p_strides))
            err = (g.float() - ref_sum).abs().max().item()
            row.append(f"sum {ms * 1e3:6.1f} us {moved['sum'] / ms / 1e9:4.2f} TB/s (max diff {err:.1e})")
            print(" | ".join(row), flush=True)
        del outs, lses, parts, big


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [32768, 131072])
