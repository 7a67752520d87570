"""Progress lines in logs (not a terminal): a line at each tenth after some silence, and at
least every 30 s while a step runs; driven by a fake clock, never the wall clock."""

from __future__ import annotations

from gradalign.progress import LineProgress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines_of(total: int, clock: Clock) -> tuple[LineProgress, list[str]]:
    out: list[str] = []
    return LineProgress("warm start", total, clock=clock, emit=out.append), out


def test_a_line_at_each_tenth_when_steps_are_slow():
    clock = Clock()
    p, out = lines_of(20, clock)
    for _ in range(20):
        clock.now += 6.0  # 6 s a step: every tenth (2 steps) is 12 s after the last line
        p(1)
    assert out == [f"  warm start: {2 * i}/20 ({10 * i}%), {12 * i} s" for i in range(1, 11)]


def test_a_fast_step_prints_nothing():
    clock = Clock()
    p, out = lines_of(1000, clock)
    for _ in range(1000):
        clock.now += 0.004  # 4 s in all, under the 5 s of silence a tenth's line waits for
        p(1)
    assert out == []


def test_a_heartbeat_every_30_s_within_a_tenth():
    clock = Clock()
    p, out = lines_of(10, clock)
    clock.now += 29.0
    p.tick()
    assert out == []
    clock.now += 1.0
    p.tick()  # 30 s of silence, nothing advanced: the heartbeat thread's line
    p.note = "loss 1.250"
    clock.now += 45.0
    p(1)  # a tenth passed, 45 s after the last line
    clock.now += 30.0
    p.tick()
    assert out == [
        "  warm start: 0/10 (0%), 30 s",
        "  warm start: 1/10 (10%), 75 s, loss 1.250",
        "  warm start: 1/10 (10%), 105 s, loss 1.250",
    ]


def test_many_small_advances_between_tenths_still_beat_every_30_s():
    clock = Clock()
    p, out = lines_of(1000, clock)
    for _ in range(99):  # 99 of 1000: never a tenth, 1 s apart
        clock.now += 1.0
        p(1)
    assert out == ["  warm start: 30/1000 (3%), 30 s", "  warm start: 60/1000 (6%), 60 s",
                   "  warm start: 90/1000 (9%), 90 s"]  # fmt: skip


def test_a_total_of_zero_prints_counts_only():
    clock = Clock()
    p, out = lines_of(0, clock)
    clock.now += 31.0
    p(3)
    assert out == ["  warm start: 3/0, 31 s"]
