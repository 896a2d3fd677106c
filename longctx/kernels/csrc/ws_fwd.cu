// Attention inside segments (the union kernels' local pass, weight terms included) as
// FlashAttention-3 structures it on Hopper, in CUDA C++: one producer warp loading Q, K and V
// through TMA into a ring of shared-memory stages (mbarriers), and two consumer warpgroups of
// 64 query rows each, computing S = QKᵀ and O += PV with asynchronous wgmma. The producer's
// warpgroup gives its registers to the consumers (setmaxnreg), the split Triton 3.6 cannot
// make (ptxas C7512 in tools/kernels/gluon_ws_probe.py's producer-warp kernel).
//
// Three schedules (Mode, below): each consumer waiting for every wgmma group, the next tile's
// QKᵀ in flight under this tile's softmax, and that with the consumers taking turns at the
// tensor cores. The last is the fastest on an H100, though still below cuDNN per FLOP
// (docs/lab/runs.md).
// Heads of 64, bf16, q/k/v rows read in place from (B·T, row stride) views (the LM's fused
// projection), segments of L rows (a multiple of 128), causal or not; under head_split each head
// in its branch, its rows 2^i positions apart read through that dilation's tensor map.
// Built by longctx/kernels/hopper_cuda.py (nvcc, sm_90a); probed by tools/kernels/ws_probe.py.
#include "ws_common.cuh"

