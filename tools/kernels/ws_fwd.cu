// Probe: attention inside segments (the union kernels' local pass without weights) as
// FlashAttention-3 structures it on Hopper, in CUDA C++: one producer warp loading Q, K and V
// through TMA into a ring of shared-memory stages (mbarriers), and two consumer warpgroups of
// 64 query rows each, computing S = QKᵀ and O += PV with asynchronous wgmma. The producer's
// warpgroup gives its registers to the consumers (setmaxnreg), the split Triton 3.6 cannot
// make (ptxas C7512 in tools/kernels/gluon_ws_probe.py's producer-warp kernel).
//
// Each consumer runs its matmuls and softmax in sequence (it waits for every wgmma group): the
// overlap comes from the two consumers (one's softmax under the other's wgmma) and from the
// producer running ahead; overlap inside a consumer is the next step once this one is exact.
// Heads of 64, bf16, q/k/v rows read in place from (B·T, row stride) views (the LM's fused
// projection), segments of L rows (a multiple of 128), causal or not.
// Built and run by tools/kernels/ws_probe.py (nvcc, sm_90a).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int D = 64;         // head dim: one 128-byte swizzled row a position
constexpr int BM = 128;       // query rows a CTA: two consumer warpgroups of 64
constexpr int BN = 128;       // keys a stage
constexpr int STAGES = 2;
constexpr int TILE_BYTES = BM * D * 2;  // one Q, K or V tile (BM == BN): 16 KB
static_assert(BM == BN, "the causal diagonal is the last key tile only when BM == BN");

struct Shared {
  alignas(1024) __nv_bfloat16 q[BM * D];  // 1024-byte aligned: the 128-byte swizzle's period
  alignas(1024) __nv_bfloat16 k[STAGES][BN * D];
  alignas(1024) __nv_bfloat16 v[STAGES][BN * D];
  uint64_t q_full, k_full[STAGES], v_full[STAGES], k_empty[STAGES], v_empty[STAGES];
};

__device__ __forceinline__ uint32_t smem(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void bar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem(bar)), "r"(count));
}

__device__ __forceinline__ void bar_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void bar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem(bar)) : "memory");
}

__device__ __forceinline__ void bar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(smem(bar)),
      "r"(parity)
      : "memory");
}

// A [BM rows, 64 columns] box of a (rows, H·64) tensor map at (column c0, row c1) into dst,
// completing on bar.
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          smem(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem(bar)), "r"(c0), "r"(c1)
      : "memory");
}

