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
// gradients); the two consumers overlap each other. Built by longctx/kernels/hopper_cuda.py (nvcc,
// sm_90a); probed by tools/kernels/ws_bwd_probe.py.
#include "ws_common.cuh"

namespace {

using namespace ws;

constexpr int BF = 128;  // fixed rows a CTA: two consumer warpgroups of 64
constexpr int BS = 64;   // streamed rows a stage
constexpr int STAGES = 2;
constexpr int FIXED_BYTES = BF * D * 2, STREAM_BYTES = BS * D * 2;  // 16 KB, 8 KB

struct Shared {
  alignas(1024) __nv_bfloat16 fixed[2][2][BF * D];           // two items' K, V (dK/dV) or Q, dO (dQ)
  alignas(1024) __nv_bfloat16 streamed[STAGES][2][BS * D];   // Q, dO (dK/dV) or K, V (dQ)
  uint64_t fixed_full[2], fixed_empty[2], full[STAGES], empty[STAGES];
};

// One consumer's 64 fixed rows against one streamed tile. Accumulator layout as in ws_fwd.cu:
// register 4j + 2·half + e holds fixed row 16w + lane/4 + 8·half, streamed row 8j + 2·(lane % 4) + e.
struct Rows {
  float x[32], dx[32], g0[32], g1[32];  // X, dX; the gradients: dK and dV, or dQ (g0)
  uint32_t p[2][16], ds[2][16];  // P and dS in bf16 pairs, two tiles' (OVERLAP): [4kk .. 4kk + 3] is
                                 // streamed step kk's A operand
  float bias[8];           // log2 m by [half][j mod 2][e] (a streamed row's λ is fixed by its place in the
                           // tile); for dQ, log2 m − LSE₂ of the row
  float delta[2];          // dQ: the fixed rows' (queries') Δ
  int row, tq;             // the thread's first fixed row (absolute), lane % 4
};

// P and dS of one streamed tile from X and dX into buffer BUF, packed to bf16 as the next matmuls'
// A operands. MASK: a tile across the causal diagonal, the only kind that needs the compare and
// select an element (dK/dV: query ≥ key with queries streamed; dQ: key ≤ query with keys
// streamed). dK/dV reads its streamed queries' LSE₂ and Δ (8j + 2·tq + e) from STATS here.
template <bool DQ, bool MASK, int BUF>
__device__ __forceinline__ void probabilities(Rows& r, int s0, float scale_log2, const float* lse2,
                                              const float* delta) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float2 col_lse = {0.f, 0.f}, col_delta = {0.f, 0.f};
    if (!DQ) {
      col_lse = *reinterpret_cast<const float2*>(lse2 + s0 + 8 * j + 2 * r.tq);
      col_delta = *reinterpret_cast<const float2*>(delta + s0 + 8 * j + 2 * r.tq);
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = 4 * j + 2 * half;
      float pv[2], dsv[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float dl = DQ ? r.delta[half] : (e ? col_delta.y : col_delta.x);
        const int fixed = r.row + 8 * half, streamed = s0 + 8 * j + 2 * r.tq + e;
        const float z = fmaf(r.x[i + e], scale_log2, r.bias[4 * half + 2 * (j % 2) + e]);
        float pe = ex2(DQ ? z : z - (e ? col_lse.y : col_lse.x));  // dQ's bias holds log2 m − LSE₂
        if (MASK && (DQ ? streamed > fixed : streamed < fixed)) pe = 0.f;
        pv[e] = pe;
        dsv[e] = pe * (r.dx[i + e] - dl);
      }
      __nv_bfloat162 pp = __floats2bfloat162_rn(pv[0], pv[1]), dd = __floats2bfloat162_rn(dsv[0], dsv[1]);
      r.p[BUF][i / 2] = *reinterpret_cast<uint32_t*>(&pp);
      r.ds[BUF][i / 2] = *reinterpret_cast<uint32_t*>(&dd);
    }
  }
}

// One streamed tile's place: its stage's two descriptors, the stage and its first row.
struct Tile {
  uint64_t s0_desc, s1_desc;
  int st, s0;
};

