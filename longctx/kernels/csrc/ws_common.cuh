// Shared pieces of the CUDA Hopper kernels (ws_fwd.cu, ws_bwd.cu): mbarriers, TMA loads, wgmma
// descriptors and calls for heads of 64 in bf16 under the 128-byte swizzle, a row's Δ in pieces,
// the host's tensor maps, and head_split's zeros; where the rows are and their weight terms are in
// ws_layout.cuh. PTX ISA 8 (sm_90a): wgmma, cp.async.bulk.tensor, mbarrier, setmaxnreg.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "ws_layout.cuh"

namespace ws {

constexpr int D = 64;  // head dim: one 128-byte swizzled row a position

__device__ __forceinline__ uint32_t smem(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void bar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem(bar)), "r"(count));
}

// n buffers' barrier pairs: full[i] completed by the producer's one arrival (with the bytes its
// TMA loads bring), empty[i] by one arrival from each of the two consumer warpgroups.
__device__ __forceinline__ void bar_init_buffers(uint64_t* full, uint64_t* empty, int n) {
  for (int i = 0; i < n; ++i) {
    bar_init(&full[i], 1);
    bar_init(&empty[i], 2);
  }
}

// After the barriers' initialisation, before any thread or the TMA unit uses them.
__device__ __forceinline__ void bar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void bar_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void bar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem(bar)) : "memory");
}

#ifndef WS_WATCHDOG
__device__ __forceinline__ void bar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(smem(bar)),
      "r"(parity)
      : "memory");
}
#else
// A debugging build's wait (hopper_cuda.py, LONGCTX_CUDA_WATCHDOG=1): after WS_WATCHDOG tries it
// names the barrier (its shared-memory address) and the parity, then traps, so that a wrong
// parity or byte count fails the launch in seconds instead of hanging it.
__device__ __forceinline__ void bar_wait(uint64_t* bar, uint32_t parity) {
  for (uint32_t tries = 0;; ++tries) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem(bar)), "r"(parity)
        : "memory");
    if (done) return;
    if (tries == WS_WATCHDOG) {
      printf("ws watchdog: block %d thread %d still waits on the barrier at shared 0x%x for parity %u\n", blockIdx.x,
             threadIdx.x, smem(bar), parity);
      __trap();
    }
  }
}
#endif

// A [rows, 64 columns] box (the map's) of a (rows, H·64) tensor map at (column c0, row c1) into
// dst, completing on bar.
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

// 2^x on the SFU alone. exp2f adds a denormal path around it (FSETP and two predicated FMULs an
// element, issued whether taken or not); softmax weights below 2^-126 may as well be 0.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Keeps the compiler from moving reads or writes of accumulators across an asynchronous wgmma.
template <int N>
__device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// D (+)= A·B, both from shared memory (K-major), D in 32 registers a thread.
__device__ __forceinline__ void wgmma_m64n64k16_ss(float* d, uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b), "r"(accumulate));
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

template <int N>
__device__ __forceinline__ void pin(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// Named barriers 1 and 2 (0 is __syncthreads'), for 256 threads: the two consumer warpgroups.
__device__ __forceinline__ void named_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void named_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }

// The dot product of 16 bf16 of o and of g (32-byte aligned), in float32: a quarter of a row's
// Δ = rowsum(dO∘O), the row's four threads each reading 16 columns.
__device__ __forceinline__ float row_dot(const __nv_bfloat16* o, const __nv_bfloat16* g) {
  float sum = 0.f;
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const uint4 a = reinterpret_cast<const uint4*>(o)[u], b = reinterpret_cast<const uint4*>(g)[u];
    const uint32_t av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&av[i]));
      const float2 y = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bv[i]));
      sum = fmaf(x.x, y.x, fmaf(x.y, y.y, sum));
    }
  }
  return sum;
}

