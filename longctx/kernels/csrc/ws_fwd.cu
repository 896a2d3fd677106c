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
// in its branch, its rows 2^i positions apart read through that dilation's tensor map. The same
// kernel runs the union's upper pass (ws_fwd_upper): class tiles against each level's keys, read
// through the maps of their dilations, from the local pass's output and LSE. A tile's steps are
// in ws_fwd_tile.cuh, where the rows are in ws_layout.cuh. Built by longctx/kernels/hopper_cuda.py
// (nvcc, sm_90a); probed by tools/kernels/ws_probe.py.
#include "ws_fwd_tile.cuh"

namespace {

using namespace ws;
using namespace ws::fwd;

enum Mode { SEQUENTIAL = 0, PIPELINED = 1, PING_PONG = 2 };

// A CTA's work: a 128-row query tile and the key tiles it meets. Local items (ws_layout.cuh's
// query_item): the keys of its segment from seg0, in the query rows' own map. Upper items
// (upper_item): class k's rows, the keys of each live level a (bit a − 2 of `levels`) in turn,
// L/2 of them 2^(a−1) apart (map a − 1), starting from the local pass's output and LSE.
struct Work {
  Head hd;
  int vrow0, q0, n_tiles, seg0, k, levels;
};

template <bool UPPER>
__device__ __forceinline__ Work work_item(int w, int B, int T, int H, int L, int causal, int branches, int split,
                                          int per_rank) {
  if (UPPER) {
    const UpperItem u = upper_item(w, B, T, H, L, branches, BM, causal, false);
    return {u.hd, u.vrow0, u.y0, __popc(u.levels) * (L / 2 / BN), 0, u.k, u.levels};
  }
  const QueryItem x = query_item(w, B, T, H, L, causal, split, per_rank, BM);
  return {x.hd, x.vrow0, x.q0, x.n_tiles, x.seg0, 0, 0};
}

// An upper item's next live level after a (1 before its first), and the weight terms of its keys.
__device__ __forceinline__ void next_level(Rows& r, int& a, const Work& x, int L, int causal, int branches) {
  a += 1 + trailing_zeros(unsigned(x.levels) >> (a - 1));  // level a' is bit a' − 2
  bool live;
  const int start = level_start(x.hd.o + (x.q0 << x.hd.shift), x.hd.h, a, L, causal, false, live);
  upper_terms(r.bias, start, r.tq, x.hd.h, x.k, a, branches);
}

// SEQUENTIAL: each wgmma group is waited for at once. PIPELINED: the next tile's QKᵀ is issued
// before this tile's PV and both run under the softmax, FlashAttention-3's overlap inside a
// warpgroup. PING_PONG: that, with the two consumers taking turns to issue their matmuls (named
// barriers), so that one's softmax runs while the other's matmuls hold the tensor cores.
// A CTA takes the items blockIdx.x, + gridDim.x, ...: one each when the grid has one CTA an
// item, or persistent (a grid of one CTA an SM), with Q double-buffered and the K/V ring running
// on across items so that the producer loads the next item's tiles under this one's last.
// UPPER: the upper pass's items (a causal one may have no keys: skipped by every role). n_items: the
// launch's count of items (ws_layout.cuh's upper_items, or per_rank · L / BM).
template <int MODE, bool UPPER>
__global__ void __launch_bounds__(384, 1)
    ws_fwd_kernel(const __grid_constant__ Maps q_maps, const __grid_constant__ Maps k_maps,
                  const __grid_constant__ Maps v_maps, int q_row, int k_row, int v_row,
                  __nv_bfloat16* __restrict__ out, long long out_row, float* __restrict__ lse, int B, int T, int H,
                  int L, float scale_log2, int causal, int branches, int split, int per_rank,
                  int n_items) {
  extern __shared__ uint8_t raw[];
  Shared& sh = aligned_shared<Shared>(raw);
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
      auto load_kv = [&](int map, int o, int col, int key) {
        const int s = kv % STAGES;
        const uint32_t again = (kv / STAGES - 1) & 1;  // parity of the stage's previous release
        if (kv >= STAGES) bar_wait(&sh.k_empty[s], again);
        bar_expect(&sh.k_full[s], TILE_BYTES);
        tma_load(sh.k[s], &k_maps.m[map], &sh.k_full[s], o * k_row + col, key);
        if (kv >= STAGES) bar_wait(&sh.v_empty[s], again);
        bar_expect(&sh.v_full[s], TILE_BYTES);
        tma_load(sh.v[s], &v_maps.m[map], &sh.v_full[s], o * v_row + col, key);
        ++kv;
      };
      for (int w = blockIdx.x, it = 0; w < n_items; w += gridDim.x) {
        const Work x = work_item<UPPER>(w, B, T, H, L, causal, branches, split, per_rank);
        if (UPPER && x.n_tiles == 0) continue;  // a causal upper item without partners
        const int qb = it % 2, col = x.hd.h * D;
        if (it >= 2) bar_wait(&sh.q_empty[qb], (it / 2 - 1) & 1);
        bar_expect(&sh.q_full[qb], TILE_BYTES);
        tma_load(sh.q[qb], &q_maps.m[x.hd.shift], &sh.q_full[qb], x.hd.o * q_row + col, x.vrow0 + x.q0);
        if (!UPPER) {
          for (int n = 0; n < x.n_tiles; ++n) load_kv(x.hd.shift, x.hd.o, col, x.vrow0 + x.seg0 + n * BN);
        } else {
          for (int a = 2; a <= x.k + 1; ++a) {
            if (!((x.levels >> (a - 2)) & 1)) continue;
            bool live;
            const int start = level_start(x.hd.o + (x.q0 << x.hd.shift), x.hd.h, a, L, causal, false, live);
            const int m = a - 1, key0 = x.hd.b * (T >> m) + (start >> m);
            for (int t = 0; t < L / 2 / BN; ++t) load_kv(m, start & ((1 << m) - 1), col, key0 + t * BN);
          }
        }
        ++it;
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
  for (int w = blockIdx.x, it = 0; w < n_items; w += gridDim.x) {
    const Work x = work_item<UPPER>(w, B, T, H, L, causal, branches, split, per_rank);
    if (UPPER && x.n_tiles == 0) continue;  // a causal upper item without partners
    const int qb = it % 2, n_tiles = x.n_tiles, h = x.hd.h;
    r.qrow = x.q0 + 64 * c + 16 * (tid / 32) + lane / 4;
    if (!UPPER) {
#pragma unroll
      for (int i = 0; i < 32; ++i) r.o[i] = 0.f;
      r.m[0] = r.m[1] = -INFINITY;
      r.l[0] = r.l[1] = 0.f;
      weight_terms(r.bias, r.qrow, r.tq, h, branches);  // (head_split: one branch, no weights)
      for (int half = 0; half < 2; ++half) r.row_bias[half] = log2_weight(lam(r.qrow + 8 * half, h, branches) + 1);
    } else {  // the local pass's softmax: O with weight exp2(LSE₂), i.e. M = LSE₂ and l = 1
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const long long row = (long long)x.hd.b * T + ((long long)(r.qrow + 8 * half) << x.hd.shift) + x.hd.o;
        const __nv_bfloat16* src = out + row * out_row + h * D + 2 * r.tq;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(src + 8 * j));
          r.o[4 * j + 2 * half] = v.x;
          r.o[4 * j + 2 * half + 1] = v.y;
        }
        r.m[half] = lse[row * H + h] * 1.4426950408889634f;
        r.l[half] = 1.f;
        r.row_bias[half] = log2_weight(x.k);  // m = min(λ(s), k) + 2 − a ≤ k
      }
    }
    int level = 1, left = 0;  // UPPER: the keys' level, and the tiles left in it
    auto terms = [&]() {      // UPPER: before a tile's softmax, its level's weight terms
      if (UPPER && left-- == 0) {
        left = L / 2 / BN - 1;
        next_level(r, level, x, L, causal, branches);
      }
    };
    const uint64_t q_desc = descriptor(sh.q[qb] + 64 * c * D, 16, 1024);
    bar_wait(&sh.q_full[qb], (it / 2) & 1);
    const bool diagonal_last = causal && !UPPER;  // the last key tile crosses the diagonal

