from moe_watch.signals.window import SlidingWindow


def test_window_keeps_one_sample_before_the_horizon_as_left_edge() -> None:
    window: SlidingWindow[int] = SlidingWindow(12.0)
    for t in range(0, 31, 5):
        window.append(float(t), t)
    # horizon at 30 - 12 = 18: keep 15 (the newest sample at or before it), 20, 25, 30
    assert [item for _, item in window] == [15, 20, 25, 30]
    window.append(32.0, 32)  # horizon 20: 20 is now the left edge
    assert [item for _, item in window] == [20, 25, 30, 32]


def test_window_restarts_when_the_clock_steps_back() -> None:
    window: SlidingWindow[str] = SlidingWindow(60.0)
    window.append(100.0, "a")
    window.append(50.0, "b")
    assert [item for _, item in window] == ["b"]


def test_expire_empties_a_window_whose_newest_sample_is_too_old() -> None:
    window: SlidingWindow[str] = SlidingWindow(60.0)
    window.append(0.0, "a")
    window.expire(30.0)
    assert len(window) == 1
    window.expire(61.0)
    assert len(window) == 0
    assert window.latest() is None