using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                            const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                            CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline Encode encoder() {  // the driver's function through the runtime: no link against libcuda
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

// A map of (rows, cols) bf16 rows row_stride elements apart, read in [box_rows, 64] swizzled boxes.
inline int tensor_map(CUtensorMap* map, const void* base, long long rows, long long cols, long long row_stride,
                      int box_rows) {
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)row_stride * 2};
  const cuuint32_t box[2] = {D, (cuuint32_t)box_rows}, unit[2] = {1, 1};
  const Encode fn = encoder();
  if (fn == nullptr) return -1;
  return fn(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box, unit,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS
             ? 0
             : -2;
}

// A kernel's Shared struct at the first 1,024-byte boundary of dynamic shared memory (the 128-byte
// swizzle's period); the launch asks shared_bytes<S>() for it.
template <class S>
__device__ __forceinline__ S& aligned_shared(uint8_t* raw) {
  return *reinterpret_cast<S*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
}

template <class S>
constexpr int shared_bytes() {
  return sizeof(S) + 1024;
}

// This thread's warpgroup (0: the producer's). Through a shuffle, as CUTLASS takes its warpgroup
// index, so that the compiler knows it is the same across a warp and keeps what derives from it
// (the wgmma descriptors) in uniform registers.
__device__ __forceinline__ int warpgroup() { return __shfl_sync(0xffffffff, threadIdx.x / 128, 0); }

// One (B, T, H, 64) tensor's maps, one a dilation r = 1, 2, 4, 8, 16: map i reads the rows of
// dilation 2^i in place as a (B·T/r, (r − 1)·stride + H·64) view whose rows are r positions apart,
// so that position r·y + o of head h is row y at column o·stride + 64h (the rows of one offset o,
// consecutive). Head_split's branches use dilations up to 8 (1 alone without), the upper passes'
// classes and levels up to 2^(n−1).
constexpr int MAX_SPLIT = 4, MAX_MAPS = 5;
struct Maps {
  CUtensorMap m[MAX_MAPS];
};

inline int tensor_maps(Maps* maps, const void* base, long long positions, int H, long long row_stride, int box_rows,
                       int dilations) {
  for (int i = 0; i < dilations; ++i) {
    const long long r = 1ll << i;
    if (const int e = tensor_map(&maps->m[i], base, positions / r, (r - 1) * row_stride + H * D, r * row_stride,
                                 box_rows))
      return e;
  }
  return 0;
}

// The tensor maps' dilations for head_split over `split` branches (0: none, dilation 1 alone).
inline int dilations(int split) { return split > 0 ? split : 1; }

// Whether the entry points take this problem: segments of whole `rows`-row items, T of whole top
// segments, weight terms of 1 … 5 branches, or head_split (without weights) over at most
// MAX_SPLIT branches and no more than H.
inline bool problem_ok(int T, int H, int L, int rows, int branches, int split) {
  return split >= 0 && split <= MAX_SPLIT && split <= H && (split == 0 || branches == 1) && branches >= 1 &&
         branches <= 5 && L % rows == 0 && T % (L << (dilations(split) - 1)) == 0;  // split bounded before the shift
}

// Whether the upper passes' entry points take it: 2 … MAX_MAPS branches, T of whole top segments,
// and class tiles of `rows` rows 2^(n−1) apart within L (ws_layout.cuh's upper items).
inline bool upper_ok(int T, int L, int rows, int branches) {
  return branches >= 2 && branches <= MAX_MAPS && L % (rows << (branches - 1)) == 0 &&
         T % (L << (branches - 1)) == 0;
}

// Zeros at the positions that head h skips next to its kept row y (r·y + o' for every o' ≠ o),
// in its output or a gradient under head_split (the LSE's −∞ is the caller's): every position of
// the head is written once, from its branch or here. `at` points to the head's first column at
// position r·y of a tensor whose positions are `row` elements apart; the thread writes `cols`
// bf16 pairs, 8 columns apart.
__device__ __forceinline__ void zero_unkept(__nv_bfloat16* at, long long row, const Head& x, int cols) {
  for (int o = 0; o < (1 << x.shift); ++o) {
    if (o == x.o) continue;
#pragma unroll 1
    for (int j = 0; j < cols; ++j)
      *reinterpret_cast<__nv_bfloat162*>(at + o * row + 8 * j) = __floats2bfloat162_rn(0.f, 0.f);
  }
}

}  // namespace ws
