"""``downpour eval supervised``'s pieces: labeled-set draws, the validated linear classifier,
the spread rule, the settings of --full, and the head-only warm-up of fine-tuning."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from downpour import config as jobconfig
from downpour.evals import supervised as S
from downpour.nn import Network, presets


def test_balanced_subset_takes_equal_classes_and_is_reproducible():
    y = np.repeat(np.arange(4), [50, 30, 10, 110])
    idx = S.balanced_subset(y, 40, 4, seed=3)
    assert len(idx) == 40 == len(np.unique(idx)) and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.bincount(y[idx], minlength=4), [10, 10, 10, 10])
    np.testing.assert_array_equal(idx, S.balanced_subset(y, 40, 4, seed=3))
    assert not np.array_equal(idx, S.balanced_subset(y, 40, 4, seed=4))
    # a class too small for its share: it gives what it has, the others fill up to n
    idx = S.balanced_subset(y, 80, 4, seed=0)
    counts = np.bincount(y[idx], minlength=4)
    assert len(idx) == 80 and counts[2] == 10 and counts.min() == 10 and counts.sum() == 80
    with pytest.raises(ValueError, match="only 200 available"):
        S.balanced_subset(y, 201, 4, seed=0)


def test_validation_mask_is_a_stratified_fifth():
    y = np.repeat(np.arange(3), [50, 20, 1])
    m = S.validation_mask(y, 0.2, seed=0)
    assert m[y == 0].sum() == 10 and m[y == 1].sum() == 4 and m[y == 2].sum() == 0


def test_linear_classifier_chooses_its_penalty_on_validation_only():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(20, 3))
    x = rng.normal(size=(300, 20))
    y = (x @ w).argmax(1)
    xt = rng.normal(size=(200, 20))
    yt = (xt @ w).argmax(1)
    acc, l2, val = S.linear_accuracy(x, y, xt, yt, 3, seed=0)
    assert set(val) == set(S.L2_GRID) and l2 in S.L2_GRID and val[l2] == max(val.values())
    assert acc > 0.85  # a linear problem, learned
    # the test labels play no part in the choice: scrambled test labels leave the penalty as it was
    _, l2_scrambled, val_scrambled = S.linear_accuracy(x, y, xt, rng.permutation(yt), 3, seed=0)
    assert l2_scrambled == l2 and val_scrambled == val


def test_spread_and_the_gain_rule():
    assert S.spread([0.5]) == 0.0
    assert S.spread([0.1, 0.2, 0.3]) == pytest.approx(0.1)  # sample standard deviation
    a, b = [0.80, 0.82, 0.81], [0.70, 0.71, 0.72]
    c = S.compare(a, b)
    assert c["difference"] == pytest.approx(0.1) and c["spread"] == pytest.approx(np.hypot(0.01, 0.01))
    assert c["verdict"] == "gain" and S.compare(b, a)["verdict"] == "loss"
    assert S.compare([0.80, 0.90, 0.70], [0.78, 0.79, 0.80])["verdict"] == "within the spread"


def test_feature_readout_layers():
    net = Network(presets.get("tiny"))
    assert S.feature_layers(net, "pooled") == ["stage1.pool", "stage2.pool", "stage3.pool"]
    assert S.feature_layers(net, "outputs") == ["stage1.output", "stage2.output", "stage3.output"]
    assert S.feature_layers(net, "top") == ["stage3.output"]
    with pytest.raises(ValueError, match="readout 'middle' is unknown"):
        S.feature_layers(net, "middle")
    x = np.random.default_rng(0).random((3, 1, 16, 16), dtype=np.float32)
    p = net.init_params(0)
    acts = net.forward(p, x)
    for readout in ("pooled", "outputs"):
        f = S.features(net, p, x, readout)
        names = S.feature_layers(net, readout)
        assert f.shape == (3, sum(acts[k][0].size for k in names))
        np.testing.assert_allclose(f[:, -acts[names[-1]][0].size :], acts[names[-1]].reshape(3, -1), rtol=1e-6)
    # pooled and normalised differ: the readout is not the same layer under two names
    assert not np.allclose(S.features(net, p, x, "pooled"), S.features(net, p, x, "outputs"))


def test_row_space_fit_is_the_full_fit():
    """More features than examples: the classifier fitted in the n-dimensional row space gives the
    same test scores as the one fitted on all d features (a direct fit, to convergence)."""
    rng = np.random.default_rng(2)
    n, d, k = 40, 150, 3
    f, ft = rng.normal(size=(n, d)), rng.normal(size=(25, d))
    y = rng.integers(0, k, n)
    W, b = S.softmax_regression(f, y, k, l2=0.1, max_iter=2000)
    a, t = S.row_space(f, ft)
    assert a.shape == (n, n) and t.shape == (25, n)
    Wr, br = S.softmax_regression(a, y, k, l2=0.1, max_iter=2000)
    # (to the optimiser's tolerance; a wrong projection is off by the scores' own size, about 1)
    np.testing.assert_allclose(t @ Wr + br, ft @ W + b, atol=2e-3)
    np.testing.assert_allclose(a @ Wr + br, f @ W + b, atol=2e-3)
    # fewer features than examples: nothing to reduce
    assert S.row_space(f[:, :30])[0] is f[:, :30] or np.array_equal(S.row_space(f[:, :30])[0], f[:, :30])


def test_softmax_regression_matches_finite_differences_at_its_optimum():
    """At the returned weights the penalised loss is stationary (checked by finite differences)."""
    rng = np.random.default_rng(3)
    f, y, l2 = rng.normal(size=(30, 4)), rng.integers(0, 3, 30), 0.05
    W, b = S.softmax_regression(f, y, 3, l2=l2, max_iter=1000)

    def loss(W, b):
        z = f @ W + b
        z = z - z.max(1, keepdims=True)
        return -np.mean(z[np.arange(30), y] - np.log(np.exp(z).sum(1))) + 0.5 * l2 * (W**2).sum()

    h = 1e-5
    for i, j in [(0, 0), (3, 2), (1, 1)]:
        E = np.zeros_like(W)
        E[i, j] = h
        assert abs((loss(W + E, b) - loss(W - E, b)) / (2 * h)) < 1e-4
    assert loss(W, b) < loss(np.zeros_like(W), np.zeros(3))


def parse(argv):
    p = argparse.ArgumentParser()
    S.add_arguments(p)
    return S.resolve(p.parse_args(argv))


def test_defaults_full_and_explicit_flags():
    assert parse([]) == {"seeds": 3, "labels": (2000, 300), "pretrain_steps": 1500, "finetune_steps": 400}
    assert parse(["--full"]) == S.FULL
    assert parse(["--full", "--seeds", "2", "--labels", "100,50"])["seeds"] == 2
    assert parse(["--full", "--labels", "100,50"])["labels"] == (100, 50)
    assert parse(["--full", "--labels", "100"])["pretrain_steps"] == S.FULL["pretrain_steps"]
    for bad in ("", "a,b", "0,10"):
        with pytest.raises(ValueError, match="--labels"):
            parse(["--labels", bad])


def test_run_refuses_bad_sizes_before_training(tmp_path):
    with pytest.raises(ValueError, match="head_only_steps=50 must be below finetune_steps=50"):
        S.run(str(tmp_path), finetune_steps=50, head_only_steps=50, log=lambda *a: None)
    with pytest.raises(ValueError, match="seeds=0"):
        S.run(str(tmp_path), seeds=0, log=lambda *a: None)


def test_head_only_steps_setting():
    cfg = jobconfig.load(env={}, overrides={"supervised": True, "model": {**_tiny_with_head()}, "head_only_steps": 5})
    assert cfg.head_only_steps == 5
    with pytest.raises(ValueError, match="head_only_steps=-1 must be >= 0"):
        jobconfig.load(env={}, overrides={"head_only_steps": -1})
    with pytest.raises(ValueError, match="needs a supervised job"):
        jobconfig.load(env={}, overrides={"head_only_steps": 3})


def _tiny_with_head():
    from downpour.nn.spec import NetworkSpec, to_dict

    t = presets.get("tiny")
    return to_dict(NetworkSpec(input=t.input, stages=t.stages, classes=3))


def test_head_only_zeroes_every_gradient_but_the_heads():
    from downpour.nn.spec import from_dict
    from downpour.worker.build import head_only

    net = Network(from_dict(_tiny_with_head()))
    p = net.init_params(0)
    rng = np.random.default_rng(1)
    _, grads, _ = net.supervised(p, rng.random((4, 1, 16, 16), dtype=np.float32), np.array([0, 1, 2, 0]))
    got = head_only(grads)
    assert set(got) == set(grads) and any(k.startswith("stage") for k in got)
    for k, g in got.items():
        if k.startswith("head."):
            np.testing.assert_array_equal(g, grads[k])
            assert np.abs(g).max() > 0
        else:
            assert g.shape == grads[k].shape and not np.any(g) and np.any(grads[k])


def test_quadrant_readout_sums_each_quarter_of_every_map():
    from downpour.evals import linear

    net = Network(presets.get("tiny"))
    assert S.feature_layers(net, "quadrants") == S.feature_layers(net, "pooled") == linear.stage_layers(net)
    assert "quadrants" in S.READOUTS
    x = np.random.default_rng(0).random((3, 1, 16, 16), dtype=np.float32)
    p = net.init_params(1)
    acts = net.forward(p, x)
    got = S.features(net, p, x, "quadrants")
    naive = []
    for k in linear.stage_layers(net):  # maps of 10x10, 6x6 and 3x3: the middle row/column goes up/left
        a = np.asarray(acts[k], np.float64)
        _, c, h, w = a.shape
        assert linear.layer_shape(net, k) == (c, h, w)
        hh, hw = (h + 1) // 2, (w + 1) // 2
        for m in range(c):
            for rows, cols in (((0, hh), (0, hw)), ((0, hh), (hw, w)), ((hh, h), (0, hw)), ((hh, h), (hw, w))):
                naive.append([sum(a[i, m, r, q] for r in range(*rows) for q in range(*cols)) for i in range(len(a))])
    assert got.shape == (3, 4 * sum(linear.layer_shape(net, k)[0] for k in linear.stage_layers(net)))
    np.testing.assert_allclose(got, np.array(naive).T, rtol=1e-5, atol=1e-6)
    # a hand-made 5x4 map: quarters of rows {0,1,2} / {3,4} and columns {0,1} / {2,3}
    a = np.arange(20.0).reshape(1, 1, 5, 4)
    np.testing.assert_array_equal(
        linear.quadrant_sums(a),
        [[0 + 1 + 4 + 5 + 8 + 9, 2 + 3 + 6 + 7 + 10 + 11, 12 + 13 + 16 + 17, 14 + 15 + 18 + 19]],
    )
    p2 = argparse.ArgumentParser()
    S.add_arguments(p2)
    assert p2.parse_args(["--readout", "quadrants"]).readout == "quadrants"


def test_probe_rows_and_comparisons_name_every_stage():
    from downpour.evals import probes

    net = Network(presets.get("tiny"))
    rows = probes.probe_rows(net)
    assert rows[0] == "linear classifier on deep features, random weights (frozen)"
    assert rows[1:] == tuple(
        f"linear classifier on stage{i}.pool ({w}, frozen)" for i in (1, 2, 3) for w in ("pretrained", "random weights")
    )
    assert not set(rows) & set(S.ROWS)
    comps = probes.probe_comparisons(net, S.ROWS[2])
    assert comps[0] == (S.ROWS[2], rows[0], "features: pretrained vs random")
    assert [c[2] for c in comps[1:]] == [f"stage{i}.pool: pretrained vs random" for i in (1, 2, 3)]
    assert all(set(c[:2]) <= set(rows) | {S.ROWS[2]} for c in comps)


def test_probe_feature_sets_read_each_stage_of_both_networks():
    from downpour.evals import probes

    net = Network(presets.get("tiny"))
    rng = np.random.default_rng(0)
    xl, xt = rng.random((5, 1, 16, 16), dtype=np.float32), rng.random((4, 1, 16, 16), dtype=np.float32)
    pre, rand = net.init_params(7), net.init_params(3)
    sets = probes.feature_sets(net, pre, rand, xl, xt, "pooled", S.ROWS[2])
    assert set(sets) == {S.ROWS[2], *probes.probe_rows(net)}
    np.testing.assert_array_equal(sets[S.ROWS[2]][0], S.features(net, pre, xl, "pooled"))
    np.testing.assert_array_equal(sets[probes.RANDOM_FEATURES][1], S.features(net, rand, xt, "pooled"))
    for params, row in ((pre, probes.pretrained_row), (rand, probes.random_row)):
        acts = net.forward(params, xt)
        for k in ("stage1.pool", "stage3.pool"):
            np.testing.assert_array_equal(sets[row(k)][1], acts[k].reshape(4, -1))
            assert sets[row(k)][0].shape == (5, acts[k][0].size)
    quad = probes.feature_sets(net, pre, rand, xl, xt, "quadrants", S.ROWS[2])
    assert quad[S.ROWS[2]][0].shape == (5, 48)  # the readout follows --readout, the stage probes do not
    np.testing.assert_array_equal(quad[probes.random_row("stage2.pool")][0], sets[probes.random_row("stage2.pool")][0])


def test_run_reports_probe_rows_against_the_jobs_initial_weights(tmp_path, monkeypatch):
    """The whole eval with its training jobs replaced: a "pretraining" that returns the job's initial
    weights makes every stage's pretrained and random probes the same classifier on the same features."""
    from downpour.evals import probes
    from downpour.evals.common import TrainResult

    seeds_seen = []

    def fake_job(run_dir, spec, x, y=None, *, steps, seed=0, **kw):
        seeds_seen.append(seed)
        return TrainResult(Network(spec).init_params(seed), steps, 0.0, [1.0, 0.5])

    monkeypatch.setattr(S, "train_job", fake_job)
    fit = S.linear_accuracy  # one penalty: the eval's bookkeeping is under test here, not the choice
    monkeypatch.setattr(S, "linear_accuracy", lambda *a, **kw: fit(*a, l2_grid=(0.1,), **kw))
    rng = np.random.default_rng(0)
    x = rng.random((240, 1, 16, 16)).astype(np.float32) * 0.3
    y = rng.integers(0, 3, 240)
    for i, c in enumerate(y):
        x[i, 0, 2 + 5 * c : 5 + 5 * c, :] += 0.7
    np.savez(tmp_path / "d.npz", x=x, y=y)
    lines = []
    res = S.run(
        str(tmp_path / "out"),
        data=str(tmp_path / "d.npz"),
        preset="tiny",
        seeds=2,
        labels=(30, 60),
        pretrain_steps=5,
        finetune_steps=5,
        head_only_steps=1,
        n_unlabeled=50,
        n_test=40,
        seed=4,
        log=lines.append,
    )
    assert set(seeds_seen) == {4, 5}
    net = Network(presets.get("tiny"))
    names = (*S.ROWS, *probes.probe_rows(net))
    assert [r["row"] for r in res["rows"]] == [*names, *names] and res["labels"] == [60, 30]
    assert res["probe_layers"] == ["stage1.pool", "stage2.pool", "stage3.pool"]
    rows = {(r["row"], r["labels"]): r["accuracies"] for r in res["rows"]}
    for n in (60, 30):
        assert rows[S.ROWS[2], n] == rows[probes.RANDOM_FEATURES, n]
        for k in res["probe_layers"]:
            assert rows[probes.pretrained_row(k), n] == rows[probes.random_row(k), n]
    comps = [c for c in res["comparisons"] if "pretrained vs random" in c["what"]]
    assert len(res["comparisons"]) == 2 * (len(S.COMPARISONS) + 4) and len(comps) == 8
    assert all(c["difference"] == 0 and c["verdict"] == "within the spread" for c in comps)
    assert len(res["linear_choices"]) == 2 * 2 * (2 + 7)
    table = S.format_table(res)
    for name in names:
        assert name in table
    assert "stage2.pool: pretrained vs random" in table
    assert (tmp_path / "out" / "probes.png").stat().st_size > 1000
    assert (tmp_path / "out" / "curve.png").stat().st_size > 1000
