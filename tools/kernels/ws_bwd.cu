// Probe: the dK/dV pass of ws_fwd.cu's problem (the union local pass, weight terms included) with
// the same producer/consumer structure: a TMA producer warp (its warpgroup at 24 registers) loads a
// CTA's 128 keys' K and V once, then each 64-query tile's Q and dO into a ring of stages; two
// consumer warpgroups (240 registers) take 64 keys each. Per query tile a consumer computes
// Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (wgmma from shared memory), Pᵀ = exp2(Sᵀ·scale·log2e + log2 m −
// LSE₂) and dSᵀ = Pᵀ∘(dPᵀ − Δ) in registers, then dV += Pᵀ dO and dK += dSᵀ Q (Pᵀ and dSᵀ
// as register operands, Q and dO read N-major). LSE₂ (log2 units) and Δ = rowsum(dO∘O) come as
// the union kernels' STATS, (2, B·H, T) float32 by position, which their dQ pass writes.
// Every wgmma group is waited for at once; the two consumers overlap each other.
// Built and run by tools/kernels/ws_probe.py (nvcc, sm_90a).
#include "ws_common.cuh"

namespace {

using namespace ws;

constexpr int BK = 128;  // keys a CTA: two consumer warpgroups of 64
constexpr int BQ = 64;   // queries a stage
constexpr int STAGES = 2;
constexpr int KV_BYTES = BK * D * 2, QD_BYTES = BQ * D * 2;  // 16 KB, 8 KB

struct Shared {
  alignas(1024) __nv_bfloat16 k[BK * D];
  alignas(1024) __nv_bfloat16 v[BK * D];
  alignas(1024) __nv_bfloat16 q[STAGES][BQ * D];
  alignas(1024) __nv_bfloat16 dout[STAGES][BQ * D];
  uint64_t kv_full, qd_full[STAGES], qd_empty[STAGES];
};

// One consumer's 64 keys against one query tile. Accumulator layout as in ws_fwd.cu, rows being
// keys and columns queries: register 4j + 2·half + e holds key 16w + lane/4 + 8·half, query
// 8j + 2·(lane % 4) + e of the tile.
struct Keys {
  float st[32], dpt[32], dk[32], dv[32];
  uint32_t p[16], ds[16];  // Pᵀ and dSᵀ in bf16 pairs: [4kk .. 4kk + 3] is query step kk's A operand
  float bias[8];           // log2 m by [half][j mod 2][e]: a query's λ is fixed by its place in the tile
  int key, tq;             // the thread's first key (absolute), lane % 4
};

__global__ void __launch_bounds__(384, 1)
    ws_dkdv_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
                   const __grid_constant__ CUtensorMap v_map, const __grid_constant__ CUtensorMap do_map,
                   const float* __restrict__ stats, __nv_bfloat16* __restrict__ dk, __nv_bfloat16* __restrict__ dv,
                   long long grad_row, int T, int H, int BH, int L, float scale, int causal, int branches) {
  extern __shared__ uint8_t raw[];
  Shared& sh = *reinterpret_cast<Shared*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
  const int h = blockIdx.y, b = blockIdx.z, row0 = b * T;
  const int per_seg = L / BK, nseg = T / L;
  const int t = blockIdx.x % per_seg;  // a segment's key tiles one after another (L2 keeps its rows)
  const int seg0 = (blockIdx.x / per_seg) * L;
  const int k0 = seg0 + t * BK;
  const int first = causal ? (k0 - seg0) / BQ : 0;  // the query tiles that see these keys
  const int n_tiles = L / BQ - first;
  const int wg = threadIdx.x / 128;
  (void)nseg;

  if (threadIdx.x == 0) {
    bar_init(&sh.kv_full, 1);
    for (int s = 0; s < STAGES; ++s) {
      bar_init(&sh.qd_full[s], 1);
      bar_init(&sh.qd_empty[s], 2);  // one arrival from each consumer warpgroup
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (threadIdx.x == 0) {
      bar_expect(&sh.kv_full, 2 * KV_BYTES);
      tma_load(sh.k, &k_map, &sh.kv_full, h * D, row0 + k0);
      tma_load(sh.v, &v_map, &sh.kv_full, h * D, row0 + k0);
      for (int n = 0; n < n_tiles; ++n) {
        const int s = n % STAGES, query = row0 + seg0 + (first + n) * BQ;
        if (n >= STAGES) bar_wait(&sh.qd_empty[s], (n / STAGES - 1) & 1);
        bar_expect(&sh.qd_full[s], 2 * QD_BYTES);
        tma_load(sh.q[s], &q_map, &sh.qd_full[s], h * D, query);
        tma_load(sh.dout[s], &do_map, &sh.qd_full[s], h * D, query);
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");

  const int c = wg - 1, tid = threadIdx.x % 128, lane = tid % 32;
  Keys r;
  r.tq = lane % 4;
  r.key = k0 + 64 * c + 16 * (tid / 32) + lane / 4;
#pragma unroll
  for (int i = 0; i < 32; ++i) r.dk[i] = r.dv[i] = r.st[i] = r.dpt[i] = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i)  // query tiles start at multiples of 64: a column's low 4 bits are fixed
    r.bias[i] = log2f(
        min(lam(r.key + 8 * (i / 4), h, branches), lam(8 * ((i / 2) % 2) + 2 * r.tq + i % 2, h, branches)) + 1.f);
  const float scale_log2 = scale * 1.4426950408889634f;
  const float* lse2 = stats + (long long)(b * H + h) * T;
  const float* delta = lse2 + (long long)BH * T;
  const uint64_t k_desc = descriptor(sh.k + 64 * c * D, 16, 1024), v_desc = descriptor(sh.v + 64 * c * D, 16, 1024);
  bar_wait(&sh.kv_full, 0);

  for (int n = 0; n < n_tiles; ++n) {
    const int st = n % STAGES, q0 = seg0 + (first + n) * BQ;
    float2 lse_at[8], delta_at[8];  // the thread's 16 queries: 8j + 2·tq + (0, 1)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      lse_at[j] = *reinterpret_cast<const float2*>(lse2 + q0 + 8 * j + 2 * r.tq);
      delta_at[j] = *reinterpret_cast<const float2*>(delta + q0 + 8 * j + 2 * r.tq);
    }
    bar_wait(&sh.qd_full[st], (n / STAGES) & 1);
    const uint64_t q_desc = descriptor(sh.q[st], 16, 1024), do_desc = descriptor(sh.dout[st], 16, 1024);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_m64n64k16_ss(r.st, k_desc + 2 * kk, q_desc + 2 * kk, kk);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_m64n64k16_ss(r.dpt, v_desc + 2 * kk, do_desc + 2 * kk, kk);
    wgmma_commit();
    wgmma_wait<0>();
    pin(r.st);
    pin(r.dpt);

    const bool diagonal = causal && q0 < k0 + BK;  // some of these queries come before some keys
#pragma unroll
    for (int i = 0; i < 32; i += 2) {
      const int j = i / 4, half = (i / 2) % 2;
      const float l2[2] = {lse_at[j].x, lse_at[j].y}, dl[2] = {delta_at[j].x, delta_at[j].y};
      float pv[2], dsv[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float pe = exp2f(fmaf(r.st[i + e], scale_log2, r.bias[4 * half + 2 * (j % 2) + e]) - l2[e]);
        if (diagonal && q0 + 8 * j + 2 * r.tq + e < r.key + 8 * half) pe = 0.f;
        pv[e] = pe;
        dsv[e] = pe * (r.dpt[i + e] - dl[e]);
      }
      __nv_bfloat162 pp = __floats2bfloat162_rn(pv[0], pv[1]), dd = __floats2bfloat162_rn(dsv[0], dsv[1]);
      r.p[i / 2] = *reinterpret_cast<uint32_t*>(&pp);
      r.ds[i / 2] = *reinterpret_cast<uint32_t*>(&dd);
    }

    pin(r.dv);
    pin(r.dk);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk)  // 16 queries = 16 rows of 128 bytes further
      wgmma_m64n64k16_rs(r.dv, &r.p[4 * kk], do_desc + (16 * 128 >> 4) * kk);
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) wgmma_m64n64k16_rs(r.dk, &r.ds[4 * kk], q_desc + (16 * 128 >> 4) * kk);
    wgmma_commit();
    wgmma_wait<0>();
    pin(r.dv);
    pin(r.dk);
    pin(r.p);
    pin(r.ds);
    if (tid == 0) bar_arrive(&sh.qd_empty[st]);
  }

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const long long row = (long long)(row0 + r.key + 8 * half) * grad_row + h * D + 2 * r.tq;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      *reinterpret_cast<__nv_bfloat162*>(dk + row + 8 * j) =
          __floats2bfloat162_rn(r.dk[4 * j + 2 * half] * scale, r.dk[4 * j + 2 * half + 1] * scale);
      *reinterpret_cast<__nv_bfloat162*>(dv + row + 8 * j) =
          __floats2bfloat162_rn(r.dv[4 * j + 2 * half], r.dv[4 * j + 2 * half + 1]);
    }
  }
}

}  // namespace