// A wgmma shared-memory descriptor for a tile of 128-byte rows under the 128-byte swizzle:
// start address, leading and stride byte offsets (8 rows = 1,024 bytes apart), swizzle mode 1.
__device__ __forceinline__ uint64_t descriptor(const void* p, uint32_t leading, uint32_t stride) {
  return (uint64_t)((smem(p) & 0x3FFFF) >> 4) | ((uint64_t)((leading >> 4) & 0x3FFF) << 16) |
         ((uint64_t)((stride >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>  // at most N groups still in flight
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving reads or writes of accumulators across an asynchronous wgmma.
template <int N>
__device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// D (+)= A·B, both from shared memory (K-major), D in 64 registers a thread.
__device__ __forceinline__ void wgmma_m64n128k16_ss(float* d, uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(accumulate));
}

// D += A·B, A from registers (the softmax's P), B from shared memory MN-major (V as stored).
__device__ __forceinline__ void wgmma_m64n64k16_rs(float* d, const uint32_t* a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// λ of position x for head h: how many of the dilations 2 … 2^(branches−1) keep x. The union
// kernels weight a local pair (x, s) by m = min(λ(x), λ(s)) + 1 (longctx/kernels/union.py).
__device__ __forceinline__ int lam(int x, int h, int branches) {
  int n = 0;
  for (int j = 1; j < branches; ++j) n += ((x ^ h) & ((1 << j) - 1)) == 0;
  return n;
}

// One consumer warpgroup's state: 64 query rows, and for each thread its two rows' running
// maximum m and sum l (log2 units of the scaled scores). The wgmma accumulator layout: warp w holds
// rows 16w + lane/4 and that + 8; register 4j + 2·half + e holds column 8j + 2·(lane % 4) + e of
// the row (half 0: the first, 1: the one 8 below).
struct Rows {
  float o[32], s[64], m[2], l[2];
  float bias[8];   // the weight terms, log2 m, by [half][j mod 2][e] (the same in every key tile)
  uint32_t p[32];  // P in bf16 pairs: p[4kk .. 4kk + 3] is the A operand of key step kk
  int qrow, tq;
};

template <int N>
__device__ __forceinline__ void pin(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

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

// The online softmax of one key tile in place (S becomes exp2(S·scale − m)), updating m and l;
// returns O's rescale factor for each of the thread's two rows through alpha.
__device__ __forceinline__ void softmax(Rows& r, int key0, bool diagonal, float scale_log2, float (&alpha)[2]) {
  float top[2] = {r.m[0], r.m[1]};
#pragma unroll
  for (int j = 0; j < 16; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = fmaf(r.s[4 * j + e], scale_log2, r.bias[4 * (e / 2) + 2 * (j % 2) + e % 2]);
      if (diagonal && key0 + 8 * j + 2 * r.tq + (e & 1) > r.qrow + 8 * (e / 2)) x = -INFINITY;
      r.s[4 * j + e] = x;
      top[e / 2] = fmaxf(top[e / 2], x);
    }
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {  // a row's four threads share its maximum
    top[half] = fmaxf(top[half], __shfl_xor_sync(0xffffffff, top[half], 1));
    top[half] = fmaxf(top[half], __shfl_xor_sync(0xffffffff, top[half], 2));
    alpha[half] = exp2f(r.m[half] - top[half]);
    r.m[half] = top[half];
    r.l[half] *= alpha[half];
  }
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    r.s[i] = exp2f(r.s[i] - r.m[(i / 2) % 2]);
    r.l[(i / 2) % 2] += r.s[i];
  }
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

// Named barriers 1 and 2: "consumer 0 (1) may issue its matmuls" (ping-pong); 0 is __syncthreads'.
__device__ __forceinline__ void named_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void named_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }

enum Mode { SEQUENTIAL = 0, PIPELINED = 1, PING_PONG = 2 };

// SEQUENTIAL: each wgmma group is waited for at once. PIPELINED: the next tile's QKᵀ is issued
// before this tile's PV and both run under the softmax, FlashAttention-3's overlap inside a
// warpgroup. PING_PONG: that, with the two consumers taking turns to issue their matmuls (named
// barriers), so that one's softmax runs while the other's matmuls hold the tensor cores.
template <int MODE>
__global__ void __launch_bounds__(384, 1)
    ws_fwd_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
                  const __grid_constant__ CUtensorMap v_map, __nv_bfloat16* __restrict__ out, long long out_row,
                  float* __restrict__ lse, int T, int H, int L, float scale_log2, int causal, int branches) {
  extern __shared__ uint8_t raw[];
  Shared& sh = *reinterpret_cast<Shared*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
  const int h = blockIdx.y, row0 = blockIdx.z * T;  // head, the batch element's first row
  const int per_seg = L / BM, nseg = T / L;
  int t = blockIdx.x / nseg;            // tile-major: every segment's t-th query tile, then the next
  if (causal) t = per_seg - 1 - t;      // the longest rows first
  const int seg0 = (blockIdx.x % nseg) * L;
  const int q0 = seg0 + t * BM;
  const int n_tiles = causal ? t + 1 : per_seg;
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    bar_init(&sh.q_full, 1);
    for (int s = 0; s < STAGES; ++s) {
      bar_init(&sh.k_full[s], 1);
      bar_init(&sh.v_full[s], 1);
      bar_init(&sh.k_empty[s], 2);  // one arrival from each consumer warpgroup
      bar_init(&sh.v_empty[s], 2);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {  // the producer: 24 registers a thread, one thread issuing the loads
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (threadIdx.x == 0) {
      bar_expect(&sh.q_full, TILE_BYTES);
      tma_load(sh.q, &q_map, &sh.q_full, h * D, row0 + q0);
      for (int n = 0; n < n_tiles; ++n) {
        const int s = n % STAGES;
        const uint32_t again = (n / STAGES - 1) & 1;  // parity of the stage's previous release
        const int key = row0 + seg0 + n * BN;
        if (n >= STAGES) bar_wait(&sh.k_empty[s], again);
        bar_expect(&sh.k_full[s], TILE_BYTES);
        tma_load(sh.k[s], &k_map, &sh.k_full[s], h * D, key);
        if (n >= STAGES) bar_wait(&sh.v_empty[s], again);
        bar_expect(&sh.v_full[s], TILE_BYTES);
        tma_load(sh.v[s], &v_map, &sh.v_full[s], h * D, key);
      }
    }
    return;
  }
  // 24 + 2 · 240 = 3 · 168: the registers the launch gives three warpgroups
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");

  const int c = wg - 1, tid = threadIdx.x % 128, lane = tid % 32;
  Rows r;
  r.tq = lane % 4;
  r.qrow = q0 + 64 * c + 16 * (tid / 32) + lane / 4;
#pragma unroll
  for (int i = 0; i < 32; ++i) r.o[i] = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) r.s[i] = 0.f;
  r.m[0] = r.m[1] = -INFINITY;
  r.l[0] = r.l[1] = 0.f;
  // A key's λ depends on its low branches − 1 bits, which a column's place in a 128-key tile fixes
  // (branches ≤ 5): 8j + 2·tq + e has those of 8·(j mod 2) + 2·tq + e.
#pragma unroll
  for (int i = 0; i < 8; ++i)
    r.bias[i] = log2f(
        min(lam(r.qrow + 8 * (i / 4), h, branches), lam(8 * ((i / 2) % 2) + 2 * r.tq + i % 2, h, branches)) + 1.f);
  float alpha[2];
  const uint64_t q_desc = descriptor(sh.q + 64 * c * D, 16, 1024);
  const bool leader = tid == 0;  // arrives on the empty barriers for its warpgroup
  bar_wait(&sh.q_full, 0);

  if (MODE == PING_PONG && c == 1) named_arrive(1);  // consumer 0 issues first
  if (MODE == SEQUENTIAL) {
    for (int n = 0; n < n_tiles; ++n) {
      const int st = n % STAGES;
      const uint32_t parity = (n / STAGES) & 1;
      qk_now(r, sh, q_desc, st, parity, leader);
      softmax(r, seg0 + n * BN, causal && n == n_tiles - 1, scale_log2, alpha);
      rescale_and_pack(r, alpha);
      pv_now(r, sh, st, parity, leader);
    }
  } else {
    qk_now(r, sh, q_desc, 0, 0, leader);  // the first tile's scores alone
    softmax(r, seg0, causal && n_tiles == 1, scale_log2, alpha);
    rescale_and_pack(r, alpha);
    for (int n = 1; n < n_tiles; ++n) {
      const int st = n % STAGES, prev = (n - 1) % STAGES;
      bar_wait(&sh.k_full[st], (n / STAGES) & 1);
      bar_wait(&sh.v_full[prev], ((n - 1) / STAGES) & 1);
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
      softmax(r, seg0 + n * BN, causal && n == n_tiles - 1, scale_log2, alpha);
      wgmma_wait<0>();
      pin(r.o);
      pin(r.p);
      if (leader) bar_arrive(&sh.v_empty[prev]);
      rescale_and_pack(r, alpha);
    }
    pv_now(r, sh, (n_tiles - 1) % STAGES, ((n_tiles - 1) / STAGES) & 1, leader);  // the last tile's PV
  }

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float l = r.l[half];
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    const int row = row0 + r.qrow + 8 * half;
    const float inv = 1.f / l;
    __nv_bfloat16* dst = out + row * out_row + h * D + 2 * r.tq;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      *reinterpret_cast<__nv_bfloat162*>(dst + 8 * j) =
          __floats2bfloat162_rn(r.o[4 * j + 2 * half] * inv, r.o[4 * j + 2 * half + 1] * inv);
    if (r.tq == 0) lse[(long long)row * H + h] = (r.m[half] + log2f(l)) * 0.6931471805599453f;
  }
}

using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                            const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                            CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

Encode encoder() {  // the driver's function through the runtime: no link against libcuda
  static Encode fn = nullptr;
  if (fn == nullptr) {
    void* found = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &found, 12000, cudaEnableDefault, &status) ==
            cudaSuccess &&
        status == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<Encode>(found);
  }
  return fn;
}

// A map of (rows, cols) bf16 rows row_stride elements apart, read in [BM, 64] swizzled boxes.
int tensor_map(CUtensorMap* map, const void* base, long long rows, int cols, long long row_stride) {
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)row_stride * 2};
  const cuuint32_t box[2] = {D, BM}, unit[2] = {1, 1};
  const Encode fn = encoder();
  if (fn == nullptr) return -1;
  return fn(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box, unit,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS
             ? 0
             : -2;
}

}  // namespace

