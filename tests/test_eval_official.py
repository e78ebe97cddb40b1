"""Each benchmark's own metric against hand computation from its authors' formulas, on fixtures with
human ties and model ties."""

import math

import pytest

from dina_lrm.data.records import PreferenceGroup
from dina_lrm.eval.official import official_accuracy
from dina_lrm.eval.protocol import PairIndex


def sigmoid_probability(a, b):
    return 1 / (1 + math.exp(-(a - b)))


def ranked(ranks_per_group):
    return [PreferenceGroup(str(n), "p", [f"{n}_{k}.png" for k in range(len(r))], list(map(float, r))) for n, r in enumerate(ranks_per_group)]


RANKED = ranked([[1, 2, 3], [1, 1, 2], [1, 2]])
RANKED_SCORES = [0.9, 0.5, 0.7, 0.2, 0.3, 0.1, 0.5, 0.5]


def test_hpdv2_is_hpsv2s_mean_inversion_score():
    # prompt 1: predicted ranks [0, 2, 1] vs [1, 2, 3]: one discordant pair of 3 -> 2/3
    # prompt 2: predicted [1, 0, 2] vs [1, 1, 2]: the human tie is not discordant -> 1
    # prompt 3: a model tie, predicted [0, 0] -> not discordant -> 1
    assert official_accuracy("hpdv2", RANKED, RANKED_SCORES, sigmoid_probability) == pytest.approx((2 / 3 + 1 + 1) / 3)


def test_imagereward_counts_model_ties_wrong_and_ours_half():
    # pairs of different human rank: (0,1) right, (0,2) right, (1,2) wrong; (0,2) right, (1,2) right; the tie wrong
    assert official_accuracy("imagereward", RANKED, RANKED_SCORES, sigmoid_probability) == pytest.approx(4 / 6)
    assert PairIndex.of(RANKED).wins(RANKED_SCORES).mean() == pytest.approx(4.5 / 6)  # ours: a model tie is half right


PAIRS = ranked([[0, 1], [1, 0], [0.5, 0.5], [0.5, 0.5], [0, 1]])
PAIR_SCORES = [2.0, 0.0, 1.0, 0.0, 0.0, 0.05, 1.0, 0.0, 0.02, 0.0]


def test_pickapic_is_pickscores_tie_aware_accuracy():
    # P(first) = sigmoid(difference): 0.88, 0.73, 0.49, 0.73, 0.505; ties predicted when |2p - 1| <= threshold
    # threshold 0.1: first ok 1 | first vs second 0 | tie = tie 1 | first vs tie 0.5 | tie vs first 0.5
    assert official_accuracy("pickapic", PAIRS, PAIR_SCORES, sigmoid_probability, threshold=0.1) == pytest.approx(3.0 / 5)
    # threshold 0: 1 | 0 | second vs tie 0.5 | first vs tie 0.5 | first ok 1
    assert official_accuracy("pickapic", PAIRS, PAIR_SCORES, sigmoid_probability, threshold=0.0) == pytest.approx(3.0 / 5)
    # threshold 0.5 (|2p - 1| = 0.76, 0.46, 0.025, 0.46, 0.01): first ok 1 | tie vs second 0.5 | 1 | tie = tie 1 | tie vs first 0.5
    assert official_accuracy("pickapic", PAIRS, PAIR_SCORES, sigmoid_probability, threshold=0.5) == pytest.approx(4.0 / 5)


def test_genai_bench_is_the_four_way_accuracy():
    votes = ["leftvote", "rightvote", "tievote", "bothbad_vote"]
    groups = [PreferenceGroup(str(n), "p", ["l.png", "r.png"], ranks, label=vote)
              for n, (vote, ranks) in enumerate(zip(votes, ([0, 1], [1, 0], [0, 0], [0, 0])))]
    scores = [1.0, 0.0, 1.0, 0.0, 0.0, 0.01, 0.0, 0.0]
    # left right | left vs right wrong | tie = tievote right | tie (A=B=Good) vs bothbad wrong
    assert official_accuracy("genai_bench", groups, scores, sigmoid_probability, threshold=0.1) == pytest.approx(2 / 4)
    assert official_accuracy("hpdv3", groups, scores, sigmoid_probability) is None
