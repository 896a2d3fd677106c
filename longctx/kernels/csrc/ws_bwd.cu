// The backward of ws_fwd.cu's problem (the union local pass, weight terms included) with
// the same producer/consumer structure, as the union kernels split it: a dK/dV pass and a dQ pass,
// one templated kernel. A CTA fixes 128 rows (keys for dK/dV, queries for dQ), two consumer
// warpgroups (240 registers) taking 64 each; a TMA producer warp (its warpgroup at 24 registers)
// loads the fixed rows' two tiles once (K and V, or Q and dO) and streams the other side's
// 64-row tiles (Q and dO, or K and V) through a ring of stages. Per streamed tile a consumer
// computes X = fixed₀·streamed₀ᵀ and dX = fixed₁·streamed₁ᵀ (Sᵀ and dPᵀ, or S and dP: wgmma
// from shared memory), P = exp2(X·scale·log2e + log2 m − LSE₂) and dS = P∘(dX − Δ) in registers,
// then dV += Pᵀ dO and dK += dSᵀ Q, or dQ += dS K (P and dS as register operands, the streamed
// tiles read N-major). LSE₂ (log2 units) and Δ = rowsum(dO∘O) come as the union kernels' STATS,
// (2, B·H, T) float32 by row (the position, or under head_split the branch's row). Every wgmma
// group is waited for at once (or, with OVERLAP, the next tile's scores run under this tile's
// gradients); the two consumers overlap each other. The same kernel runs the union's upper passes
// (ws_bwd_upper): class tiles against each level's partners, read through the maps of their
// dilations, their gradients added to the local passes'. A tile's steps are in ws_bwd_tile.cuh,
// where the rows are in ws_layout.cuh. Built by longctx/kernels/hopper_cuda.py (nvcc, sm_90a);
// probed by tools/kernels/ws_bwd_probe.py.
#include <type_traits>

#include "ws_bwd_tile.cuh"

