"""A model of longctx/kernels/csrc/ws_fwd.cu's synchronisation, run on the CPU: the producer
thread and the two consumer warpgroups of one persistent CTA as Python generators, interleaved at
random, over the kernel's mbarriers (arrival counts and phase parities as PTX defines them), its
double-buffered Q, its K/V ring and, in ping-pong, its named barriers 1 and 2.

It checks what a GPU run can only show as a hang or a wrong number: no deadlock, every tile a
consumer reads is the one it expects, and no buffer is refilled while a consumer still reads it.
The barrier waits and the parity formulas here are the kernel's, line for line; change them
together. ws_bwd.cu's protocol is the sequential mode's, with Q as its fixed pair of tiles and
K/V as its one ring.

`python tools/kernels/ws_protocol.py` runs every mode, causal and not, over grids of 1, 2, 3 and
7 CTAs (48 items), three interleavings each, and the upper pass's ping-pong over items of 0 to 4
levels' key tiles (those with none skipped by every role, their Q buffer not counted);
`--break-q-parity` makes the Q release's parity wrong by one, which the model reports as a
deadlock.
"""
import argparse
import random
import sys

STAGES, ROWS = 2, 128


class MBarrier:
    """mbarrier: `count` arrivals complete a phase; try_wait.parity(p) passes once the phase of
    parity p has completed, i.e. while the current phase's parity differs from p."""

    def __init__(self, count: int):
        self.count, self.pending, self.phase = count, count, 0

    def arrive(self):
        self.pending -= 1
        if self.pending == 0:
            self.phase, self.pending = self.phase + 1, self.count

    def passed(self, parity: int) -> bool:
        return self.phase & 1 != parity


class Named:
    """bar.sync / bar.arrive over 256 threads: two warpgroups' arrivals release the waiters."""

    def __init__(self):
        self.arrived, self.generation = 0, 0

    def arrive(self):
        self.arrived += 128
        assert self.arrived <= 256, "a warpgroup arrived twice on one named barrier"
        if self.arrived == 256:
            self.arrived, self.generation = 0, self.generation + 1


