// Where the CUDA Hopper kernels' rows are and how their pairs are weighted (what union_tiles.py
// is to the Triton union kernels): λ and the log2 weight terms, head_split's branches, and the
// work items of the local and upper passes. Plain integer and float code that nvcc and a host
// C++ compiler both take, so that tests/test_ws_layout.py checks these functions themselves, on
// the CPU, against an independent enumeration of the layout's pairs.
#pragma once
#ifdef __CUDACC__
#define WS_HD __host__ __device__ __forceinline__
#else
#define WS_HD inline
#endif

namespace ws {

WS_HD int min_int(int a, int b) { return a < b ? a : b; }

// Trailing zero bits of v (32 for 0): on the GPU as the bit-reversed word's leading zeros.
WS_HD int trailing_zeros(unsigned v) {
#ifdef __CUDA_ARCH__
  return __clz(__brev(v));
#else
  return v ? __builtin_ctz(v) : 32;
#endif
}

// λ of position x for head h: how many of the dilations 2 … 2^(branches−1) keep x, i.e. of
// j = 1 … branches − 1 with the low j bits of x ^ h zero: its trailing zeros, capped. The union
// kernels weight a local pair (x, s) by m = min(λ(x), λ(s)) + 1 (longctx/kernels/union.py).
WS_HD int lam(int x, int h, int branches) { return min_int(trailing_zeros(unsigned(x ^ h)), branches - 1); }

// log2 m for a pair's weight m = 1 … 5, correctly rounded, by selects rather than log2f's general
// path: a persistent CTA computes its terms again for every item (its head changes).
WS_HD float log2_weight(int m) {
  return m == 1 ? 0.f : m == 2 ? 1.f : m == 3 ? 1.5849625007f : m == 4 ? 2.f : 2.3219280949f;
}

// The wgmma accumulator layout the kernels' terms follow: warp w of a consumer warpgroup holds its
// rows 16w + lane/4 and that + 8 (half 0, 1); register 4j + 2·half + e holds column 8j + 2·tq + e
// (tq = lane % 4). A thread's terms are indexed [half][j mod 2][e], bias[4·half + 2·(j % 2) + e].

// A local tile's eight weight terms log2 m for accumulator rows `row` and row + 8 against the
// columns of a tile that starts at a multiple of 64: a column's λ depends only on its low
// branches − 1 (≤ 4) bits, which its place in the tile fixes.
WS_HD void weight_terms(float (&bias)[8], int row, int tq, int h, int branches) {
#pragma unroll
  for (int i = 0; i < 8; ++i)
    bias[i] = log2_weight(
        min_int(lam(row + 8 * (i / 4), h, branches), lam(8 * ((i / 2) % 2) + 2 * tq + i % 2, h, branches)) + 1);
}

// An upper tile's terms at level a for a class-k row (λ = k): a level-a partner s has weight
// m = min(λ(s), k) + 2 − a, the same for both rows; the tile's partners are positions
// start + c·2^(a−1) for its columns c, and starts 16 positions apart leave λ unchanged.
WS_HD void upper_terms(float (&bias)[8], int start, int tq, int h, int k, int a, int branches) {
#pragma unroll
  for (int i = 0; i < 8; ++i)
    bias[i] = log2_weight(min_int(lam(start + ((8 * ((i / 2) % 2) + 2 * tq + i % 2) << (a - 1)), h, branches), k) +
                          2 - a);
}

// Where a work item's rows are. Positions of head h are r·y + o, r = 2^shift: a tensor map of
// that dilation reads row y at column o·(row stride) + 64h (ws_common.cuh's Maps). Under
// head_split r is the head's branch's dilation and o = h mod r; in the upper passes r and o are
// the class tile's; else r = 1, o = 0 and y is the position.
struct Head {
  int h, b, shift, o;
};

// Head h's branch under head_split over `split` branches (0: none): the groups layout.head_groups
// makes, contiguous and as even as possible, the earlier ones one larger.
WS_HD int branch_of(int h, int H, int split) {
  if (split == 0) return 0;
  const int base = H / split, big = H % split * (base + 1);
  return h < big ? h / (base + 1) : H % split + (h - big) / base;
}

// Local-pass items a rank (see work): Σ over heads of B·T / (L·r).
inline int items_per_rank(int B, int T, int H, int L, int split) {
  int n = 0;
  for (int h = 0; h < H; ++h) n += B * ((T >> branch_of(h, H, split)) / L);
  return n;
}

// Local-pass item w's head, batch element, segment and rank (its tile's index counted from the
// item a causal pass runs first), ordered rank first, then head and batch element, then segment;
// under head_split a head has T / (L·r) segments, so `per_rank` (host-counted: Σ over heads of
// B·T / (L·r), items_per_rank) items share a rank.
WS_HD Head work(int w, int B, int T, int H, int L, int split, int per_rank, int& seg, int& rank) {
  rank = w / per_rank;
  int rest = w % per_rank;
  if (split == 0) {
    const int nseg = T / L;
    seg = rest % nseg;
    return {rest / nseg % H, rest / nseg / H, 0, 0};
  }
  int h = 0, nseg = T / L;
  for (;; ++h) {
    nseg = (T >> branch_of(h, H, split)) / L;
    if (rest < B * nseg) break;
    rest -= B * nseg;
  }
  const int shift = branch_of(h, H, split);
  seg = rest % nseg;
  return {h, rest / nseg, shift, h & ((1 << shift) - 1)};
}

// The forward's local item: 128-row query tiles of one head's segment, ordered longest first
// (under the causal mask a tile's key count is its rank + 1). Rows are y, from vrow0 (the batch
// element's first view row): seg0 and q0 the segment's and the tile's first; the keys are
// n_tiles tiles of `rows` from seg0, the causal diagonal in the last.
struct QueryItem {
  Head hd;
  int vrow0, seg0, q0, n_tiles;
};

WS_HD QueryItem query_item(int w, int B, int T, int H, int L, int causal, int split, int per_rank, int rows) {
  int seg, rank;
  const Head hd = work(w, B, T, H, L, split, per_rank, seg, rank);
  const int per_seg = L / rows, t = causal ? per_seg - 1 - rank : rank;
  return {hd, hd.b * (T >> hd.shift), seg * L, seg * L + t * rows, causal ? t + 1 : per_seg};
}

// The backward's local item: `fixed` rows of one head's segment (keys for dK/dV, queries for
// dQ), ordered by how many streamed tiles of `streamed` rows meet them under the causal mask,
// most first (dK/dV: a segment's first key tile; dQ: its last query tile). The streamed tiles
// that meet them (query ≥ key) are n_tiles from `first`: for dK/dV the query tiles from f0 on,
// for dQ the key tiles up to f0 + fixed.
struct FixedItem {
  Head hd;
  int vrow0, seg0, f0, first, n_tiles;
};

WS_HD FixedItem fixed_item(bool dq, int w, int B, int T, int H, int L, int causal, int split, int per_rank, int fixed,
                           int streamed) {
  int seg, rank;
  const Head hd = work(w, B, T, H, L, split, per_rank, seg, rank);
  const int per_seg = L / fixed, seg0 = seg * L, f0 = seg0 + (causal && dq ? per_seg - 1 - rank : rank) * fixed;
  const int first = causal && !dq ? (f0 - seg0) / streamed : 0;
  const int n_tiles = !causal ? L / streamed : dq ? (f0 - seg0) / streamed + fixed / streamed : (seg0 + L - f0) / streamed;
  return {hd, hd.b * (T >> hd.shift), seg0, f0, first, n_tiles};
}

// The upper passes (levels ≥ 2, no head_split; union.py): a tile's rows are one class, the
// positions of λ = k, k = 1 … n − 1: c_k + j·2^(k+1), or c_k + j·2^k for the last class (λ capped
// at n − 1), c_k < the step. Level a (2 … k + 1) pairs a row x with the L/2 positions of the
// other half of x's w_a = L·2^(a−1) segment that are ≡ h (mod 2^(a−1)): 2^(a−1) apart from
// `level_start`. Causal, a query takes level a only from the second half (its partners are the
// first), a key only from the first. So a tile of `rows` class rows, whose span rows·2^shift
// must divide L (layout check: rows·2^(n−1) | L), lies within one half at every level.
WS_HD int class_shift(int k, int n) { return k == n - 1 ? k : k + 1; }

WS_HD int class_first(int k, int n, int h) { return k == n - 1 ? h & ((1 << k) - 1) : (h ^ (1 << k)) & ((2 << k) - 1); }

// Level a's first partner position of a tile at position x0 of head h, and whether the tile has
// partners there (`keys`: the tile's rows are keys).
WS_HD int level_start(int x0, int h, int a, int L, int causal, bool keys, bool& live) {
  const int half_len = L << (a - 2), half = x0 / half_len % 2;
  live = !causal || half == (keys ? 0 : 1);
  return x0 / (2 * half_len) * (2 * half_len) + (1 - half) * half_len + (h & ((1 << (a - 1)) - 1));
}

// Upper-pass items: B·H·Σ_k T / (rows·2^shift(k)), class n − 1 first (the most levels), then by
// batch element and head, then tile.
WS_HD int upper_items(int B, int T, int H, int n, int rows) {
  int count = 0;
  for (int k = 1; k < n; ++k) count += B * H * ((T >> class_shift(k, n)) / rows);
  return count;
}

// Upper item w: its head and rows (hd: the class's dilation and first position), first row y0 of
// the class map, the class k, and its live levels (bit a − 2 for level a), none where a causal
// tile has no partners.
struct UpperItem {
  Head hd;
  int vrow0, y0, k, levels;
};

WS_HD UpperItem upper_item(int w, int B, int T, int H, int L, int n, int rows, int causal, bool keys) {
  int k = n - 1, tiles = (T >> class_shift(k, n)) / rows;
  while (k > 1 && w >= B * H * tiles) {
    w -= B * H * tiles;
    --k;
    tiles = (T >> class_shift(k, n)) / rows;
  }
  const int h = w / tiles % H, b = w / tiles / H, j = w % tiles, shift = class_shift(k, n);
  const int first = class_first(k, n, h), x0 = first + ((j * rows) << shift);
  int levels = 0;
  for (int a = 2; a <= k + 1; ++a) {
    bool live;
    level_start(x0, h, a, L, causal, keys, live);
    levels |= int(live) << (a - 2);
  }
  return {{h, b, shift, first}, b * (T >> shift), j * rows, k, levels};
}

}  // namespace ws