    if (MODE == SEQUENTIAL) {
      for (int n = 0; n < n_tiles; ++n, ++kv) {
        const int st = kv % STAGES;
        const uint32_t parity = (kv / STAGES) & 1;
        qk_now(r, sh, q_desc, st, parity, leader);
        terms();
        softmax(r, x.seg0 + n * BN, diagonal_last && n == n_tiles - 1, scale_log2, alpha);
        rescale_and_pack(r, alpha);
        pv_now(r, sh, st, parity, leader);
      }
    } else {
      qk_now(r, sh, q_desc, kv % STAGES, (kv / STAGES) & 1, leader);  // the first tile's scores alone
      terms();
      softmax(r, x.seg0, diagonal_last && n_tiles == 1, scale_log2, alpha);
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
        terms();
        softmax(r, x.seg0 + n * BN, diagonal_last && n == n_tiles - 1, scale_log2, alpha);
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
      if (!UPPER && x.hd.shift) {  // head_split: the positions between this branch's, output 0 and LSE −∞
        zero_unkept(dst - x.hd.o * out_row, out_row, x.hd, 8);
        for (int o = 0; r.tq == 0 && o < (1 << x.hd.shift); ++o)
          if (o != x.hd.o) lse[(row - x.hd.o + o) * H + h] = -INFINITY;
      }
    }
    ++it;
  }
}

