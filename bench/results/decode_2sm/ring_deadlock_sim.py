"""The byte-addressed ring of variant_byte_ring.patch, simulated: steps placed one after another, wrapping to 0 when a
step does not fit before the ring's end; the producer may place step q once every step it overlaps has been freed, and
the consumers free step q - 1 only after step q has landed, so a step that overlaps step q - 1 deadlocks.

    python bench/results/decode_2sm/ring_deadlock_sim.py
"""
import random

X, W, V, META = 2048, 16384, 8192, 2048   # bytes at 16 tokens: x's box, a dense half-K-tile box, 2:4 values, codes


def step(dense0: bool, dense1: bool) -> int:
    return X + (W if dense0 else V + META) + (W if dense1 else V + META)


def deadlocks(ring: int, seq: list[int], nb: int = 8) -> int | None:
    at, head, tail = {}, 0, 0
    for q, b in enumerate(seq):
        o = 0 if head + b > ring else head
        last = -1
        for j in range(tail, q):
            if q - j >= nb or (o < at[j][0] + at[j][1] and at[j][0] < o + b):
                last = j
        if q > 0 and last == q - 1:
            return q
        if last >= 0:
            tail = last + 1
        at[q] = (o, b)
        head = o + b
    return None


if __name__ == "__main__":
    random.seed(0)
    for ring in (93 * 1024, 207 * 1024):   # two CTAs an SM / one CTA an SM
        hits = 0
        for _ in range(2000):
            p = random.random()
            hits += deadlocks(ring, [step(random.random() < p, random.random() < p) for _ in range(60)]) is not None
        print(f"ring {ring // 1024} KB: {hits} of 2000 random mixed layers deadlock; all dense "
              f"{deadlocks(ring, [step(True, True)] * 60)}, all 2:4 {deadlocks(ring, [step(False, False)] * 60)}")
