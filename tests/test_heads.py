import numpy as np
import pytest

from conftest import all_features
from jaxtl.data import DataError
from jaxtl.heads import ABSENT_LOGIT, fit_linear_head, inner_folds, with_fitted_head
from jaxtl.model import Head


def _data(n_classes=4, per_class=15, dim=12, seed=0):
    """Gaussian classes, a different offset per speaker (3 speakers): what a frozen base hands a head."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (n_classes, dim))
    y = np.repeat(np.arange(n_classes), per_class)
    groups = [f"s{i % 3}" for i in range(len(y))]
    x = centres[y] + rng.normal(0, 1, (len(y), dim)) + np.array([int(g[1]) for g in groups])[:, None] * 0.5
    return x.astype(np.float32), y, groups


def _model_logits(params, norm, x, n_classes):
    variables = {"params": params["head"], **({"norm": norm["head"]} if norm else {})}
    return np.asarray(Head(n_classes, hidden=0, normalize=bool(norm)).apply(variables, x))


@pytest.mark.parametrize("with_norm", [False, True])
def test_lda_and_ncm_in_the_model_decide_as_scikit_learn(with_norm):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.neighbors import NearestCentroid

    x, y, groups = _data()
    norm = {"head": {"mean": x.mean(0) + 0.3, "scale": 1.0 / (x.std(0) + 0.1)}} if with_norm else {}
    seen = (x - norm["head"]["mean"]) * norm["head"]["scale"] if with_norm else x  # what the Dense receives
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(seen.astype(np.float64), y)
    params, _ = with_fitted_head({"base": {}}, norm, x, y, 4, "lda")
    np.testing.assert_allclose(_model_logits(params, norm, x, 4), lda.decision_function(seen), rtol=1e-3, atol=1e-3)
    params, _ = with_fitted_head({"base": {}}, norm, x, y, 4, "ncm")
    test = x + np.random.default_rng(1).normal(0, 1.5, x.shape).astype(np.float32)
    seen_test = (test - norm["head"]["mean"]) * norm["head"]["scale"] if with_norm else test
    np.testing.assert_array_equal(_model_logits(params, norm, test, 4).argmax(-1),
                                  NearestCentroid().fit(seen, y).predict(seen_test))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # scikit-learn's notes on LogisticRegressionCV's defaults
def test_logreg_chooses_its_strength_on_speakers_the_fold_did_not_fit():
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import GroupKFold

    from jaxtl.heads import LOGREG_CS

    x, y, groups = _data()
    folds = inner_folds(y, groups, seed=0)
    assert len(folds) == 3
    for fit, val in folds:  # each fold validates on a speaker its fit never saw
        assert not {groups[i] for i in fit} & {groups[i] for i in val}
    kernel, bias, note = fit_linear_head("logreg", x, y, 4, groups)
    ref = LogisticRegressionCV(Cs=list(LOGREG_CS), cv=GroupKFold(3).split(x, y, groups),
                               scoring="neg_log_loss", max_iter=2000).fit(x, y)
    assert f"C={np.ravel(ref.C_)[0]:.3g}" in note
    np.testing.assert_allclose(x @ kernel + bias, ref.decision_function(x), rtol=1e-3, atol=1e-3)
    assert len(inner_folds(y, None, seed=0)) == 5  # no speakers: stratified folds
    lacking = ["s1" if label == 3 else g for g, label in zip(groups, y)]  # class 3: one speaker's only
    assert len(inner_folds(y, lacking, seed=0)) == 5  # a fold would fit without class 3: stratified instead


def test_two_classes_and_a_class_never_seen():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x, y, _ = _data(n_classes=2)
    kernel, bias, _ = fit_linear_head("lda", x, y * 2, 3)  # classes 0 and 2 trained, class 1 absent
    logits = x @ kernel + bias
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x.astype(np.float64), y)
    np.testing.assert_allclose(logits[:, 2] - logits[:, 0], lda.decision_function(x), rtol=1e-3, atol=1e-3)
    assert (logits[:, 1] <= ABSENT_LOGIT / 2).all() and set(logits.argmax(-1)) <= {0, 2}
    with pytest.raises(DataError, match="at least 2 classes"):
        fit_linear_head("ncm", x, np.zeros(len(x), int), 3)


def test_a_closed_form_head_takes_no_step_and_evaluate_restores_it(cfg):
    import dataclasses

    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from conftest import metrics, quiet
    from jaxtl.evaluate import evaluate
    from jaxtl.pipeline import prepare
    from jaxtl.restore import predict_logits, restore_run
    from jaxtl.train import run

    cfg = dataclasses.replace(cfg, head="lda", hidden=0, epochs=50)
    summary = run(cfg, log=quiet)
    (row,) = metrics(cfg.out)  # fitted once, scored like one epoch
    assert row["step"] == 0 and summary["epochs_run"] == 1
    assert evaluate(cfg.out, progress=False)["accuracy"] == summary["test_accuracy"]
    # the restored model decides as scikit-learn's LDA fitted on the training clips' standardised head inputs
    restored, prep = restore_run(cfg.out), prepare(cfg.data_spec(), log=quiet)
    model, params, norm = restored.model, restored.variables["params"], restored.variables["norm"]["head"]
    taps = np.asarray(model.apply({"params": params}, cfg.image_spec().network_input(cfg.image_spec().batch(
        all_features(prep), np.arange(len(prep.y)))), method=type(model).head_inputs))
    seen = (taps - np.asarray(norm["mean"])) * np.asarray(norm["scale"])
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(seen[prep.train].astype(np.float64),
                                                                           prep.y[prep.train])
    logits = predict_logits(restored, all_features(prep).subset(prep.test))
    np.testing.assert_allclose(logits, lda.decision_function(seen[prep.test]), rtol=1e-3, atol=1e-3)