namespace {

using namespace ws;

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

enum Mode { SEQUENTIAL = 0, PIPELINED = 1, PING_PONG = 2 };

// A CTA's work items: 128-row query tiles of one head's segment, ordered longest first across the
// whole problem (under the causal mask a tile's key count is its rank + 1), then by head, batch
// element and segment (ws_common.cuh's work). Rows are y (view rows from vrow0, the batch
// element's first): seg0 and q0 the segment's and the tile's first.
struct Item {
  Head hd;
  int vrow0, seg0, q0, n_tiles;
};

__device__ __forceinline__ Item item(int w, int B, int T, int H, int L, int causal, int split, int per_rank) {
  int seg, rank;
  const Head hd = work(w, B, T, H, L, split, per_rank, seg, rank);
  const int per_seg = L / BM, t = causal ? per_seg - 1 - rank : rank;
  return {hd, hd.b * (T >> hd.shift), seg * L, seg * L + t * BM, causal ? t + 1 : per_seg};
}

// SEQUENTIAL: each wgmma group is waited for at once. PIPELINED: the next tile's QKᵀ is issued
// before this tile's PV and both run under the softmax, FlashAttention-3's overlap inside a
// warpgroup. PING_PONG: that, with the two consumers taking turns to issue their matmuls (named
// barriers), so that one's softmax runs while the other's matmuls hold the tensor cores.
// A CTA takes the items blockIdx.x, + gridDim.x, ...: one each when the grid has one CTA an
// item, or persistent (a grid of one CTA an SM), with Q double-buffered and the K/V ring running
// on across items so that the producer loads the next item's tiles under this one's last.
template <int MODE>
__global__ void __launch_bounds__(384, 1)
    ws_fwd_kernel(const __grid_constant__ Maps q_maps, const __grid_constant__ Maps k_maps,
                  const __grid_constant__ Maps v_maps, int q_row, int k_row, int v_row,
                  __nv_bfloat16* __restrict__ out, long long out_row, float* __restrict__ lse, int B, int T, int H,
                  int L, float scale_log2, int causal, int branches, int split, int per_rank) {
  extern __shared__ uint8_t raw[];
  Shared& sh = aligned_shared<Shared>(raw);
  const int n_items = per_rank * (L / BM);
  const int wg = warpgroup();

  if (threadIdx.x == 0) {
    bar_init_buffers(sh.q_full, sh.q_empty, 2);
    bar_init_buffers(sh.k_full, sh.k_empty, STAGES);
    bar_init_buffers(sh.v_full, sh.v_empty, STAGES);
    bar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {  // the producer: 24 registers a thread, one thread issuing the loads
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (threadIdx.x == 0) {
      int kv = 0;  // K/V tiles loaded so far: the ring's position and fill
      for (int w = blockIdx.x, it = 0; w < n_items; w += gridDim.x, ++it) {
        const Item x = item(w, B, T, H, L, causal, split, per_rank);
        const CUtensorMap *q_map = &q_maps.m[x.hd.shift], *k_map = &k_maps.m[x.hd.shift],
                          *v_map = &v_maps.m[x.hd.shift];
        const int qb = it % 2, col = x.hd.h * D;
        if (it >= 2) bar_wait(&sh.q_empty[qb], (it / 2 - 1) & 1);
        bar_expect(&sh.q_full[qb], TILE_BYTES);
        tma_load(sh.q[qb], q_map, &sh.q_full[qb], x.hd.o * q_row + col, x.vrow0 + x.q0);
        for (int n = 0; n < x.n_tiles; ++n, ++kv) {
          const int s = kv % STAGES;
          const uint32_t again = (kv / STAGES - 1) & 1;  // parity of the stage's previous release
          const int key = x.vrow0 + x.seg0 + n * BN;
          if (kv >= STAGES) bar_wait(&sh.k_empty[s], again);
          bar_expect(&sh.k_full[s], TILE_BYTES);
          tma_load(sh.k[s], k_map, &sh.k_full[s], x.hd.o * k_row + col, key);
          if (kv >= STAGES) bar_wait(&sh.v_empty[s], again);
          bar_expect(&sh.v_full[s], TILE_BYTES);
          tma_load(sh.v[s], v_map, &sh.v_full[s], x.hd.o * v_row + col, key);
        }
      }
    }
    return;
  }
  // 24 + 2 · 240 = 3 · 168: the registers the launch gives three warpgroups
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");

  const int c = wg - 1, tid = threadIdx.x % 128, lane = tid % 32;
  const bool leader = tid == 0;  // arrives on the empty barriers for its warpgroup
  Rows r;
  r.tq = lane % 4;
  float alpha[2];
  // Named barriers 1 and 2 in PING_PONG: "consumer 0 (1) may issue its matmuls". Consumer 0 goes
  // first; the turns then run on across items, which both consumers take with the same tiles.
  if (MODE == PING_PONG && c == 1) named_arrive(1);
  int kv = 0;  // K/V tiles consumed so far, as the producer counts them
  for (int w = blockIdx.x, it = 0; w < n_items; w += gridDim.x, ++it) {
    const Item x = item(w, B, T, H, L, causal, split, per_rank);
    const int qb = it % 2, n_tiles = x.n_tiles, h = x.hd.h;
    r.qrow = x.q0 + 64 * c + 16 * (tid / 32) + lane / 4;
#pragma unroll
    for (int i = 0; i < 32; ++i) r.o[i] = 0.f;
    r.m[0] = r.m[1] = -INFINITY;
    r.l[0] = r.l[1] = 0.f;
    weight_terms(r.bias, r.qrow, r.tq, h, branches);  // (head_split: one branch, no weights)
    for (int half = 0; half < 2; ++half) r.row_bias[half] = log2_weight(lam(r.qrow + 8 * half, h, branches) + 1);
    const uint64_t q_desc = descriptor(sh.q[qb] + 64 * c * D, 16, 1024);
    bar_wait(&sh.q_full[qb], (it / 2) & 1);

    if (MODE == SEQUENTIAL) {
      for (int n = 0; n < n_tiles; ++n, ++kv) {
        const int st = kv % STAGES;
        const uint32_t parity = (kv / STAGES) & 1;
        qk_now(r, sh, q_desc, st, parity, leader);
        softmax(r, x.seg0 + n * BN, causal && n == n_tiles - 1, scale_log2, alpha);
        rescale_and_pack(r, alpha);
        pv_now(r, sh, st, parity, leader);
      }
    } else {
      qk_now(r, sh, q_desc, kv % STAGES, (kv / STAGES) & 1, leader);  // the first tile's scores alone
      softmax(r, x.seg0, causal && n_tiles == 1, scale_log2, alpha);
      rescale_and_pack(r, alpha);
      for (int n = 1; n < n_tiles; ++n) {
        const int now = kv + n, st = now % STAGES, prev = (now - 1) % STAGES;
        bar_wait(&sh.k_full[st], (now / STAGES) & 1);
        bar_wait(&sh.v_full[prev], ((now - 1) / STAGES) & 1);
        if (MODE == PING_PONG) named_sync(1 + c);  // this consumer's turn
        wgmma_fence();
        issue_qk(r, q_desc, descriptor(sh.k[st], 16, 1024));  // S_n
        wgmma_commit();
        wgmma_fence();
        issue_pv(r, descriptor(sh.v[prev], 16, 1024));  // O += P_{n-1} V_{n-1}, reading p until it retires
        wgmma_commit();
        if (MODE == PING_PONG) named_arrive(2 - c);  // the other's turn
        wgmma_wait<1>();  // groups retire in order: S_n is done
        pin(r.s);
        if (leader) bar_arrive(&sh.k_empty[st]);
        softmax(r, x.seg0 + n * BN, causal && n == n_tiles - 1, scale_log2, alpha);
        wgmma_wait<0>();
        pin(r.o);
        pin(r.p);
        if (leader) bar_arrive(&sh.v_empty[prev]);
        rescale_and_pack(r, alpha);
      }
      const int last = kv + n_tiles - 1;
      pv_now(r, sh, last % STAGES, (last / STAGES) & 1, leader);  // the last tile's PV
      kv += n_tiles;
    }
    if (leader) bar_arrive(&sh.q_empty[qb]);  // every QKᵀ of this item has retired

#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float l = r.l[half];
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l += __shfl_xor_sync(0xffffffff, l, 2);
      const long long pos = ((long long)(r.qrow + 8 * half) << x.hd.shift) + x.hd.o;
      const long long row = (long long)x.hd.b * T + pos;
      const float inv = 1.f / l;
      __nv_bfloat16* dst = out + row * out_row + h * D + 2 * r.tq;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        *reinterpret_cast<__nv_bfloat162*>(dst + 8 * j) =
            __floats2bfloat162_rn(r.o[4 * j + 2 * half] * inv, r.o[4 * j + 2 * half + 1] * inv);
      if (r.tq == 0) lse[row * H + h] = (r.m[half] + log2f(l)) * 0.6931471805599453f;
      if (x.hd.shift) {  // head_split: the positions between this branch's, output 0 and LSE −∞
        zero_unkept(dst - x.hd.o * out_row, out_row, x.hd, 8);
        for (int o = 0; r.tq == 0 && o < (1 << x.hd.shift); ++o)
          if (o != x.hd.o) lse[(row - x.hd.o + o) * H + h] = -INFINITY;
      }
    }
  }
}

}  // namespace