// The streamed tile that the ring's count `ring` holds, waited for: the n-th of the item's.
__device__ __forceinline__ Tile take(Shared& sh, int ring, int seg0, int first, int n) {
  const int st = __shfl_sync(0xffffffff, ring % STAGES, 0);  // uniform registers for the descriptors (as wg)
  bar_wait(&sh.full[st], (ring / STAGES) & 1);
  return {descriptor(sh.streamed[st][0], 16, 1024), descriptor(sh.streamed[st][1], 16, 1024), st,
          seg0 + (first + n) * BS};
}

// X = fixed₀·streamed₀ᵀ and dX = fixed₁·streamed₁ᵀ issued as one group.
__device__ __forceinline__ void issue_scores(Rows& r, uint64_t f0_desc, uint64_t f1_desc, const Tile& t) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wgmma_m64n64k16_ss(r.x, f0_desc + 2 * kk, t.s0_desc + 2 * kk, kk);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wgmma_m64n64k16_ss(r.dx, f1_desc + 2 * kk, t.s1_desc + 2 * kk, kk);
  wgmma_commit();
}

// dK += dSᵀQ and dV += PᵀdO, or dQ += dS K, from buffer BUF, issued as one group (the streamed
// tiles read N-major, 16 rows of 128 bytes a step).
template <bool DQ, int BUF>
__device__ __forceinline__ void issue_gradients(Rows& r, const Tile& t) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BS / 16; ++kk) wgmma_m64n64k16_rs(r.g0, &r.ds[BUF][4 * kk], t.s0_desc + (16 * 128 >> 4) * kk);
  if (!DQ) {
#pragma unroll
    for (int kk = 0; kk < BS / 16; ++kk) wgmma_m64n64k16_rs(r.g1, &r.p[BUF][4 * kk], t.s1_desc + (16 * 128 >> 4) * kk);
  }
  wgmma_commit();
}

// After X and dX of tile t have retired: P and dS into buffer BUF, masked where t crosses the
// CTA's diagonal (some of its pairs have the query before the key).
template <bool DQ, int BUF>
__device__ __forceinline__ void scores_done(Rows& r, const Tile& t, bool causal, int f0, float scale_log2,
                                            const float* lse2, const float* delta) {
  pin(r.x);
  pin(r.dx);
  if (causal && (DQ ? t.s0 + BS > f0 : t.s0 < f0 + BF))
    probabilities<DQ, true, BUF>(r, t.s0, scale_log2, lse2, delta);
  else
    probabilities<DQ, false, BUF>(r, t.s0, scale_log2, lse2, delta);
}

// After tile t's gradient matmuls from buffer BUF have retired: its stage released.
template <int BUF>
__device__ __forceinline__ void gradients_done(Rows& r, Shared& sh, const Tile& t, bool leader) {
  pin(r.g0);
  pin(r.g1);
  pin(r.p[BUF]);
  pin(r.ds[BUF]);
  if (leader) bar_arrive(&sh.empty[t.st]);
}

// A CTA's work items: 128 fixed rows of one head's segment, ordered by how many streamed tiles
// meet them under the causal mask, most first (dK/dV: a segment's first key tile; dQ: its last
// query tile), then by head, batch element and segment (ws_common.cuh's work); `first` and
// `n_tiles` are the streamed tiles that meet them (query ≥ key): for dK/dV the query tiles from f0
// on, for dQ the key tiles up to f0 + BF. Rows are y (view rows from vrow0, the batch element's
// first).
struct Item {
  Head hd;
  int vrow0, seg0, f0, first, n_tiles;
};

template <bool DQ>
__device__ __forceinline__ Item item(int w, int B, int T, int H, int L, int causal, int split, int per_rank) {
  int seg, rank;
  const Head hd = work(w, B, T, H, L, split, per_rank, seg, rank);
  const int per_seg = L / BF, seg0 = seg * L, f0 = seg0 + (causal && DQ ? per_seg - 1 - rank : rank) * BF;
  const int first = causal && !DQ ? (f0 - seg0) / BS : 0;
  const int n_tiles = !causal ? L / BS : DQ ? (f0 - seg0) / BS + BF / BS : (seg0 + L - f0) / BS;
  return {hd, hd.b * (T >> hd.shift), seg0, f0, first, n_tiles};
}

