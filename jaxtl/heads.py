"""Closed-form heads for tiny datasets, fitted by scikit-learn on the frozen base's head inputs.

Each is a linear map of the (standardised) head input, so it lands in the model's own `Dense(classes)`
(`hidden=0`) and checkpoints, evaluate and predict treat it like a trained head:

- `logreg`: multinomial logistic regression, its L2 strength chosen by inner cross-validation (log loss)
  over the training clips (folds by speaker when the training clips hold 3 or more, else stratified);
- `lda`: linear discriminant analysis with Ledoit-Wolf shrinkage of the shared covariance;
- `ncm`: nearest class mean, as logits `x . mu_c - |mu_c|^2 / 2` (the negative half squared distance up
  to a term equal for every class).
"""

from __future__ import annotations

import warnings

import numpy as np

from jaxtl.data import DataError

HEADS = ("dense", "logreg", "lda", "ncm")
# Inverse L2 strengths logreg's inner cross-validation chooses from.
LOGREG_CS = tuple(np.logspace(-4, 2, 7))
# Logit of a class the training clips never showed: never predicted.
ABSENT_LOGIT = -1e4


def inner_folds(y: np.ndarray, groups: list[str] | None, seed: int):
    """Cross-validation folds over the training clips: by group (speaker) when there are 3 or more and every
    fold's fit holds every class, so the choice is made on speakers the fit did not hear; else stratified."""
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    if groups is not None and len(set(groups)) >= 3:
        folds = list(GroupKFold(min(5, len(set(groups)))).split(y, y, groups))
        if all(set(y[fit]) == set(y) for fit, _ in folds):  # a speaker may lack a class: then stratified
            return folds
    per_class = np.bincount(y)[np.bincount(y) > 0].min()
    return list(StratifiedKFold(int(min(5, max(2, per_class))), shuffle=True, random_state=seed).split(y, y))


def fit_linear_head(kind: str, x: np.ndarray, y: np.ndarray, n_classes: int, groups: list[str] | None = None,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(kernel (D, n_classes), bias (n_classes,), what was chosen) of a `kind` head fitted on inputs `x`."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.neighbors import NearestCentroid

    present = np.unique(y)
    if len(present) < 2:
        raise DataError(f"--head {kind} needs training clips of at least 2 classes, the training split has "
                        f"{len(present)}")
    x = np.asarray(x, np.float64)
    note = ""
    with warnings.catch_warnings():  # lbfgs' convergence notes on tiny, separable data
        warnings.simplefilter("ignore")
        if kind == "logreg":
            folds = inner_folds(y, groups, seed) if np.bincount(y)[present].min() >= 2 else None
            if folds is None:
                fitted = LogisticRegression(C=1.0, max_iter=2000).fit(x, y)
                note = "C=1 (too few clips per class for inner cross-validation)"
            else:
                fitted = LogisticRegressionCV(Cs=list(LOGREG_CS), cv=folds, scoring="neg_log_loss",
                                              max_iter=2000).fit(x, y)
                note = f"C={float(np.ravel(fitted.C_)[0]):.3g} by {len(folds)}-fold inner cross-validation"
            coef, intercept = fitted.coef_, fitted.intercept_
        elif kind == "lda":
            fitted = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x, y)
            coef, intercept = fitted.coef_, fitted.intercept_
            note = "Ledoit-Wolf shrinkage"
        elif kind == "ncm":
            means = NearestCentroid().fit(x, y).centroids_
            coef, intercept = means, -0.5 * (means ** 2).sum(1)
        else:
            raise ValueError(f"unknown head {kind!r}: use one of {HEADS[1:]}")
    if coef.shape[0] == 1 and len(present) == 2:  # scikit-learn's binary form: one score for the second class
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    kernel = np.zeros((x.shape[1], n_classes), np.float32)
    bias = np.full(n_classes, ABSENT_LOGIT, np.float32)
    kernel[:, present], bias[present] = coef.T, intercept
    return kernel, bias, note


def with_fitted_head(params: dict, norm: dict, head_inputs: np.ndarray, y: np.ndarray, n_classes: int, kind: str,
                     groups: list[str] | None = None, seed: int = 0) -> tuple[dict, str]:
    """(`params` with a `kind` head fitted on the training clips' head inputs, what was chosen); the inputs are
    standardised as the model will (`norm`), so the fitted map is the model's own `Dense(classes)`."""
    import jax.numpy as jnp

    x = np.asarray(head_inputs, np.float32)
    if norm:
        x = (x - np.asarray(norm["head"]["mean"])) * np.asarray(norm["head"]["scale"])
    kernel, bias, note = fit_linear_head(kind, x, y, n_classes, groups, seed)
    return {**params, "head": {"logits": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}}, note