// dK and dV (B, T, H, 64) bf16, grad_row elements between positions, of ws_fwd's attention for
// q/k/v (qkv_row apart) and dO (do_row apart), given STATS (2, B·H, T) float32: log2 LSE and Δ.
// Returns 0, a CUDA error, or -1 (no cuTensorMapEncodeTiled), -2 (a map refused), -3 (shapes).
extern "C" int ws_dkdv(const void* q, const void* k, const void* v, long long qkv_row, const void* dout, long long do_row,
                       const float* stats, void* dk, void* dv, long long grad_row, int B, int T, int H, int L,
                       int causal, float scale, int branches, void* stream) {
  if (L % BK != 0 || T % L != 0 || branches < 1 || branches > 5) return -3;
  CUtensorMap maps[4];
  const long long rows = (long long)B * T;
  if (int e = tensor_map(&maps[0], q, rows, H * D, qkv_row, BQ)) return e;
  if (int e = tensor_map(&maps[1], k, rows, H * D, qkv_row, BK)) return e;
  if (int e = tensor_map(&maps[2], v, rows, H * D, qkv_row, BK)) return e;
  if (int e = tensor_map(&maps[3], dout, rows, H * D, do_row, BQ)) return e;
  const int bytes = sizeof(Shared) + 1024;
  cudaFuncSetAttribute(ws_dkdv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  ws_dkdv_kernel<<<dim3(T / BK, H, B), 384, bytes, static_cast<cudaStream_t>(stream)>>>(
      maps[0], maps[1], maps[2], maps[3], stats, static_cast<__nv_bfloat16*>(dk), static_cast<__nv_bfloat16*>(dv),
      grad_row, T, H, B * H, L, scale, causal, branches);
  return static_cast<int>(cudaGetLastError());
}