def items(B: int, T: int, H: int, L: int, causal: bool) -> list:
    """ws_fwd.cu's item(): (head, batch, segment, tile, key tiles), longest first."""
    per_seg, nseg = L // ROWS, T // L
    rest = nseg * H * B
    out = []
    for w in range(T // ROWS * H * B):
        rank, seg, bh = w // rest, w % rest % nseg, w % rest // nseg
        t = per_seg - 1 - rank if causal else rank
        out.append((bh % H, bh // H, seg, t, t + 1 if causal else per_seg))
    return out


def upper_items(count: int, per_level: int, rng: random.Random) -> list:
    """Upper-pass items as the protocol sees them: (its index, 0, 0, 0, key tiles), the tiles of
    0 to 4 live levels (a causal item may have none)."""
    return [(w, 0, 0, 0, rng.randrange(5) * per_level) for w in range(count)]


def cta(mine: list, mode: str, rng: random.Random, break_q_parity: bool) -> None:
    q_full, q_empty = [MBarrier(1) for _ in range(2)], [MBarrier(2) for _ in range(2)]
    k_full, k_empty = [MBarrier(1) for _ in range(STAGES)], [MBarrier(2) for _ in range(STAGES)]
    v_full, v_empty = [MBarrier(1) for _ in range(STAGES)], [MBarrier(2) for _ in range(STAGES)]
    q, k, v = [None] * 2, [None] * STAGES, [None] * STAGES
    held = {"q": [set(), set()], "k": [set() for _ in range(STAGES)], "v": [set() for _ in range(STAGES)]}
    named = {1: Named(), 2: Named()}

    def wait(bar, parity):
        while not bar.passed(parity):
            yield False
        yield True

    def fill(buf, name, i, value, bar):
        assert not held[name][i], f"{name}[{i}] refilled while read"
        buf[i] = value
        bar.arrive()

    def producer():
        kv = 0
        for it, x in enumerate(x for x in mine if x[4]):  # items without key tiles: skipped
            qb = it % 2
            if it >= 2:
                yield from wait(q_empty[qb], (it // 2 - (0 if break_q_parity else 1)) & 1)
            fill(q, "q", qb, x, q_full[qb])
            for n in range(x[4]):
                s, again = kv % STAGES, (kv // STAGES - 1) & 1
                if kv >= STAGES:
                    yield from wait(k_empty[s], again)
                fill(k, "k", s, (x, n), k_full[s])
                if kv >= STAGES:
                    yield from wait(v_empty[s], again)
                fill(v, "v", s, (x, n), v_full[s])
                kv += 1
                yield True

    def take(name, buf, bars, i, parity, want, c):
        yield from wait(bars[i], parity)
        assert buf[i] == want, f"{name}[{i}] holds {buf[i]}, expected {want}"
        held[name][i].add(c)

    def release(name, bars, i, c):
        held[name][i].discard(c)
        bars[i].arrive()

    def consumer(c):
        if mode == "ping-pong" and c == 1:
            named[1].arrive()
        kv = 0
        for it, x in enumerate(x for x in mine if x[4]):
            qb = it % 2
            yield from take("q", q, q_full, qb, (it // 2) & 1, x, c)
            if mode == "sequential":
                for n in range(x[4]):
                    now = kv + n
                    yield from take("k", k, k_full, now % STAGES, (now // STAGES) & 1, (x, n), c)
                    release("k", k_empty, now % STAGES, c)
                    yield from take("v", v, v_full, now % STAGES, (now // STAGES) & 1, (x, n), c)
                    release("v", v_empty, now % STAGES, c)
            else:
                yield from take("k", k, k_full, kv % STAGES, (kv // STAGES) & 1, (x, 0), c)
                release("k", k_empty, kv % STAGES, c)
                for n in range(1, x[4]):
                    now = kv + n
                    st, prev = now % STAGES, (now - 1) % STAGES
                    yield from take("k", k, k_full, st, (now // STAGES) & 1, (x, n), c)
                    yield from take("v", v, v_full, prev, ((now - 1) // STAGES) & 1, (x, n - 1), c)
                    if mode == "ping-pong":  # this consumer's turn, then the other's
                        generation = named[1 + c].generation
                        named[1 + c].arrive()
                        while named[1 + c].generation == generation:
                            yield False
                        named[2 - c].arrive()
                    yield True  # the matmuls in flight
                    release("k", k_empty, st, c)
                    yield True  # the softmax
                    release("v", v_empty, prev, c)
                last = kv + x[4] - 1
                yield from take("v", v, v_full, last % STAGES, (last // STAGES) & 1, (x, x[4] - 1), c)
                release("v", v_empty, last % STAGES, c)
            kv += x[4]
            release("q", q_empty, qb, c)
            yield True

    threads = [producer(), consumer(0), consumer(1)]
    stalled = 0
    while threads:
        t = rng.choice(threads)
        try:
            progressed = next(t)
        except StopIteration:
            threads.remove(t)
            progressed = True
        stalled = 0 if progressed else stalled + 1
        if stalled > 10_000:
            raise RuntimeError("deadlock: no thread has made progress in 10,000 turns")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--break-q-parity", action="store_true", help="the Q release's parity off by one")
    args = p.parse_args(argv)
    work = {causal: items(2, 1024, 3, 512, causal) for causal in (True, False)}
    for mode in ("sequential", "pipelined", "ping-pong"):
        for causal, grid, seed in ((c, g, s) for c in (True, False) for g in (1, 2, 3, 7) for s in range(3)):
            for b in range(grid):
                try:
                    cta(work[causal][b::grid], mode, random.Random(seed), args.break_q_parity)
                except (AssertionError, RuntimeError) as e:
                    sys.exit(f"{mode} {'causal' if causal else 'full'} grid {grid} CTA {b} seed {seed}: {e}")
        print(f"{mode}: ok", flush=True)
    for grid, seed in ((g, s) for g in (1, 2, 3, 7) for s in range(3)):
        work = upper_items(48, 2, random.Random(seed))
        for b in range(grid):
            try:
                cta(work[b::grid], "ping-pong", random.Random(seed), args.break_q_parity)
            except (AssertionError, RuntimeError) as e:
                sys.exit(f"upper ping-pong grid {grid} CTA {b} seed {seed}: {e}")
    print("upper ping-pong: ok", flush=True)


if __name__ == "__main__":
    main()