// OVERLAP's step for tile t (P and dS in buffer BUF), which has a next one, the n-th: the next
// tile's X and dX issued, then t's gradient matmuls; once the first group retires, the next
// tile's P and dS are made into the other buffer while the gradients are still in flight (groups
// retire in order); then t's stage is released, and t and ring move on. No branch inside: ptxas
// serializes every wgmma (C7514) when a branch separates one from its wait.
template <bool DQ, int BUF>
__device__ __forceinline__ void overlapped(Rows& r, Shared& sh, Tile& t, int& ring, int n, int seg0, int first,
                                           int f0, uint64_t f0_desc, uint64_t f1_desc, bool causal,
                                           float scale_log2, const float* lse2, const float* delta, bool leader) {
  const Tile u = take(sh, ring + 1, seg0, first, n + 1);
  issue_scores(r, f0_desc, f1_desc, u);
  issue_gradients<DQ, BUF>(r, t);
  wgmma_wait<1>();
  scores_done<DQ, 1 - BUF>(r, u, causal, f0, scale_log2, lse2, delta);
  wgmma_wait<0>();
  gradients_done<BUF>(r, sh, t, leader);
  t = u;
  ++ring;
}

// The item's last tile t (P and dS in buffer BUF): its gradient matmuls, then its stage released.
template <bool DQ, int BUF>
__device__ __forceinline__ void last_tile(Rows& r, Shared& sh, const Tile& t, int& ring, bool leader) {
  issue_gradients<DQ, BUF>(r, t);
  wgmma_wait<0>();
  gradients_done<BUF>(r, sh, t, leader);
  ++ring;
}

