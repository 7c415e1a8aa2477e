"""Compute reference losses and gradients with real torch; writes tests/data/torch_refs.json.

    python tests/data/make_torch_refs.py            # needs numpy and torch (CPU is enough)

Self-contained on purpose (numpy + torch only, no stablelse): the inputs are generated from a
fixed numpy seed and saved next to torch's outputs, so tests/test_losses.py::test_torch_refs
replays exactly what torch saw. Cases cover every option of torch.nn.functional.cross_entropy
(weight, ignore_index, label_smoothing, probability targets, the three reductions, the
(N, C, d1, d2) layout, unbatched input, float32 and float64) and nll_loss. ``grad`` is the
gradient of ``loss.sum()`` with respect to the logits (torch.autograd), in stablelse's layout.
"""

from __future__ import annotations

import itertools
import json
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

OUT = pathlib.Path(__file__).with_name("torch_refs.json")


def _case(rng, name, fn, shape, dtype, probs, kwargs, our_axis, torch_perm=None):
    x = rng.normal(scale=3.0, size=shape)
    if name.startswith("overflow"):
        x = np.array([[2.0, 1.0, 0.1], [1000.0, 1.0, -1000.0], [3.0, 2.0, 1.0]])
    ax = our_axis % len(shape)
    n_classes = shape[ax]
    bshape = shape[:ax] + shape[ax + 1 :]
    if probs:
        q = rng.random(shape)
        t = q / q.sum(axis=ax, keepdims=True)
    else:
        t = rng.integers(0, n_classes, size=bshape)
        if name.startswith("overflow"):
            t = np.array([0, 2, 1])
        if kwargs.get("ignore_index") is not None and t.size > 2:
            t.flat[2] = kwargs["ignore_index"]
    weight = kwargs.pop("weight", None)
    if weight is True:
        weight = rng.uniform(0.2, 2.0, size=n_classes)
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    # torch wants classes at dim 1 (dim 0 unbatched): move our axis there.
    x_t = np.moveaxis(x, ax, 1) if len(shape) > 1 else x
    tx = torch.tensor(x_t, dtype=tdtype, requires_grad=True)
    if probs:
        tt = torch.tensor(np.moveaxis(t, ax, 1) if len(shape) > 1 else t, dtype=tdtype)
    else:
        tt = torch.tensor(t, dtype=torch.int64)
    tw = None if weight is None else torch.tensor(weight, dtype=tdtype)
    tkw = {k: v for k, v in kwargs.items() if v is not None}
    if fn == "cross_entropy":
        loss = F.cross_entropy(tx, tt, weight=tw, **tkw)
    else:
        loss = F.nll_loss(torch.log_softmax(tx, dim=1 if len(shape) > 1 else 0), tt, weight=tw,
                          **tkw)
    loss.sum().backward()
    loss = loss.detach().to(torch.float64)
    grad = tx.grad.detach().numpy()
    grad = np.moveaxis(grad, 1, ax) if len(shape) > 1 else grad
    xs = x.astype(np.float32).astype(np.float64) if dtype == "float32" else x
    if fn == "nll_loss":
        # stablelse's nll_loss gets log_softmax(x) computed in float64 from the same inputs.
        m = xs.max(axis=ax, keepdims=True)
        xs = xs - (m + np.log(np.exp(xs - m).sum(axis=ax, keepdims=True)))
        grad = None
    our_kwargs = dict(tkw, axis=our_axis, weight=None if weight is None else weight.tolist())
    return {
        "name": name,
        "fn": fn,
        "dtype": dtype,
        "shape": list(shape),
        "logits": xs.ravel().tolist(),
        "target": np.asarray(t).ravel().tolist(),
        "target_shape": list(np.shape(t)),
        "probs": probs,
        "kwargs": our_kwargs,
        "loss": loss.numpy().ravel().tolist() if loss.dim() else float(loss),
        "grad": None if grad is None else grad.ravel().tolist(),
        "torch": torch.__version__,
    }


def main() -> None:
    rng = np.random.default_rng(20261125)
    cases = []
    layouts = [("2d", (6, 5), -1), ("unbatched", (7,), -1), ("nchw", (2, 4, 3, 2), 1),
               ("last3d", (2, 3, 5), -1)]
    for (lname, shape, axis), dtype, probs, weight, ls, reduction in itertools.product(
        layouts, ["float64", "float32"], [False, True], [False, True], [0.0, 0.15],
        ["mean", "sum", "none"],
    ):
        kwargs = {"reduction": reduction, "label_smoothing": ls, "weight": True if weight else None}
        if not probs and len(shape) > 1:
            kwargs["ignore_index"] = -100 if weight else 0
        name = f"ce-{lname}-{dtype}-{'prob' if probs else 'idx'}-w{int(weight)}-ls{ls}-{reduction}"
        cases.append(_case(rng, name, "cross_entropy", shape, dtype, probs, kwargs, axis))
    for lname, shape, axis in layouts:
        for reduction in ["mean", "sum", "none"]:
            kwargs = {"reduction": reduction, "weight": True, "ignore_index": 1}
            cases.append(_case(rng, f"nll-{lname}-{reduction}", "nll_loss", shape, "float64",
                               False, kwargs, axis))
    cases.append(_case(rng, "overflow-float32", "cross_entropy", (3, 3), "float32", False,
                       {"reduction": "mean"}, -1))
    OUT.write_text(json.dumps({"torch": torch.__version__, "cases": cases}, indent=None))
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
