"""The metric and the model against their equations, on small tensors."""

import math

import numpy as np
import pytest
import torch

from fusion.metrics import ccc, ccc_loss, pcc, rmse, scores
from fusion.model import (
    CROP_MEAN,
    CROP_STD,
    CROP_STORED,
    CROP_TRAIN,
    RCMA,
    CrossModalAttention,
    MaskedBatchNorm,
    ModelConfig,
    RecursiveCrossModalAttention,
)


def reference_ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin (1989), written out term by term."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sx = sum((a - mx) ** 2 for a in x) / n
    sy = sum((b - my) ** 2 for b in y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / n
    return 2 * sxy / (sx + sy + (mx - my) ** 2)


def test_ccc_known_values():
    assert ccc(np.array([1.0, 2, 3]), np.array([1.0, 2, 3])) == pytest.approx(1.0)
    # a shift by 1: var 2/3 each, cov 2/3 -> (4/3) / (2/3 + 2/3 + 1) = 4/7
    assert ccc(np.array([1.0, 2, 3]), np.array([2.0, 3, 4])) == pytest.approx(4 / 7)
    assert ccc(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=200), rng.normal(size=200) * 0.5 + 0.3
    assert ccc(x, y) == pytest.approx(reference_ccc(list(x), list(y)))
    assert pcc(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert rmse(x, y) == pytest.approx(math.sqrt(np.mean((x - y) ** 2)))
    s = scores(np.stack([x, y], 1), np.stack([y, x], 1))
    assert s["ccc"] == pytest.approx(reference_ccc(list(x), list(y)))


def test_ccc_loss_matches_metric_and_ignores_unlabelled_frames():
    rng = np.random.default_rng(1)
    pred = torch.tensor(rng.normal(size=(3, 10, 2)), dtype=torch.float32)
    true = torch.tensor(rng.normal(size=(3, 10, 2)), dtype=torch.float32)
    mask = torch.tensor(rng.random((3, 10)) > 0.3)
    loss = ccc_loss(pred, true, mask)
    p, t = pred[mask].numpy(), true[mask].numpy()
    expected = (
        1 - (reference_ccc(list(p[:, 0]), list(t[:, 0])) + reference_ccc(list(p[:, 1]), list(t[:, 1]))) / 2
    )
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    changed = pred.clone()
    changed[~mask] = 100.0
    assert ccc_loss(changed, true, mask).item() == pytest.approx(loss.item(), abs=1e-6)


def test_attention_step_follows_the_equations():
    torch.manual_seed(0)
    k, d_m, d = 7, 4, 8
    step = CrossModalAttention(k, d_m, d)
    x, j = torch.randn(2, k, d_m), torch.randn(2, k, d)
    out = step(x, j)
    assert step.w_j.shape == (k, k) and step.w_c.shape == (d_m, d_m) and step.w_h.shape == (d, d_m)
    for b in range(2):
        c = torch.tanh(x[b].T @ step.w_j @ j[b] / math.sqrt(d))
        assert c.shape == (d_m, d)
        h = torch.relu(x[b] @ step.w_c @ c)
        assert h.shape == (k, d)
        torch.testing.assert_close(out[b], h @ step.w_h + x[b])
    with torch.no_grad():
        step.w_h.zero_()
    torch.testing.assert_close(step(x, j), x)  # the residual path alone


def test_recursion_runs_l_times_with_recomputed_joints_and_weights_per_iteration():
    torch.manual_seed(0)
    mods, k, w = ["audio", "visual", "text"], 6, 3

    def attention(**kw) -> RecursiveCrossModalAttention:
        cfg = ModelConfig(inputs=dict.fromkeys(mods, 4), window=k, width=w, gate="none", **kw)
        return RecursiveCrossModalAttention(cfg)

    xs = {m: torch.randn(2, k, w) for m in mods}
    valid = torch.ones(2, k, 1)
    for tied in (False, True):
        rcma = attention(iterations=3, tied=tied)
        assert len(rcma.steps) == (1 if tied else 3)
        assert rcma.steps[0]["audio"].w_h.shape == (2 * w, w)
        if not tied:  # separate parameters per iteration, not one tensor seen three times
            pointers = {rcma.steps[i]["audio"].w_j.data_ptr() for i in range(3)}
            assert len(pointers) == 3
            assert sum(p.numel() for p in rcma.parameters()) == 3 * sum(
                p.numel() for p in rcma.steps[0].parameters()
            )
        expected = dict(xs)
        for i in range(3):
            step = rcma.steps[0 if tied else i]
            joints = {m: torch.cat([expected[o] for o in mods if o != m], -1) for m in mods}
            expected = {m: step[m](expected[m], joints[m]) for m in mods}
        out = rcma(xs, valid)
        for m in mods:
            torch.testing.assert_close(out[m], expected[m])
        rcma.iterations = 2
        assert not torch.allclose(rcma(xs, valid)["audio"], out["audio"])
        rcma.iterations = 0
        torch.testing.assert_close(rcma(xs, valid)["audio"], xs["audio"])
    joint_all = attention(iterations=1, joint="all")
    assert joint_all.steps[0]["audio"].w_h.shape == (3 * w, w)
    pair = RecursiveCrossModalAttention(ModelConfig(inputs={"audio": 4, "visual": 4}, window=k, width=w))
    assert pair.joint_of == {"audio": ["visual"], "visual": ["audio"]}


def _batch(b: int, k: int, dims: dict[str, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(b, k, d, generator=g) for m, d in dims.items()}
    present = {m: torch.ones(b, k, dtype=torch.bool) for m in dims}
    return inputs, present


def test_padding_and_absent_frames_cannot_change_the_output():
    torch.manual_seed(0)
    dims = {"audio": 5, "visual": 6, "text": 7}
    model = RCMA(ModelConfig(inputs=dims, window=16, width=8, iterations=2)).eval()
    inputs, present = _batch(2, 16, dims)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 10:] = False  # a video shorter than the window
    present["visual"][0, 3:6] = False  # no face on three frames
    out = model(inputs, present, valid)
    assert out.shape == (2, 16, 2) and out.abs().max() <= 1
    noisy = {m: x.clone() for m, x in inputs.items()}
    for x in noisy.values():
        x[1, 10:] = 50.0
    noisy["visual"][0, 3:6] = -50.0
    torch.testing.assert_close(model(noisy, present, valid)[valid], out[valid])
    # the masks matter: a face on those frames changes the prediction
    present["visual"][0, 3:6] = True
    assert not torch.allclose(model(noisy, present, valid)[0], out[0])


@pytest.mark.parametrize(
    ("dims", "fusion"),
    [({"audio": 5}, "rcma"), ({"audio": 5, "text": 3}, "concat"), ({"audio": 5, "text": 3}, "rcma")],
)
def test_baselines_and_subsets(dims, fusion):
    model = RCMA(ModelConfig(inputs=dims, window=12, width=8, fusion=fusion))
    assert (model.attention is not None) == (fusion == "rcma" and len(dims) > 1)
    inputs, present = _batch(3, 12, dims)
    assert model(inputs, present, torch.ones(3, 12, dtype=torch.bool)).shape == (3, 12, 2)


def test_visual_crops_go_through_the_cnn_with_augmentation_in_training_only():
    torch.manual_seed(0)
    dims = {"audio": 4, "visual": 128}
    # no dropout of any kind: in training, only the crops' augmentation is random
    settings = dict(dropout=0.0, attention_dropout=0.0, modality_dropout=0.0)
    model = RCMA(ModelConfig(inputs=dims, window=8, width=8, visual_crops=True, **settings))
    inputs, present = _batch(2, 8, {"audio": 4})
    inputs["visual"] = torch.randint(0, 256, (2, 8, 3, CROP_STORED, CROP_STORED), dtype=torch.uint8)
    present["visual"] = torch.ones(2, 8, dtype=torch.bool)
    valid = torch.ones(2, 8, dtype=torch.bool)
    out = model(inputs, present, valid)
    out.sum().backward()
    assert model.face_cnn.net[0].weight.grad is not None

    seen: list[torch.Tensor] = []  # what the CNN is given, normalised
    model.face_cnn.net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    o = (CROP_STORED - CROP_TRAIN) // 2
    centre = inputs["visual"][..., o : o + CROP_TRAIN, o : o + CROP_TRAIN].flatten(0, 1)
    centre = (centre.float() / 255 - CROP_MEAN) / CROP_STD
    with torch.no_grad():
        trained = [model(inputs, present, valid) for _ in range(4)]
    assert all(view.shape == centre.shape for view in seen)
    assert not all(torch.equal(view, centre) for view in seen)  # random crops and flips...
    assert not all(torch.equal(view, seen[0]) for view in seen[1:])  # ...drawn anew each step
    assert not all(torch.allclose(t, trained[0]) for t in trained[1:])  # and they change the output
    seen.clear()
    model.eval()
    with torch.no_grad():
        first, second = model(inputs, present, valid), model(inputs, present, valid)
    assert len(seen) == 2 and all(torch.equal(view, centre) for view in seen)  # the centre crop only
    torch.testing.assert_close(first, second)


def test_modality_dropout_hides_whole_windows_in_training_only_and_never_every_modality():
    torch.manual_seed(0)
    dims = {"audio": 4, "visual": 5, "text": 3}
    model = RCMA(ModelConfig(inputs=dims, window=8, width=8, modality_dropout=0.5))
    present = {m: torch.ones(4000, 8, dtype=torch.bool) for m in dims}
    kept = model._drop_modalities(present)
    for m in dims:  # a window keeps or loses a modality whole
        assert torch.equal(kept[m].all(1), kept[m].any(1))
    windows = torch.stack([kept[m][:, 0] for m in dims], 1)  # (windows, modalities)
    assert windows.any(1).all()  # never all three gone
    assert 0.4 < 1 - windows.float().mean() < 0.5  # about half, less the spared ones
    inputs, _ = _batch(2, 8, dims)
    valid = torch.ones(2, 8, dtype=torch.bool)
    everything = {m: torch.ones(2, 8, dtype=torch.bool) for m in dims}
    model.eval()
    torch.testing.assert_close(model(inputs, everything, valid), model(inputs, everything, valid))


def test_modality_dropout_hides_only_what_a_window_has_and_spares_one_of_it():
    """Windows with some modalities absent (no words in a silent stretch, no face): dropout never
    leaves a window that had an input with none, and still hides what a window has often."""
    torch.manual_seed(0)
    dims = {"audio": 4, "visual": 5, "text": 3}
    model = RCMA(ModelConfig(inputs=dims, window=8, width=8, modality_dropout=0.5))
    cases = {  # which modalities each group of windows has: on every frame, or (text) on a few
        "audio": {"audio"},
        "audio, text": {"audio", "text"},
        "audio, visual": {"audio", "visual"},
        "every one": {"audio", "visual", "text"},
        "none": set(),
    }
    n = 4000
    present = {m: torch.zeros(n * len(cases), 8, dtype=torch.bool) for m in dims}
    for i, has in enumerate(cases.values()):
        for m in has:
            present[m][i * n : (i + 1) * n] = True
    present["text"][:, :5] = False  # text on the last three frames only: still a present modality
    kept = model._drop_modalities(present)
    before = torch.stack([present[m].any(1) for m in dims], 1)
    after = torch.stack([kept[m].any(1) for m in dims], 1)
    assert not (after & ~before).any()  # nothing appears
    assert torch.equal(after.any(1), before.any(1))  # a window with an input keeps one; none stays none
    for i, (name, has) in enumerate(cases.items()):
        lost = (before & ~after)[i * n : (i + 1) * n].float().mean(0)
        for j, m in enumerate(dims):
            if m not in has:
                continue
            expected = {1: 0.0, 2: 0.375, 3: 0.4375}[len(has)]  # p, less the windows spared
            assert abs(lost[j] - expected) < 0.03, (name, m, lost[j])


def test_masked_batch_norm_with_one_real_frame_uses_the_running_statistics():
    torch.manual_seed(0)
    norm = MaskedBatchNorm(3).train()
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        norm.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    x = torch.randn(2, 5, 3) * 3 + 1
    keep = torch.zeros(2, 5, 1)
    keep[1, 3] = 1  # one real frame in the whole batch
    out = norm(x, keep)
    expected = (x[1, 3] - norm.running_mean) / torch.sqrt(norm.running_var + 1e-5)
    torch.testing.assert_close(out[1, 3], expected)
    torch.testing.assert_close(norm.running_mean, torch.tensor([0.5, -1.0, 2.0]))  # left as they were
    torch.testing.assert_close(norm.running_var, torch.tensor([4.0, 1.0, 0.25]))
    assert (out * (1 - keep) == 0).all()

    keep[0, 1] = 1  # two real frames: PyTorch's BatchNorm over exactly those frames
    reference = torch.nn.BatchNorm1d(3).train()
    with torch.no_grad():
        reference.running_mean.copy_(norm.running_mean)
        reference.running_var.copy_(norm.running_var)
    out = norm(x, keep)
    expected = reference(torch.stack([x[0, 1], x[1, 3]]))
    torch.testing.assert_close(torch.stack([out[0, 1], out[1, 3]]), expected)
    torch.testing.assert_close(norm.running_mean, reference.running_mean)
    torch.testing.assert_close(norm.running_var, reference.running_var)