// A CTA takes the items blockIdx.x, + gridDim.x, ...: one each, or persistent, the fixed tiles
// double-buffered and the streamed ring running on across items.
template <bool DQ, bool OVERLAP>
__global__ void __launch_bounds__(384, 1)
    ws_bwd_kernel(const __grid_constant__ Maps fixed0_maps, const __grid_constant__ Maps fixed1_maps,
                  const __grid_constant__ Maps stream0_maps, const __grid_constant__ Maps stream1_maps,
                  int4 map_rows, float* __restrict__ stats, const __nv_bfloat16* __restrict__ out, long long out_row,
                  const __nv_bfloat16* __restrict__ dout, long long do_row, const float* __restrict__ lse,
                  const float* __restrict__ rope_cos, const float* __restrict__ rope_sin,
                  __nv_bfloat16* __restrict__ grad0, __nv_bfloat16* __restrict__ grad1, long long grad_row, int B,
                  int T, int H, int L, float scale, int causal, int branches, int split, int per_rank) {
  extern __shared__ uint8_t raw[];
  Shared& sh = aligned_shared<Shared>(raw);
  const int n_items = per_rank * (L / BF);
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
      for (int w = blockIdx.x, it = 0; w < n_items; w += gridDim.x, ++it) {
        const Item x = item<DQ>(w, B, T, H, L, causal, split, per_rank);
        const int fb = it % 2, sh_i = x.hd.shift, o = x.hd.o, col = x.hd.h * D;
        if (it >= 2) bar_wait(&sh.fixed_empty[fb], (it / 2 - 1) & 1);
        bar_expect(&sh.fixed_full[fb], 2 * FIXED_BYTES);
        tma_load(sh.fixed[fb][0], &fixed0_maps.m[sh_i], &sh.fixed_full[fb], o * map_rows.x + col, x.vrow0 + x.f0);
        tma_load(sh.fixed[fb][1], &fixed1_maps.m[sh_i], &sh.fixed_full[fb], o * map_rows.y + col, x.vrow0 + x.f0);
        for (int n = 0; n < x.n_tiles; ++n, ++ring) {
          const int s = ring % STAGES, at = x.vrow0 + x.seg0 + (x.first + n) * BS;
          if (ring >= STAGES) bar_wait(&sh.empty[s], (ring / STAGES - 1) & 1);
          bar_expect(&sh.full[s], 2 * STREAM_BYTES);
          tma_load(sh.streamed[s][0], &stream0_maps.m[sh_i], &sh.full[s], o * map_rows.z + col, at);
          tma_load(sh.streamed[s][1], &stream1_maps.m[sh_i], &sh.full[s], o * map_rows.w + col, at);
        }
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
  for (int w = blockIdx.x, it = 0; w < n_items; w += gridDim.x, ++it) {
    const Item x = item<DQ>(w, B, T, H, L, causal, split, per_rank);
    const int fb = it % 2, h = x.hd.h, seg0 = x.seg0, f0 = x.f0, first = x.first, n_tiles = x.n_tiles;
    const long long row0 = (long long)x.hd.b * T;  // the batch element's first position's row
    r.row = f0 + 64 * c + 16 * (tid / 32) + lane / 4;
#pragma unroll
    for (int i = 0; i < 32; ++i) r.g0[i] = r.g1[i] = 0.f;
    weight_terms(r.bias, r.row, r.tq, h, branches);  // (head_split: one branch, no weights)
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
        } else {
          l2 = lse2[row];
          dl = delta[row];
        }
        r.delta[half] = dl;
#pragma unroll
        for (int i = 4 * half; i < 4 * half + 4; ++i) r.bias[i] -= l2;
      }
    }
    const uint64_t f0_desc = descriptor(sh.fixed[fb][0] + 64 * c * D, 16, 1024);
    const uint64_t f1_desc = descriptor(sh.fixed[fb][1] + 64 * c * D, 16, 1024);
    bar_wait(&sh.fixed_full[fb], (it / 2) & 1);

    const bool leader = tid == 0;
    if (!OVERLAP) {  // each group waited for at once; the two consumers overlap each other
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
        *reinterpret_cast<__nv_bfloat162*>(grad0 + at + 8 * j) = __floats2bfloat162_rn(g[2 * j], g[2 * j + 1]);
        if (!DQ)
          *reinterpret_cast<__nv_bfloat162*>(grad1 + at + 8 * j) =
              __floats2bfloat162_rn(r.g1[4 * j + 2 * half], r.g1[4 * j + 2 * half + 1]);
      }
      if (x.hd.shift) {  // head_split: zero gradients at the positions between this branch's
        zero_unkept(grad0 + at - x.hd.o * grad_row, grad_row, x.hd, 8);
        if (!DQ) zero_unkept(grad1 + at - x.hd.o * grad_row, grad_row, x.hd, 8);
      }
    }
  }
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
  Maps maps[4];  // fixed₀, fixed₁, streamed₀, streamed₁
  const long long positions = (long long)B * T;
  const void* bases[4] = {dq ? q : k, dq ? dout : v, dq ? k : q, dq ? v : dout};
  const long long rows[4] = {dq ? q_row : k_row, dq ? do_row : v_row, dq ? k_row : q_row, dq ? v_row : do_row};
  for (int i = 0; i < 4; ++i)
    if (const int e = tensor_maps(&maps[i], bases[i], positions, H, rows[i], i < 2 ? BF : BS, dilations(split)))
      return e;
  const int bytes = shared_bytes<Shared>();
  auto kernel = dq ? (overlap ? ws_bwd_kernel<true, true> : ws_bwd_kernel<true, false>)
                  : (overlap ? ws_bwd_kernel<false, true> : ws_bwd_kernel<false, false>);
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  const int per_rank = items_per_rank(B, T, H, L, split), items = per_rank * (L / BF);
  kernel<<<ctas > 0 && ctas < items ? ctas : items, 384, bytes, static_cast<cudaStream_t>(stream)>>>(
      maps[0], maps[1], maps[2], maps[3], make_int4(int(rows[0]), int(rows[1]), int(rows[2]), int(rows[3])), stats,
      static_cast<const __nv_bfloat16*>(out), out_row, static_cast<const __nv_bfloat16*>(dout), do_row, lse,
      rope_cos, rope_sin, static_cast<__nv_bfloat16*>(grad0), static_cast<__nv_bfloat16*>(grad1), grad_row, B, T, H,
      L, scale, causal, branches, split, per_rank);
  return static_cast<int>(cudaGetLastError());
}
