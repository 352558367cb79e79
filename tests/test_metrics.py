import pytest
import torch

from msf.metrics import FScoreMeter

EPS = 1e-7


def paper_f(tp, fp, fn):
    p = tp / (tp + fp + EPS)
    r = tp / (tp + fn + EPS)
    return 2 * p * r / (p + r + EPS)


def score(pred, gt):
    meter = FScoreMeter()
    meter.update(torch.tensor(pred)[None], torch.tensor(gt)[None])
    return meter.compute()


def test_perfect_prediction_scores_one():
    gt = [[0, 1, 1], [2, 2, 13]]
    out = score(gt, gt)
    assert out["f_score"] == pytest.approx(1.0, abs=1e-6)
    assert out["miou"] == pytest.approx(1.0)
    assert set(out["per_class_f1"]) == {"background", "skin", "nose", "hair"}


def test_single_class_image():
    gt = [[1, 1], [1, 1]]
    pred = [[1, 1], [1, 0]]  # tp=3, fn=1 for skin; background predicted but absent from gt
    out = score(pred, gt)
    assert out["f_score"] == pytest.approx(paper_f(3, 0, 1), rel=1e-9)  # only skin is scored
    assert out["per_class_f1"]["background"] == 0.0
    assert out["miou"] == pytest.approx((3 / 4 + 0.0) / 2)


def test_class_predicted_but_absent_from_ground_truth_is_not_averaged_in():
    gt = [[0, 0, 1, 1]]
    pred = [[0, 3, 1, 1]]  # glasses (3) predicted, not in gt
    out = score(pred, gt)
    expected = (paper_f(1, 0, 1) + paper_f(2, 0, 0)) / 2
    assert out["f_score"] == pytest.approx(expected, rel=1e-9)
    assert out["per_class_f1"]["eye_g"] == 0.0


def test_mean_over_images_streams_across_batches():
    a_gt, a_pred = [[0, 1], [1, 1]], [[0, 1], [1, 1]]
    b_gt, b_pred = [[2, 2], [0, 0]], [[2, 0], [0, 0]]
    expected = (1.0 + (paper_f(1, 0, 1) + paper_f(2, 1, 0)) / 2) / 2
    streamed = FScoreMeter()
    streamed.update(torch.tensor([a_pred]), torch.tensor([a_gt]))
    streamed.update(torch.tensor([b_pred]), torch.tensor([b_gt]))
    together = FScoreMeter()
    together.update(torch.tensor([a_pred, b_pred]), torch.tensor([a_gt, b_gt]))
    assert streamed.compute()["f_score"] == pytest.approx(expected, rel=1e-6)
    assert together.compute()["f_score"] == pytest.approx(expected, rel=1e-6)
    assert streamed.compute()["images"] == 2


def test_random_maps_match_a_loop_over_classes():
    g = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 19, (3, 17, 13), generator=g)
    gt = torch.randint(0, 6, (3, 17, 13), generator=g)
    scores = []
    for p, t in zip(pred, gt):
        fs = []
        for c in t.unique():
            tp = ((p == c) & (t == c)).sum().item()
            fp = ((p == c) & (t != c)).sum().item()
            fn = ((p != c) & (t == c)).sum().item()
            fs.append(paper_f(tp, fp, fn))
        scores.append(sum(fs) / len(fs))
    meter = FScoreMeter()
    meter.update(pred, gt)
    assert meter.compute()["f_score"] == pytest.approx(sum(scores) / 3, rel=1e-9)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        FScoreMeter().update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))


def test_count_ids_equals_bincount():
    from msf.metrics import count_ids
    ids = torch.randint(0, 7, (5, 33), generator=torch.Generator().manual_seed(3))
    assert torch.equal(count_ids(ids, 9), torch.bincount(ids.flatten(), minlength=9))


def test_meter_state_sums_like_one_meter_over_all_batches():
    # what a multi-process run does: each process scores its share, the states are summed
    g = torch.Generator().manual_seed(2)
    pred, gt = torch.randint(0, 19, (6, 9, 11), generator=g), torch.randint(0, 5, (6, 9, 11), generator=g)
    whole, first, second = FScoreMeter(), FScoreMeter(), FScoreMeter()
    whole.update(pred, gt)
    first.update(pred[:4], gt[:4])
    second.update(pred[4:], gt[4:])
    summed = FScoreMeter()
    summed.load_state(first.state() + second.state())
    first.merge(second)
    for meter in (summed, first):
        got, want = meter.compute(), whole.compute()
        assert got["images"] == 6 and got["f_score"] == pytest.approx(want["f_score"], rel=1e-12)
        assert got["per_class_f1"] == pytest.approx(want["per_class_f1"])
    with pytest.raises(ValueError, match="meter state has shape"):
        FScoreMeter().load_state(torch.zeros(5))