// out and lse of attention inside segments of L rows for q/k/v (B, T, H, 64) bf16 whose positions
// are qkv_row elements apart (heads contiguous), out's out_row apart; lse (B, T, H) float32. With
// branches > 1 the scores get the union local pass's weight terms for that many branches.
// Returns 0, a CUDA error, or -1 (no cuTensorMapEncodeTiled), -2 (a map refused), -3 (shapes).
extern "C" int ws_fwd(const void* q, const void* k, const void* v, long long qkv_row, void* out, long long out_row,
                      float* lse, int B, int T, int H, int L, int causal, float scale, int branches, int mode,
                      void* stream) {
  if (L % BM != 0 || T % L != 0 || branches < 1 || branches > 5 || mode < SEQUENTIAL || mode > PING_PONG) return -3;
  CUtensorMap maps[3];
  const void* bases[3] = {q, k, v};
  for (int i = 0; i < 3; ++i)
    if (const int e = tensor_map(&maps[i], bases[i], (long long)B * T, H * D, qkv_row)) return e;
  const int bytes = sizeof(Shared) + 1024;
  auto kernel = mode == SEQUENTIAL ? ws_fwd_kernel<SEQUENTIAL>
                : mode == PIPELINED  ? ws_fwd_kernel<PIPELINED>
                                     : ws_fwd_kernel<PING_PONG>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  kernel<<<dim3(T / BM, H, B), 384, bytes, static_cast<cudaStream_t>(stream)>>>(
      maps[0], maps[1], maps[2], static_cast<__nv_bfloat16*>(out), out_row, lse, T, H, L,
      scale * 1.4426950408889634f, causal, branches);
  return static_cast<int>(cudaGetLastError());
}
