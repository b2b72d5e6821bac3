#!/usr/bin/env python3
"""Synthetic ratings in MovieLens format (tab-separated `user item rating unix_ts`).

Shaped like MovieLens 100k: 943 users, 1,682 items, 100,000 ratings, every
user with at least 20; user activity heavy-tailed, item popularity Zipf-like;
users join over seven months and rate most of their items in a burst after
joining. Ratings are a low-rank model with user and item biases plus noise,
rounded and clipped to 1..5 (distribution close to MovieLens' 6/11/27/34/21%).

    python3 scripts/synth_ratings.py --seed 1 > ratings.tsv
    pulse reco-eval --ratings ratings.tsv --format movielens
"""

import argparse
import math
import random


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=943)
    ap.add_argument("--items", type=int, default=1682)
    ap.add_argument("--ratings", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=6)
    ap.add_argument("--noise", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)

    # Activity: lognormal, at least 20 ratings each, scaled to the total.
    raw = [rng.lognormvariate(0, 1.0) for _ in range(a.users)]
    spare = a.ratings - 20 * a.users
    scale = spare / sum(raw)
    counts = [20 + int(r * scale) for r in raw]
    counts[0] += a.ratings - sum(counts)
    counts = [min(c, a.items) for c in counts]

    # Item popularity (Zipf, exponent 0.9) in a shuffled order.
    pop = [1.0 / (k + 1) ** 0.9 for k in range(a.items)]
    rng.shuffle(pop)
    cum = []
    s = 0.0
    for p in pop:
        s += p
        cum.append(s)

    mu = 3.68
    ub = [rng.gauss(0, 0.45) for _ in range(a.users)]
    # Popular items are rated a little higher.
    top = max(pop)
    ib = [rng.gauss(0, 0.45) + 0.4 * math.log(p / top) / 6 + 0.25 for p in pop]
    uf = [[rng.gauss(0, 0.45) for _ in range(a.dim)] for _ in range(a.users)]
    vf = [[rng.gauss(0, 0.45) for _ in range(a.dim)] for _ in range(a.items)]

    start = 874_724_710  # 1997-09-20
    span = 215 * 86_400
    out = []
    for u in range(a.users):
        join = start + int(rng.random() ** 1.3 * span)
        chosen = set()
        while len(chosen) < counts[u]:
            x = rng.random() * s
            lo, hi = 0, a.items - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if cum[mid] < x:
                    lo = mid + 1
                else:
                    hi = mid
            chosen.add(lo)
        for i in chosen:
            # Most in the first day, the rest over the following weeks.
            if rng.random() < 0.8:
                t = join + int(rng.random() * 3_600 * 6)
            else:
                t = join + int(rng.expovariate(1 / (14 * 86_400)))
            dot = sum(p * q for p, q in zip(uf[u], vf[i]))
            r = mu + ub[u] + ib[i] + dot + rng.gauss(0, a.noise)
            out.append((t, u + 1, i + 1, max(1, min(5, round(r)))))
    out.sort()
    for t, u, i, r in out:
        print(f"{u}\t{i}\t{r}\t{t}")


if __name__ == "__main__":
    main()
