"""Train a small MLP with stablelse.torch.CrossEntropyLoss and watch the loss fall.

Synthetic data: 4096 points in 32 dimensions, 10 classes given by a fixed random linear map.
Runs on the CPU, and on the GPU too when torch and stablelse both see one. Each step prints
the stablelse loss beside torch's F.cross_entropy on the same logits.

    python examples/torch_training.py
"""

import time

import torch
import torch.nn.functional as F

import stablelse.torch as st


def train(device: str, steps: int = 60) -> None:
    torch.manual_seed(0)
    n, d, classes = 4096, 32, 10
    x = torch.randn(n, d, device=device)
    labels = (x @ torch.randn(d, classes, device=device)).argmax(dim=1)
    model = torch.nn.Sequential(
        torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, classes)
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = st.CrossEntropyLoss(label_smoothing=0.05)
    print(f"== {device}: {n} samples, {classes} classes, batch 512, Adam lr 1e-2")
    print(f"{'step':>4}  {'stablelse loss':>14}  {'torch loss':>10}  {'batch accuracy':>14}")
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, n, (512,), device=device)
        logits = model(x[idx])
        loss = loss_fn(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            ref = F.cross_entropy(logits.detach(), labels[idx], label_smoothing=0.05)
            acc = (logits.argmax(dim=1) == labels[idx]).float().mean()
            print(f"{step:>4}  {loss.item():>14.6f}  {ref.item():>10.6f}  {acc.item():>14.3f}")
    print(f"{steps} steps in {time.perf_counter() - t0:.2f} s\n")


def main() -> None:
    train("cpu")
    try:
        import stablelse.cuda as scuda

        gpu = torch.cuda.is_available() and scuda.is_available()
    except ImportError:
        gpu = False
    if gpu:
        train("cuda")
    else:
        print("no CUDA device seen by both torch and stablelse: GPU run skipped")


if __name__ == "__main__":
    main()
