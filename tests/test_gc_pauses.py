"""GC kept off the hot loop: set-up's objects frozen, pauses measured per step."""

import gc

from megatron_mopd.trainer import GCPauses


def test_freeze_moves_setup_objects_out_and_pauses_are_measured():
    setup = [[i] for i in range(10_000)]  # objects alive at the end of set-up
    pauses = GCPauses(freeze=True)
    pauses.start()
    try:
        assert gc.get_freeze_count() >= len(setup)
        assert pauses.take() == (0.0, 0)
        gc.collect()  # a full collection during a step is seen
        seconds, full = pauses.take()
        assert seconds > 0.0 and full == 1
        assert pauses.take() == (0.0, 0)  # counted once
    finally:
        pauses.close()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert pauses.take() == (0.0, 0)  # no longer measuring after close


def test_without_freeze_nothing_is_frozen():
    pauses = GCPauses(freeze=False)
    pauses.start()
    try:
        assert gc.get_freeze_count() == 0
    finally:
        pauses.close()
