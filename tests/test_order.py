"""The prompt order and the training length, by hand: steps from epochs, every row once per epoch, no row twice in a
step, and an order decided by position alone (what resume relies on)."""

from __future__ import annotations

import pytest

from qlora_rft.order import PromptOrder, epochs_done, training_steps


def test_epochs_set_the_steps_by_hand():
    # 10 rows, 4 prompts per step: 2 epochs are 20 prompts = 5 steps; 1 epoch is 10 prompts = 2.5, so 3 steps (the
    # third takes 2 rows of the next pass); 8 processes x 2 prompts over 239 rows, 6 epochs: 1434 / 16 -> 90 steps.
    assert training_steps(0, 2, rows=10, per_step=4) == 5
    assert training_steps(0, 1, rows=10, per_step=4) == 3
    assert training_steps(0, 6, rows=239, per_step=16) == 90
    assert training_steps(7, 0, rows=10, per_step=4) == 7  # epochs 0: max_steps decides
    assert [epochs_done(s, rows=10, per_step=4) for s in range(1, 6)] == [0.4, 0.8, 1.2, 1.6, 2.0]


def test_ten_rows_four_per_step_two_epochs():
    order = PromptOrder(10, seed=0, per_step=4)
    rows = [order.index(n) for n in range(20)]
    steps = [rows[i:i + 4] for i in range(0, 20, 4)]  # the 5 steps
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))  # once per epoch
    assert all(len(set(step)) == 4 for step in steps)  # step 3: positions 8, 9 of the first pass, 0, 1 of the second
    assert set(steps[2][:2]).isdisjoint(steps[2][2:])


@pytest.mark.parametrize("size", range(1, 13))
def test_every_row_once_per_epoch_and_never_twice_in_a_step(size):
    for per_step in range(1, size + 1):
        for seed in range(3):
            order = PromptOrder(size, seed, per_step)
            rows = [order.index(n) for n in range(6 * size)]
            for epoch in range(6):
                assert sorted(rows[epoch * size:(epoch + 1) * size]) == list(range(size)), (per_step, seed, epoch)
            for start in range(0, len(rows) - per_step + 1, per_step):
                step = rows[start:start + per_step]
                assert len(set(step)) == per_step, (per_step, seed, start, step)


def test_the_order_depends_on_the_position_alone():
    walked = PromptOrder(10, seed=3, per_step=4)
    expected = [walked.index(n) for n in range(40)]
    resumed = PromptOrder(10, seed=3, per_step=4)  # a resumed run starts mid-epoch, at step 4's first prompt
    assert [resumed.index(n) for n in range(12, 40)] == expected[12:]
    assert [walked.index(n) for n in range(40)] == expected  # asking again from the start gives the same order
    assert [PromptOrder(10, seed=4, per_step=4).index(n) for n in range(10)] != expected[:10]  # the seed matters


def test_a_step_that_crosses_an_epoch_moves_its_rows_to_the_end_of_the_next_epoch():
    order = PromptOrder(5, seed=0, per_step=3)  # the second pass starts at position 5, inside step 2 (positions 3-5)
    first, second = [order.index(n) for n in range(5)], [order.index(n) for n in range(5, 10)]
    assert set(second[-2:]) == set(first[3:])  # the rows step 2 took from the first pass come last in the second