int launch(int mode, bool upper, const Maps (&maps)[3], long long q_row, long long k_row, long long v_row, void* out,
           long long out_row, float* lse, int B, int T, int H, int L, int causal, float scale, int branches,
           int split, int per_rank, int items, int ctas, void* stream) {
  const int bytes = shared_bytes<Shared>();
  auto kernel = upper                ? ws_fwd_kernel<PING_PONG, true>
                : mode == SEQUENTIAL ? ws_fwd_kernel<SEQUENTIAL, false>
                : mode == PIPELINED  ? ws_fwd_kernel<PIPELINED, false>
                                     : ws_fwd_kernel<PING_PONG, false>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  kernel<<<ctas > 0 && ctas < items ? ctas : items, 384, bytes, static_cast<cudaStream_t>(stream)>>>(
      maps[0], maps[1], maps[2], int(q_row), int(k_row), int(v_row), static_cast<__nv_bfloat16*>(out), out_row,
      lse, B, T, H, L, scale * 1.4426950408889634f, causal, branches, split, per_rank, items);
  return static_cast<int>(cudaGetLastError());
}

int maps_of(Maps (&maps)[3], const void* q, const void* k, const void* v, long long q_row, long long k_row,
            long long v_row, long long positions, int H, int dilations) {
  const void* bases[3] = {q, k, v};
  const long long rows[3] = {q_row, k_row, v_row};
  for (int i = 0; i < 3; ++i)
    if (const int e = tensor_maps(&maps[i], bases[i], positions, H, rows[i], BM, dilations)) return e;
  return 0;
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
  if (const int e = maps_of(maps, q, k, v, q_row, k_row, v_row, (long long)B * T, H, dilations(split))) return e;
  const int per_rank = items_per_rank(B, T, H, L, split);
  return launch(mode, false, maps, q_row, k_row, v_row, out, out_row, lse, B, T, H, L, causal, scale, branches,
                split, per_rank, per_rank * (L / BM), ctas, stream);
}

// The union forward's upper pass (levels ≥ 2 of `branches` branches, union.py) on ws_fwd's
// local result: out and lse hold that pass's output and LSE and come back with the upper levels'
// keys added, for the class rows (λ ≥ 1). Ping-pong; ctas as in ws_fwd. Returns as ws_fwd.
extern "C" int ws_fwd_upper(const void* q, const void* k, const void* v, long long q_row, long long k_row,
                            long long v_row, void* out, long long out_row, float* lse, int B, int T, int H, int L,
                            int causal, float scale, int branches, int ctas, void* stream) {
  if (!upper_ok(T, L, BM, branches)) return -3;
  Maps maps[3];
  if (const int e = maps_of(maps, q, k, v, q_row, k_row, v_row, (long long)B * T, H, branches)) return e;
  return launch(PING_PONG, true, maps, q_row, k_row, v_row, out, out_row, lse, B, T, H, L, causal, scale, branches,
                0, 0, upper_items(B, T, H, branches, BM), ctas, stream);
}
