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

// Row r (0 … 127) of a tile: the consumer thread's first row's offset and which of its two rows.
void thread_row(int r, int& first, int& half) {
  const int in_group = r % 64;
  first = 64 * (r / 64) + 16 * (in_group / 16) + in_group % 8;
  half = in_group % 16 / 8;
}

// Column c of a tile: the thread's lane % 4 and the term's index for row half `half`.
int term(int c, int half, int& tq) {
  tq = c % 8 / 2;
  return 4 * half + 2 * (c / 8 % 2) + c % 2;
}

long long position(const Head& hd, int y) { return ((long long)y << hd.shift) + hd.o; }

void forward(Pairs& p) {
  const int branches = SPLIT ? 1 : N, per_rank = items_per_rank(B, T, H, L, SPLIT);
  for (int w = 0; w < per_rank * (L / ROWS); ++w) {
    const QueryItem x = query_item(w, B, T, H, L, CAUSAL, SPLIT, per_rank, ROWS);
    for (int r = 0; r < ROWS; ++r) {
      int first, half, tq;
      thread_row(r, first, half);
      float bias[4][8];
      for (int t = 0; t < 4; ++t) weight_terms(bias[t], x.q0 + first, t, x.hd.h, branches);
      const int y = x.q0 + r;
      for (int n = 0; n < x.n_tiles; ++n)
        for (int c = 0; c < ROWS; ++c) {
          const int ys = x.seg0 + n * ROWS + c;
          if (CAUSAL && n == x.n_tiles - 1 && ys > y) continue;  // the diagonal tile's mask
          const int i = term(c, half, tq);
          p.add(x.hd.b, x.hd.h, position(x.hd, y), position(x.hd, ys), bias[tq][i]);
        }
    }
  }
  if (!UPPER) return;
  for (int w = 0; w < upper_items(B, T, H, N, ROWS); ++w) {
    const UpperItem u = upper_item(w, B, T, H, L, N, ROWS, CAUSAL, false);
    const int x0 = u.hd.o + (u.y0 << u.hd.shift);
    for (int a = 2; a <= u.k + 1; ++a) {
      if (!((u.levels >> (a - 2)) & 1)) continue;
      bool live;
      const int start = level_start(x0, u.hd.h, a, L, CAUSAL, false, live);
      if (!live) std::abort();
      for (int r = 0; r < ROWS; ++r) {
        int first, half, tq;
        thread_row(r, first, half);
        float bias[4][8];
        for (int t = 0; t < 4; ++t) upper_terms(bias[t], start, t, u.hd.h, u.k, a, N);
        for (int i = 0; i < L / 2; ++i) {
          const int c = term(i % ROWS, half, tq);
          p.add(u.hd.b, u.hd.h, position(u.hd, u.y0 + r), start + ((long long)i << (a - 1)), bias[tq][c]);
        }
      }
    }
  }
}

// The backward's passes: 128 fixed rows (queries for dQ, keys for dK/dV) against streamed tiles
// of 64.
void backward(Pairs& p, bool dq) {
  const int branches = SPLIT ? 1 : N, per_rank = items_per_rank(B, T, H, L, SPLIT), S = 64;
  for (int w = 0; w < per_rank * (L / ROWS); ++w) {
    const FixedItem x = fixed_item(dq, w, B, T, H, L, CAUSAL, SPLIT, per_rank, ROWS, S);
    for (int r = 0; r < ROWS; ++r) {
      int first, half, tq;
      thread_row(r, first, half);
      float bias[4][8];
      for (int t = 0; t < 4; ++t) weight_terms(bias[t], x.f0 + first, t, x.hd.h, branches);
      const int y = x.f0 + r;
      for (int n = 0; n < x.n_tiles; ++n) {
        const int s0 = x.seg0 + (x.first + n) * S;
        const bool mask = CAUSAL && (dq ? s0 + S > x.f0 : s0 < x.f0 + ROWS);  // tiles across the diagonal
        for (int c = 0; c < S; ++c) {
          const int ys = s0 + c;
          if (mask && (dq ? ys > y : ys < y)) continue;
          const int i = term(c, half, tq);
          const long long fixed = position(x.hd, y), streamed = position(x.hd, ys);
          p.add(x.hd.b, x.hd.h, dq ? fixed : streamed, dq ? streamed : fixed, bias[tq][i]);
        }
      }
    }
  }
  if (!UPPER) return;
  for (int w = 0; w < upper_items(B, T, H, N, ROWS); ++w) {
    const UpperItem u = upper_item(w, B, T, H, L, N, ROWS, CAUSAL, !dq);
    const int x0 = u.hd.o + (u.y0 << u.hd.shift);
    for (int a = 2; a <= u.k + 1; ++a) {
      bool live;
      const int start = level_start(x0, u.hd.h, a, L, CAUSAL, !dq, live);
      if (live != bool((u.levels >> (a - 2)) & 1)) std::abort();
      if (!live) continue;
      for (int r = 0; r < ROWS; ++r) {
        int first, half, tq;
        thread_row(r, first, half);
        float bias[4][8];
        for (int t = 0; t < 4; ++t) upper_terms(bias[t], start, t, u.hd.h, u.k, a, N);
        for (int i = 0; i < L / 2; ++i) {
          const int c = term(i % S, half, tq);
          const long long fixed = position(u.hd, u.y0 + r), streamed = start + ((long long)i << (a - 1));
          p.add(u.hd.b, u.hd.h, dq ? fixed : streamed, dq ? streamed : fixed, bias[tq][c]);
        }
      }
    }
  }
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
