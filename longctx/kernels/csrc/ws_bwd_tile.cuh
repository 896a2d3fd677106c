// One streamed tile's steps in ws_bwd.cu's kernel: its shared memory, a consumer warpgroup's
// rows, the scores' and the gradients' wgmma groups, P and dS in registers (weight terms, the
// causal mask, the STATS they read), and the step that overlaps them across tiles (OVERLAP).
#pragma once
#include "ws_common.cuh"

namespace ws {
namespace bwd {

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
  float lse2[2];           // dQ: their LSE₂, which the upper pass folds into each level's terms
  int row, tq;             // the thread's first fixed row (absolute), lane % 4
};

// P and dS of one streamed tile from X and dX into buffer BUF, packed to bf16 as the next matmuls'
// A operands. MASK: a tile across the causal diagonal, the only kind that needs the compare and
// select an element (dK/dV: query ≥ key with queries streamed; dQ: key ≤ query with keys
// streamed). dK/dV reads its streamed queries' LSE₂ and Δ (8j + 2·tq + e) from STATS here: at
// row s0 + 8j + 2·tq + e, or with GATHER > 0 (an upper level's queries, positions 2^GATHER·y + o)
// at that position, the stride a constant so that the loads take immediate offsets.
template <bool DQ, bool MASK, int BUF, int GATHER>
__device__ __forceinline__ void probabilities(Rows& r, int s0, int o, float scale_log2, const float* lse2,
                                              const float* delta) {
  const int base = ((s0 + 2 * r.tq) << GATHER) + o;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float2 col_lse = {0.f, 0.f}, col_delta = {0.f, 0.f};
    if (!DQ && !GATHER) {
      col_lse = *reinterpret_cast<const float2*>(lse2 + s0 + 8 * j + 2 * r.tq);
      col_delta = *reinterpret_cast<const float2*>(delta + s0 + 8 * j + 2 * r.tq);
    }
    if (!DQ && GATHER) {
      const int at = base + (8 * j << GATHER);
      col_lse = {lse2[at], lse2[at + (1 << GATHER)]};
      col_delta = {delta[at], delta[at + (1 << GATHER)]};
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

// One streamed tile's place: its stage's two descriptors, the stage and its first row (y; an
// upper level's rows are positions 2^(a−1)·y + o).
struct Tile {
  uint64_t s0_desc, s1_desc;
  int st, s0, o;
};

// The streamed tile that the ring's count `ring` holds, waited for: the n-th of the item's.
__device__ __forceinline__ Tile take(Shared& sh, int ring, int seg0, int first, int n) {
  const int st = __shfl_sync(0xffffffff, ring % STAGES, 0);  // uniform registers for the descriptors (as wg)
  bar_wait(&sh.full[st], (ring / STAGES) & 1);
  return {descriptor(sh.streamed[st][0], 16, 1024), descriptor(sh.streamed[st][1], 16, 1024), st,
          seg0 + (first + n) * BS, 0};
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
// GATHER > 0: an upper level's tile (no mask: its partners all lie on one side of the tile).
template <bool DQ, int BUF, int GATHER = 0>
__device__ __forceinline__ void scores_done(Rows& r, const Tile& t, bool causal, int f0, float scale_log2,
                                            const float* lse2, const float* delta) {
  pin(r.x);
  pin(r.dx);
  if (GATHER)
    probabilities<DQ, false, BUF, GATHER>(r, t.s0, t.o, scale_log2, lse2, delta);
  else if (causal && (DQ ? t.s0 + BS > f0 : t.s0 < f0 + BF))
    probabilities<DQ, true, BUF, 0>(r, t.s0, 0, scale_log2, lse2, delta);
  else
    probabilities<DQ, false, BUF, 0>(r, t.s0, 0, scale_log2, lse2, delta);
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

}  // namespace bwd
}  // namespace ws
