"""core.ordering: the waves that apply a batch in each device's order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.core.ordering import READ, Claim, group, waves

CREATE, GET, CHANGE = "create", "get", object()


def test_creates_of_a_session_share_one_wave() -> None:
    assert waves([[("s1", CREATE)]] * 5) == [0] * 5


def test_a_close_waits_for_the_creates_before_it_and_holds_back_those_after() -> None:
    close = object()
    claims: list[list[Claim]] = [
        [("s1", CREATE)],
        [("s2", CREATE)],
        [("s1", close)],
        [("s1", CREATE)],
        [("s2", CREATE)],
    ]
    assert waves(claims) == [0, 0, 1, 2, 0]


def test_requests_with_labels_of_their_own_run_one_after_the_other() -> None:
    assert waves([[("r1", object())] for _ in range(3)]) == [0, 1, 2]


def test_a_request_on_two_keys_waits_for_both() -> None:
    claims: list[list[Claim]] = [
        [("a", object())],
        [("b", object())],
        [("b", object())],
        [("a", CREATE), ("b", CREATE)],
    ]
    assert waves(claims) == [0, 0, 1, 2]


def test_group_lists_each_wave_in_arrival_order() -> None:
    assert group([0, 1, 0, 2, 1]) == [[0, 2], [1, 4], [3]]
    assert group([]) == []


claim = st.tuples(
    st.sampled_from(["s1", "s2", "r1", "keys"]), st.sampled_from(["a", "b", "c", READ])
)


@given(st.lists(st.lists(claim, max_size=3), max_size=30))
def test_conflicting_requests_keep_their_order(claims: list[list[Claim]]) -> None:
    """For any two requests sharing a key: with different labels the earlier one is in an
    earlier wave; with the same label, never in a later one. An earlier read holds nothing
    back; a later read comes after all."""
    wave = waves(claims)
    for j in range(len(claims)):
        for i in range(j):
            for key_i, label_i in claims[i]:
                for key_j, label_j in claims[j]:
                    if key_i != key_j or label_i is READ:
                        continue
                    if label_j is READ:
                        assert wave[i] < wave[j], (claims, wave)
                    elif label_i == label_j:
                        assert wave[i] <= wave[j], (claims, wave)
                    else:
                        assert wave[i] < wave[j], (claims, wave)


@given(st.lists(st.lists(claim, max_size=3), max_size=30))
def test_each_wave_is_as_early_as_its_conflicts_allow(claims: list[list[Claim]]) -> None:
    """No request waits without cause: in wave w > 0 it conflicts with something in w - 1 or
    shares a label with something in w (no gaps, nothing held back for nothing)."""
    wave = waves(claims)
    for j, w in enumerate(wave):
        if w == 0:
            continue
        causes = [
            i
            for i in range(j)
            for key_i, label_i in claims[i]
            for key_j, label_j in claims[j]
            if key_i == key_j
            and label_i is not READ
            and (
                ((label_i != label_j or label_j is READ) and wave[i] == w - 1)
                or (label_i == label_j and label_j is not READ and wave[i] == w)
            )
        ]
        assert causes, (claims, wave, j)


def test_reads_wait_for_what_came_before_and_hold_back_nothing() -> None:
    """Create, get, create, get on one session: two waves, not four (a get may see a create
    sent after it; it must see those sent before)."""
    claims: list[list[Claim]] = [
        [("s1", CREATE)],
        [("s1", READ)],
        [("s1", CREATE)],
        [("s1", READ)],
    ]
    assert waves(claims) == [0, 1, 0, 1]