// out and lse of attention inside segments of L rows for q/k/v (B, T, H, 64) bf16 with heads
// contiguous and positions q_row, k_row, v_row elements apart (batches T positions apart), out's
// out_row apart; lse (B, T, H) float32. With branches > 1 the scores get the union local pass's
// weight terms for that many branches. split > 0: head_split over that many branches (at most
// MAX_SPLIT; branches must be 1): head h runs its branch's segments of L rows r = 2^i apart (its
// group's i), and the positions it does not keep get output 0 and LSE −∞.
// ctas > 0: a persistent grid of that many CTAs (at most one an item); 0: one CTA an item.
// Returns 0, a CUDA error, or -1 (no cuTensorMapEncodeTiled), -2 (a map refused), -3 (shapes).
extern "C" int ws_fwd(const void* q, const void* k, const void* v, long long q_row, long long k_row, long long v_row,
                      void* out, long long out_row, float* lse, int B, int T, int H, int L, int causal, float scale,
                      int branches, int split, int mode, int ctas, void* stream) {
  if (!problem_ok(T, H, L, BM, branches, split) || mode < SEQUENTIAL || mode > PING_PONG) return -3;
  Maps maps[3];
  const void* bases[3] = {q, k, v};
  const long long rows[3] = {q_row, k_row, v_row};
  for (int i = 0; i < 3; ++i)
    if (const int e = tensor_maps(&maps[i], bases[i], (long long)B * T, H, rows[i], BM, dilations(split))) return e;
  const int bytes = shared_bytes<Shared>();
  auto kernel = mode == SEQUENTIAL ? ws_fwd_kernel<SEQUENTIAL>
                : mode == PIPELINED  ? ws_fwd_kernel<PIPELINED>
                                     : ws_fwd_kernel<PING_PONG>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  const int per_rank = items_per_rank(B, T, H, L, split), items = per_rank * (L / BM);
  kernel<<<ctas > 0 && ctas < items ? ctas : items, 384, bytes, static_cast<cudaStream_t>(stream)>>>(
      maps[0], maps[1], maps[2], int(q_row), int(k_row), int(v_row), static_cast<__nv_bfloat16*>(out), out_row,
      lse, B, T, H, L, scale * 1.4426950408889634f, causal, branches, split, per_rank);
  return static_cast<int>(cudaGetLastError());
}