namespace {

using namespace ws;
using namespace ws::bwd;

// A CTA's work: 128 fixed rows and the streamed tiles that meet them. Local items (ws_layout.cuh's
// fixed_item): n_tiles from `first` in the segment from seg0, in the fixed rows' own map. Upper
// items (upper_item): class k's rows, and for each live level a (bit a − 2 of `levels`) the L/2
// partners 2^(a−1) apart (map a − 1).
struct Work {
  Head hd;
  int vrow0, seg0, f0, first, n_tiles, k, levels;
};

template <bool DQ, bool UPPER>
__device__ __forceinline__ Work item(int w, int B, int T, int H, int L, int causal, int branches, int split,
                                     int per_rank) {
  if (UPPER) {
    const UpperItem u = upper_item(w, B, T, H, L, branches, BF, causal, !DQ);
    return {u.hd, u.vrow0, 0, u.y0, 0, __popc(u.levels) * (L / 2 / BS), u.k, u.levels};
  }
  const FixedItem x = fixed_item(DQ, w, B, T, H, L, causal, split, per_rank, BF, BS);
  return {x.hd, x.vrow0, x.seg0, x.f0, x.first, x.n_tiles, 0, 0};
}

// Level a's first partner of an upper item (its rows keys for dK/dV), and whether it has any.
template <bool DQ>
__device__ __forceinline__ int partners(const Work& x, int a, int L, int causal, bool& live) {
  return level_start(x.hd.o + (x.f0 << x.hd.shift), x.hd.h, a, L, causal, !DQ, live);
}

// A CTA takes the items blockIdx.x, + gridDim.x, ...: one each, or persistent, the fixed tiles
// double-buffered and the streamed ring running on across items. UPPER: the upper passes' items,
// level by level (a causal one may have none: skipped by every role), their gradients added to
// the local passes' (without OVERLAP). n_items: the launch's count of items (ws_layout.cuh's
// upper_items, or per_rank · L / BF).
template <bool DQ, bool OVERLAP, bool UPPER = false>
__global__ void __launch_bounds__(384, 1)
    ws_bwd_kernel(const __grid_constant__ Maps fixed0_maps, const __grid_constant__ Maps fixed1_maps,
                  const __grid_constant__ Maps stream0_maps, const __grid_constant__ Maps stream1_maps,
                  int4 map_rows, float* __restrict__ stats, const __nv_bfloat16* __restrict__ out, long long out_row,
                  const __nv_bfloat16* __restrict__ dout, long long do_row, const float* __restrict__ lse,
                  const float* __restrict__ rope_cos, const float* __restrict__ rope_sin,
                  __nv_bfloat16* __restrict__ grad0, __nv_bfloat16* __restrict__ grad1, long long grad_row, int B,
                  int T, int H, int L, float scale, int causal, int branches, int split, int per_rank,
                  int n_items) {
  extern __shared__ uint8_t raw[];
  Shared& sh = aligned_shared<Shared>(raw);
  const int wg = warpgroup();

  if (threadIdx.x == 0) {
    bar_init_buffers(sh.fixed_full, sh.fixed_empty, 2);
    bar_init_buffers(sh.full, sh.empty, STAGES);
    bar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (threadIdx.x == 0) {
      int ring = 0;  // streamed tiles loaded so far
      auto stream = [&](int map, int o, int col, int at) {
        const int s = ring % STAGES;
        if (ring >= STAGES) bar_wait(&sh.empty[s], (ring / STAGES - 1) & 1);
        bar_expect(&sh.full[s], 2 * STREAM_BYTES);
        tma_load(sh.streamed[s][0], &stream0_maps.m[map], &sh.full[s], o * map_rows.z + col, at);
        tma_load(sh.streamed[s][1], &stream1_maps.m[map], &sh.full[s], o * map_rows.w + col, at);
        ++ring;
      };
      for (int w = blockIdx.x, it = 0; w < n_items; w += gridDim.x) {
        const Work x = item<DQ, UPPER>(w, B, T, H, L, causal, branches, split, per_rank);
        if (UPPER && x.n_tiles == 0) continue;  // a causal upper item without partners
        const int fb = it % 2, sh_i = x.hd.shift, o = x.hd.o, col = x.hd.h * D;
        if (it >= 2) bar_wait(&sh.fixed_empty[fb], (it / 2 - 1) & 1);
        bar_expect(&sh.fixed_full[fb], 2 * FIXED_BYTES);
        tma_load(sh.fixed[fb][0], &fixed0_maps.m[sh_i], &sh.fixed_full[fb], o * map_rows.x + col, x.vrow0 + x.f0);
        tma_load(sh.fixed[fb][1], &fixed1_maps.m[sh_i], &sh.fixed_full[fb], o * map_rows.y + col, x.vrow0 + x.f0);
        if (!UPPER) {
          for (int n = 0; n < x.n_tiles; ++n) stream(sh_i, o, col, x.vrow0 + x.seg0 + (x.first + n) * BS);
        } else {
          for (int a = 2; a <= x.k + 1; ++a) {
            bool live;
            const int start = partners<DQ>(x, a, L, causal, live), m = a - 1;
            for (int t = 0; live && t < L / 2 / BS; ++t)
              stream(m, start & ((1 << m) - 1), col, x.hd.b * (T >> m) + (start >> m) + t * BS);
          }
        }
        ++it;
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");

  const int c = wg - 1, tid = threadIdx.x % 128, lane = tid % 32;
  const float scale_log2 = scale * 1.4426950408889634f;
  Rows r;
  r.tq = lane % 4;
#pragma unroll
  for (int i = 0; i < 32; ++i) r.x[i] = r.dx[i] = 0.f;  // the first wgmma of each tile overwrites them
  int ring = 0;  // streamed tiles consumed so far, as the producer counts them
  for (int w = blockIdx.x, it = 0; w < n_items; w += gridDim.x) {
    const Work x = item<DQ, UPPER>(w, B, T, H, L, causal, branches, split, per_rank);
    if (UPPER && x.n_tiles == 0) continue;  // a causal upper item without partners
    const int fb = it % 2, h = x.hd.h, seg0 = x.seg0, f0 = x.f0, first = x.first, n_tiles = x.n_tiles;
    const long long row0 = (long long)x.hd.b * T;  // the batch element's first position's row
    r.row = f0 + 64 * c + 16 * (tid / 32) + lane / 4;
#pragma unroll
    for (int i = 0; i < 32; ++i) r.g0[i] = r.g1[i] = 0.f;
    if (!UPPER) weight_terms(r.bias, r.row, r.tq, h, branches);  // (head_split: one branch, no weights)
    float* lse2 = stats + (long long)(x.hd.b * H + h) * T;  // by y: under head_split, the branch's rows
    float* delta = lse2 + (long long)B * H * T;
    if (DQ) {  // a query's LSE₂ folds into its weight terms: one FFMA an exponent
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = r.row + 8 * half;
        float l2, dl;
        if (out != nullptr) {  // STATS made here, for this pass, dK/dV's and the upper passes'
          const long long at = row0 + ((long long)row << x.hd.shift) + x.hd.o;
          l2 = lse[at * H + h] * 1.4426950408889634f;
          dl = row_dot(out + at * out_row + h * D + 16 * r.tq, dout + at * do_row + h * D + 16 * r.tq);
          dl += __shfl_xor_sync(0xffffffff, dl, 1);
          dl += __shfl_xor_sync(0xffffffff, dl, 2);
          if (r.tq == 0) {
            lse2[row] = l2;
            delta[row] = dl;
          }
        } else {  // the upper pass's rows are 2^shift positions apart
          const int stat = UPPER ? (row << x.hd.shift) + x.hd.o : row;
          l2 = lse2[stat];
          dl = delta[stat];
        }
        r.delta[half] = dl;
        r.lse2[half] = l2;
#pragma unroll
        for (int i = 4 * half; i < 4 * half + 4; ++i) r.bias[i] -= UPPER ? 0.f : l2;
      }
    }
    const uint64_t f0_desc = descriptor(sh.fixed[fb][0] + 64 * c * D, 16, 1024);
    const uint64_t f1_desc = descriptor(sh.fixed[fb][1] + 64 * c * D, 16, 1024);
    bar_wait(&sh.fixed_full[fb], (it / 2) & 1);

    const bool leader = tid == 0;
    if (UPPER) {  // level by level, each with its partners' weight terms; no mask
      for (int a = 2; a <= x.k + 1; ++a) {
        bool live;
        const int start = partners<DQ>(x, a, L, causal, live), m = a - 1;
        if (!live) continue;
        upper_terms(r.bias, start, r.tq, h, x.k, a, branches);
#pragma unroll
        for (int i = 0; i < 8; ++i) r.bias[i] -= DQ ? r.lse2[i / 4] : 0.f;
        auto tiles = [&](auto gather) {  // dK/dV's STATS reads with the level's stride a constant
          for (int t = 0; t < L / 2 / BS; ++t, ++ring) {
            Tile tile = take(sh, ring, start >> m, 0, t);
            tile.o = start & ((1 << m) - 1);
            issue_scores(r, f0_desc, f1_desc, tile);
            wgmma_wait<0>();
            scores_done<DQ, 0, decltype(gather)::value>(r, tile, false, f0, scale_log2, lse2, delta);
            issue_gradients<DQ, 0>(r, tile);
            wgmma_wait<0>();
            gradients_done<0>(r, sh, tile, leader);
          }
        };
        if (DQ || m == 1)  // (dQ reads no streamed STATS)
          tiles(std::integral_constant<int, 1>{});
        else if (m == 2)
          tiles(std::integral_constant<int, 2>{});
        else if (m == 3)
          tiles(std::integral_constant<int, 3>{});
        else
          tiles(std::integral_constant<int, 4>{});
      }
    } else if (!OVERLAP) {  // each group waited for at once; the two consumers overlap each other
      for (int n = 0; n < n_tiles; ++n, ++ring) {
        const Tile t = take(sh, ring, seg0, first, n);
        issue_scores(r, f0_desc, f1_desc, t);
        wgmma_wait<0>();
        scores_done<DQ, 0>(r, t, causal, f0, scale_log2, lse2, delta);
        issue_gradients<DQ, 0>(r, t);
        wgmma_wait<0>();
        gradients_done<0>(r, sh, t, leader);
      }
    } else {  // tile n + 1's X and dX issued before tile n's gradients, its P and dS made under them
      Tile t = take(sh, ring, seg0, first, 0);
      issue_scores(r, f0_desc, f1_desc, t);
      wgmma_wait<0>();
      scores_done<DQ, 0>(r, t, causal, f0, scale_log2, lse2, delta);
      int n = 0;
      for (; n + 2 < n_tiles; n += 2) {  // two tiles, each with a next one, through both buffers
        overlapped<DQ, 0>(r, sh, t, ring, n, seg0, first, f0, f0_desc, f1_desc, causal, scale_log2, lse2, delta,
                          leader);
        overlapped<DQ, 1>(r, sh, t, ring, n + 1, seg0, first, f0, f0_desc, f1_desc, causal, scale_log2, lse2, delta,
                          leader);
      }
      if (n + 1 < n_tiles) {  // two left, or one
        overlapped<DQ, 0>(r, sh, t, ring, n, seg0, first, f0, f0_desc, f1_desc, causal, scale_log2, lse2, delta,
                          leader);
        last_tile<DQ, 1>(r, sh, t, ring, leader);
      } else {
        last_tile<DQ, 0>(r, sh, t, ring, leader);
      }
    }
    if (tid == 0) bar_arrive(&sh.fixed_empty[fb]);  // every matmul of this item has retired

#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const long long pos = ((long long)(r.row + 8 * half) << x.hd.shift) + x.hd.o;
      const long long at = (row0 + pos) * grad_row + h * D + 2 * r.tq;
      float g[16];  // dQ or dK of the row, scaled: columns 8j + 2·tq + e at [2j + e]
#pragma unroll
      for (int i = 0; i < 16; ++i) g[i] = r.g0[4 * (i / 2) + 2 * half + i % 2] * scale;
      if (rope_cos != nullptr) {  // rotated back by RoPE's angles at pos: column c pairs with c + 32
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const long long angle = pos * (D / 2) + 8 * j + 2 * r.tq;
          const float2 c = *reinterpret_cast<const float2*>(rope_cos + angle);
          const float2 sn = *reinterpret_cast<const float2*>(rope_sin + angle);
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float a = g[2 * j + e], b = g[2 * j + 8 + e], ce = e ? c.y : c.x, se = e ? sn.y : sn.x;
            g[2 * j + e] = a * ce + b * se;
            g[2 * j + 8 + e] = b * ce - a * se;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        __nv_bfloat162* g0 = reinterpret_cast<__nv_bfloat162*>(grad0 + at + 8 * j);
        __nv_bfloat162* g1 = reinterpret_cast<__nv_bfloat162*>(grad1 + at + 8 * j);
        float2 add0 = {0.f, 0.f}, add1 = {0.f, 0.f};
        if (UPPER) {  // onto the local passes' gradients (rotated alike: a rotation is linear)
          add0 = __bfloat1622float2(*g0);
          if (!DQ) add1 = __bfloat1622float2(*g1);
        }
        *g0 = __floats2bfloat162_rn(g[2 * j] + add0.x, g[2 * j + 1] + add0.y);
        if (!DQ) *g1 = __floats2bfloat162_rn(r.g1[4 * j + 2 * half] + add1.x, r.g1[4 * j + 2 * half + 1] + add1.y);
      }
      if (!UPPER && x.hd.shift) {  // head_split: zero gradients at the positions between this branch's
        zero_unkept(grad0 + at - x.hd.o * grad_row, grad_row, x.hd, 8);
        if (!DQ) zero_unkept(grad1 + at - x.hd.o * grad_row, grad_row, x.hd, 8);
      }
    }
    ++it;
  }
}

int launch(bool upper, const void* q, const void* k, const void* v, long long q_row, long long k_row, long long v_row,
           const void* dout, long long do_row, float* stats, const void* out, long long out_row, const float* lse,
           const float* rope_cos, const float* rope_sin, void* grad0, void* grad1, long long grad_row, int B, int T,
           int H, int L, int causal, float scale, int branches, int split, int dq, int overlap, int ctas, int per_rank,
           int items, int dilations, void* stream) {
  Maps maps[4];  // fixed₀, fixed₁, streamed₀, streamed₁
  const long long positions = (long long)B * T;
  const void* bases[4] = {dq ? q : k, dq ? dout : v, dq ? k : q, dq ? v : dout};
  const long long rows[4] = {dq ? q_row : k_row, dq ? do_row : v_row, dq ? k_row : q_row, dq ? v_row : do_row};
  for (int i = 0; i < 4; ++i)
    if (const int e = tensor_maps(&maps[i], bases[i], positions, H, rows[i], i < 2 ? BF : BS, dilations)) return e;
  const int bytes = shared_bytes<Shared>();
  auto kernel = upper ? (dq ? ws_bwd_kernel<true, false, true> : ws_bwd_kernel<false, false, true>)
                : dq  ? (overlap ? ws_bwd_kernel<true, true> : ws_bwd_kernel<true, false>)
                      : (overlap ? ws_bwd_kernel<false, true> : ws_bwd_kernel<false, false>);
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  kernel<<<ctas > 0 && ctas < items ? ctas : items, 384, bytes, static_cast<cudaStream_t>(stream)>>>(
      maps[0], maps[1], maps[2], maps[3], make_int4(int(rows[0]), int(rows[1]), int(rows[2]), int(rows[3])), stats,
      static_cast<const __nv_bfloat16*>(out), out_row, static_cast<const __nv_bfloat16*>(dout), do_row, lse,
      rope_cos, rope_sin, static_cast<__nv_bfloat16*>(grad0), static_cast<__nv_bfloat16*>(grad1), grad_row, B, T, H,
      L, scale, causal, branches, split, per_rank, items);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// The gradients of ws_fwd's attention for q/k/v and dO (q_row, k_row, v_row, do_row elements
// between positions), given STATS (2, B·H, T) float32 (log2 LSE and Δ = rowsum(dO∘O) by row y,
// the position without head_split): dK and dV into grad0 and grad1, or (dq) dQ into grad0,
// (B, T, H, 64) bf16, grad_row apart. With out (the forward's O, out_row apart) and lse ((B, T, H)
// float32, natural log), the dQ pass writes STATS itself before using them, for the dK/dV pass
// that follows. With rope_cos and rope_sin ((T, 32) float32), dQ and dK come out rotated back by
// RoPE's angles (half-split), the gradients of the unrotated q and k. split: head_split as in
// ws_fwd (the positions a head does not keep get zero gradients). overlap: the next tile's X and
// dX and its P and dS under this tile's gradient matmuls (FlashAttention-3's overlap inside a
// warpgroup), else each group waited for at once. ctas > 0: a persistent grid of that many CTAs
// (at most one an item); 0: one CTA an item.
// Returns 0, a CUDA error, or -1 (no cuTensorMapEncodeTiled), -2 (a map refused), -3 (shapes).
extern "C" int ws_bwd(const void* q, const void* k, const void* v, long long q_row, long long k_row,
                      long long v_row, const void* dout, long long do_row, float* stats, const void* out,
                      long long out_row, const float* lse, const float* rope_cos, const float* rope_sin,
                      void* grad0, void* grad1, long long grad_row, int B, int T, int H, int L, int causal,
                      float scale, int branches, int split, int dq, int overlap, int ctas, void* stream) {
  if (!problem_ok(T, H, L, BF, branches, split) || (out != nullptr && !dq)) return -3;
  const int per_rank = items_per_rank(B, T, H, L, split);
  return launch(false, q, k, v, q_row, k_row, v_row, dout, do_row, stats, out, out_row, lse, rope_cos, rope_sin,
                grad0, grad1, grad_row, B, T, H, L, causal, scale, branches, split, dq, overlap, ctas, per_rank,
                per_rank * (L / BF), dilations(split), stream);
}

// The union backward's upper passes (levels ≥ 2 of `branches` branches, union.py) after ws_bwd's
// local ones: their dQ (dq), or dK and dV, added to the local passes' in grad0 (and grad1), from
// the STATS the local dQ pass wrote (by position). Arguments as in ws_bwd; returns as ws_bwd.
extern "C" int ws_bwd_upper(const void* q, const void* k, const void* v, long long q_row, long long k_row,
                            long long v_row, const void* dout, long long do_row, float* stats,
                            const float* rope_cos, const float* rope_sin, void* grad0, void* grad1, long long grad_row,
                            int B, int T, int H, int L, int causal, float scale, int branches, int dq, int ctas,
                            void* stream) {
  if (!upper_ok(T, L, BF, branches)) return -3;
  return launch(true, q, k, v, q_row, k_row, v_row, dout, do_row, stats, nullptr, 0, nullptr, rope_cos, rope_sin,
                grad0, grad1, grad_row, B, T, H, L, causal, scale, branches, 0, dq, 0, ctas, 0,
                upper_items(B, T, H, branches, BF), branches, stream);
}
