// One query tile's steps in ws_fwd.cu's kernel: its shared memory, a consumer warpgroup's rows,
// the QKᵀ and PV wgmma groups, and the online softmax of a key tile (weight terms and the causal
// diagonal's mask included).
#pragma once
#include "ws_common.cuh"

namespace ws {
namespace fwd {

constexpr int BM = 128;       // query rows a CTA: two consumer warpgroups of 64
constexpr int BN = 128;       // keys a stage
constexpr int STAGES = 2;
constexpr int TILE_BYTES = BM * D * 2;  // one Q, K or V tile (BM == BN): 16 KB
static_assert(BM == BN, "the causal diagonal is the last key tile only when BM == BN");

struct Shared {
  alignas(1024) __nv_bfloat16 q[2][BM * D];  // 1024-byte aligned: the 128-byte swizzle's period
  alignas(1024) __nv_bfloat16 k[STAGES][BN * D];
  alignas(1024) __nv_bfloat16 v[STAGES][BN * D];
  uint64_t q_full[2], q_empty[2], k_full[STAGES], v_full[STAGES], k_empty[STAGES], v_empty[STAGES];
};

// One consumer warpgroup's state: 64 query rows, and for each thread its two rows' running
// maximum m and sum l (log2 units of the scaled scores). The wgmma accumulator layout: warp w holds
// rows 16w + lane/4 and that + 8; register 4j + 2·half + e holds column 8j + 2·(lane % 4) + e of
// the row (half 0: the first, 1: the one 8 below).
struct Rows {
  float o[32], s[64], m[2], l[2];
  float bias[8];   // the weight terms, log2 m, by [half][j mod 2][e] (the same in every key tile)
  float row_bias[2];  // the largest weight term each of the two rows can meet: log2(λ(row) + 1)
  uint32_t p[32];  // P in bf16 pairs: p[4kk .. 4kk + 3] is the A operand of key step kk
  int qrow, tq;
};

__device__ __forceinline__ void issue_qk(Rows& r, uint64_t q_desc, uint64_t k_desc) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)  // 16 columns = 32 bytes further along the swizzled rows
    wgmma_m64n128k16_ss(r.s, q_desc + 2 * kk, k_desc + 2 * kk, kk);
}

__device__ __forceinline__ void issue_pv(Rows& r, uint64_t v_desc) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk)  // 16 keys = 16 rows of 128 bytes further
    wgmma_m64n64k16_rs(r.o, &r.p[4 * kk], v_desc + (16 * 128 >> 4) * kk);
}

// The online softmax of one key tile in place (S becomes exp2(S·scale + log2 m − M)), updating M
// and l; O's rescale factor for each of the thread's two rows comes back through alpha. M bounds
// the row's largest weighted score instead of being it: scale · max S plus the largest weight term
// the row can meet (row_bias, its own λ's). So the maximum is taken over the raw scores and each
// score costs one FFMA into its exponent, the scale folded as FlashAttention-3 folds it. M exceeds
// the true maximum by at most log2 5, which the exponentials and the LSE (M + log2 l) absorb
// exactly. DIAGONAL: the tile across the causal diagonal, the only one that needs the mask's
// compare and select an element.
template <bool DIAGONAL>
__device__ __forceinline__ void softmax_tile(Rows& r, int key0, float scale_log2, float (&alpha)[2]) {
  float top[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < 16; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (DIAGONAL && key0 + 8 * j + 2 * r.tq + (e & 1) > r.qrow + 8 * (e / 2)) r.s[4 * j + e] = -INFINITY;
      top[e / 2] = fmaxf(top[e / 2], r.s[4 * j + e]);
    }
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {  // a row's four threads share its bound
    top[half] = fmaxf(top[half], __shfl_xor_sync(0xffffffff, top[half], 1));
    top[half] = fmaxf(top[half], __shfl_xor_sync(0xffffffff, top[half], 2));
    const float bound = fmaxf(r.m[half], fmaf(top[half], scale_log2, r.row_bias[half]));
    alpha[half] = ex2(r.m[half] - bound);
    r.m[half] = bound;
    r.l[half] *= alpha[half];
  }
  float shift[8];  // log2 m − M by the weight terms' index
#pragma unroll
  for (int i = 0; i < 8; ++i) shift[i] = r.bias[i] - r.m[i / 4];
#pragma unroll
  for (int j = 0; j < 16; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = 4 * j + e;
      r.s[i] = ex2(fmaf(r.s[i], scale_log2, shift[4 * (e / 2) + 2 * (j % 2) + e % 2]));
      r.l[e / 2] += r.s[i];
    }
  }
}

__device__ __forceinline__ void softmax(Rows& r, int key0, bool diagonal, float scale_log2, float (&alpha)[2]) {
  if (diagonal)
    softmax_tile<true>(r, key0, scale_log2, alpha);
  else
    softmax_tile<false>(r, key0, scale_log2, alpha);
}

// O's rescale, then P to bf16: both only once the previous PV has retired (it reads p and adds to o).
__device__ __forceinline__ void rescale_and_pack(Rows& r, const float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    r.o[i] *= alpha[(i / 2) % 2];
    __nv_bfloat162 pair = __floats2bfloat162_rn(r.s[2 * i], r.s[2 * i + 1]);
    r.p[i] = *reinterpret_cast<uint32_t*>(&pair);
  }
}

// S = Q·K_st (stage st, its parity-th fill) waited for at once; K's stage released.
__device__ __forceinline__ void qk_now(Rows& r, Shared& sh, uint64_t q_desc, int st, uint32_t parity, bool leader) {
  bar_wait(&sh.k_full[st], parity);
  wgmma_fence();
  issue_qk(r, q_desc, descriptor(sh.k[st], 16, 1024));
  wgmma_commit();
  wgmma_wait<0>();
  pin(r.s);
  if (leader) bar_arrive(&sh.k_empty[st]);
}

// O += P·V_st waited for at once; V's stage released.
__device__ __forceinline__ void pv_now(Rows& r, Shared& sh, int st, uint32_t parity, bool leader) {
  bar_wait(&sh.v_full[st], parity);
  wgmma_fence();
  issue_pv(r, descriptor(sh.v[st], 16, 1024));
  wgmma_commit();
  wgmma_wait<0>();
  pin(r.o);
  pin(r.p);
  if (leader) bar_arrive(&sh.v_empty[st]);
}

}  // namespace fwd
}  // namespace ws
