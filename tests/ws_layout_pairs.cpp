// For tests/test_ws_layout.py: the (query, key) pairs that the CUDA kernels' passes score and their
// weights, enumerated on the host with the kernels' own item and weight functions
// (longctx/kernels/csrc/ws_layout.cuh) and the accumulator layout the kernels read them in.
// Usage: ws_layout_pairs B T H L n split causal upper out (upper: whether to add the upper passes). Writes to `out`, for each direction (forward,
// dQ, dK/dV) in turn, two (B, H, T, T) uint8 arrays: how many times each pair (query x, key s) was
// scored, and the weight m it was scored with (2^(log2 term)).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "ws_layout.cuh"

using namespace ws;

namespace {

constexpr int ROWS = 128;  // a CTA's fixed or query rows: two consumer warpgroups of 64

int B, T, H, L, N, SPLIT, CAUSAL, UPPER;

struct Pairs {
  std::vector<uint8_t> count, weight;
  Pairs() : count(size_t(B) * H * T * T), weight(size_t(B) * H * T * T) {}
  void add(int b, int h, long long x, long long s, float log2m) {
    const size_t i = ((size_t(b) * H + h) * T + x) * T + s;
    ++count[i];
    weight[i] = uint8_t(std::lround(std::exp2(log2m)));
  }
};

// The weight terms of row r (0 … 127) of a tile, as the four consumer threads that hold it (lane % 4
// = tq) compute them: which of a thread's two rows it is, and each thread's eight terms.
struct RowTerms {
  int half;
  float bias[4][8];
};

// Row r's thread's first row: its offset in the tile, and which of its two rows r is.
int thread_row(int r, int& half) {
  const int in_group = r % 64;
  half = in_group % 16 / 8;
  return 64 * (r / 64) + 16 * (in_group / 16) + in_group % 8;
}

// Row r of a local tile whose first row is y0 (weight_terms, `branches` branches).
RowTerms local_terms(int y0, int r, int h, int branches) {
  RowTerms t;
  const int first = y0 + thread_row(r, t.half);
  for (int tq = 0; tq < 4; ++tq) weight_terms(t.bias[tq], first, tq, h, branches);
  return t;
}

// Row r of an upper tile of class k against level a's partners from `start` (upper_terms).
RowTerms level_terms(int r, int start, int h, int k, int a) {
  RowTerms t;
  thread_row(r, t.half);
  for (int tq = 0; tq < 4; ++tq) upper_terms(t.bias[tq], start, tq, h, k, a, N);
  return t;
}

// The log2 weight the row's terms give column c of a tile: the term of the thread holding c
// (tq = c % 8 / 2), at [half][c / 8 mod 2][c mod 2].
float weight(const RowTerms& t, int c) { return t.bias[c % 8 / 2][4 * t.half + 2 * (c / 8 % 2) + c % 2]; }

long long position(const Head& hd, int y) { return ((long long)y << hd.shift) + hd.o; }

// The upper passes' pairs: class tiles of ROWS fixed rows (keys if `keys`) against each live
// level's partners, in tiles of `tile` rows (128 in the forward, 64 streamed in the backward).
void upper(Pairs& p, bool keys, int tile) {
  for (int w = 0; w < upper_items(B, T, H, N, ROWS); ++w) {
    const UpperItem u = upper_item(w, B, T, H, L, N, ROWS, CAUSAL, keys);
    const int x0 = u.hd.o + (u.y0 << u.hd.shift);
    for (int a = 2; a <= u.k + 1; ++a) {
      bool live;
      const int start = level_start(x0, u.hd.h, a, L, CAUSAL, keys, live);
      if (live != bool((u.levels >> (a - 2)) & 1)) std::abort();
      if (!live) continue;
      for (int r = 0; r < ROWS; ++r) {
        const RowTerms t = level_terms(r, start, u.hd.h, u.k, a);
        for (int i = 0; i < L / 2; ++i) {
          const long long fixed = position(u.hd, u.y0 + r), partner = start + ((long long)i << (a - 1));
          p.add(u.hd.b, u.hd.h, keys ? partner : fixed, keys ? fixed : partner, weight(t, i % tile));
        }
      }
    }
  }
}

void forward(Pairs& p) {
  const int branches = SPLIT ? 1 : N, per_rank = items_per_rank(B, T, H, L, SPLIT);
  for (int w = 0; w < per_rank * (L / ROWS); ++w) {
    const QueryItem x = query_item(w, B, T, H, L, CAUSAL, SPLIT, per_rank, ROWS);
    for (int r = 0; r < ROWS; ++r) {
      const RowTerms t = local_terms(x.q0, r, x.hd.h, branches);
      const int y = x.q0 + r;
      for (int n = 0; n < x.n_tiles; ++n)
        for (int c = 0; c < ROWS; ++c) {
          const int ys = x.seg0 + n * ROWS + c;
          if (CAUSAL && n == x.n_tiles - 1 && ys > y) continue;  // the diagonal tile's mask
          p.add(x.hd.b, x.hd.h, position(x.hd, y), position(x.hd, ys), weight(t, c));
        }
    }
  }
  if (UPPER) upper(p, false, ROWS);
}

// The backward's passes: 128 fixed rows (queries for dQ, keys for dK/dV) against streamed tiles
// of 64.
void backward(Pairs& p, bool dq) {
  const int branches = SPLIT ? 1 : N, per_rank = items_per_rank(B, T, H, L, SPLIT), S = 64;
  for (int w = 0; w < per_rank * (L / ROWS); ++w) {
    const FixedItem x = fixed_item(dq, w, B, T, H, L, CAUSAL, SPLIT, per_rank, ROWS, S);
    for (int r = 0; r < ROWS; ++r) {
      const RowTerms t = local_terms(x.f0, r, x.hd.h, branches);
      const int y = x.f0 + r;
      for (int n = 0; n < x.n_tiles; ++n) {
        const int s0 = x.seg0 + (x.first + n) * S;
        const bool mask = CAUSAL && (dq ? s0 + S > x.f0 : s0 < x.f0 + ROWS);  // tiles across the diagonal
        for (int c = 0; c < S; ++c) {
          const int ys = s0 + c;
          if (mask && (dq ? ys > y : ys < y)) continue;
          const long long fixed = position(x.hd, y), streamed = position(x.hd, ys);
          p.add(x.hd.b, x.hd.h, dq ? fixed : streamed, dq ? streamed : fixed, weight(t, c));
        }
      }
    }
  }
  if (UPPER) upper(p, !dq, S);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 10) {
    std::fprintf(stderr, "usage: %s B T H L n split causal upper out\n", argv[0]);
    return 2;
  }
  B = std::atoi(argv[1]), T = std::atoi(argv[2]), H = std::atoi(argv[3]), L = std::atoi(argv[4]);
  N = std::atoi(argv[5]), SPLIT = std::atoi(argv[6]), CAUSAL = std::atoi(argv[7]), UPPER = std::atoi(argv[8]);
  std::FILE* out = std::fopen(argv[9], "wb");
  if (out == nullptr) return 1;
  for (int pass = 0; pass < 3; ++pass) {
    Pairs p;
    if (pass == 0)
      forward(p);
    else
      backward(p, pass == 1);
    std::fwrite(p.count.data(), 1, p.count.size(), out);
    std::fwrite(p.weight.data(), 1, p.weight.size(), out);
  }
  return std::fclose(out) == 0 ? 0 : 1;
}
