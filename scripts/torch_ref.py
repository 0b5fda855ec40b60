#!/usr/bin/env python3
"""PyTorch reference of mnist-lab's models, for side-by-side checks of speed and
accuracy on the same machine (one right after the other).

The same models (LeNet5: 61,706 parameters, CustomMLP: 61,450, `lenet5_reg`:
LeNet5 with BatchNorm before every hidden tanh and weight decay 5e-4), the same
tensor names as mnist-lab's checkpoints, the same input (28x28 zero-padded to
32x32, normalised with mean 0.1307 and std 0.3081) and the same step
(cross-entropy on logits, SGD lr 0.01 momentum 0.9).

    python3 scripts/torch_ref.py --model lenet5 --bench-steps 300 --batch-size 64 --threads 2
    python3 scripts/torch_ref.py --model lenet5_reg --epochs 20 --threads 2
    python3 scripts/torch_ref.py --model lenet5 --load-safetensors runs/<run>/model.safetensors
    python3 scripts/torch_ref.py --model lenet5 --bench-steps 300 --device cuda

Needs `torch` and `numpy` (and `safetensors` for --load-safetensors). MNIST
comes from --data-dir, else MNIST_DIR, else data/mnist.
"""
import argparse
import gzip
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN, STD = 0.1307, 0.3081
WARMUP_STEPS = 20
EVAL_BATCH = 1000
EVAL_SECS = 0.5
BATCH_POOL = 100


class LeNet5(nn.Module):
    """conv 1->6 k5, tanh, pool, conv 6->16 k5, tanh, pool, conv 16->120 k5, tanh,
    fc 120->84, tanh, fc 84->10; BatchNorm (bn1..bn4) before each hidden tanh."""

    def __init__(self, batch_norm=False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.conv3 = nn.Conv2d(16, 120, 5)
        self.fc1 = nn.Linear(120, 84)
        self.fc2 = nn.Linear(84, 10)
        norm = (lambda n, kind: kind(n)) if batch_norm else (lambda n, kind: nn.Identity())
        self.bn1 = norm(6, nn.BatchNorm2d)
        self.bn2 = norm(16, nn.BatchNorm2d)
        self.bn3 = norm(120, nn.BatchNorm2d)
        self.bn4 = norm(84, nn.BatchNorm1d)

    def forward(self, x):
        x = F.max_pool2d(torch.tanh(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(torch.tanh(self.bn2(self.conv2(x))), 2)
        x = torch.tanh(self.bn3(self.conv3(x))).flatten(1)
        x = torch.tanh(self.bn4(self.fc1(x)))
        return self.fc2(x)


class CustomMLP(nn.Module):
    """1024->48, five 48->48, 48->10 (fc1..fc7), tanh between."""

    def __init__(self):
        super().__init__()
        widths = [1024] + [48] * 6 + [10]
        for i in range(7):
            setattr(self, f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))

    def forward(self, x):
        x = x.flatten(1)
        for i in range(1, 7):
            x = torch.tanh(getattr(self, f"fc{i}")(x))
        return self.fc7(x)


def build(model):
    if model == "custom_mlp":
        return CustomMLP()
    return LeNet5(batch_norm=model == "lenet5_reg")


def read_idx(directory, stem):
    for name, opener in ((stem + ".gz", gzip.open), (stem, open)):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with opener(path, "rb") as f:
                data = f.read()
            rank = data[3]
            dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
            return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)
    raise SystemExit(f"no {stem}(.gz) in {directory}")


def prepared(images):
    """uint8 (n, 28, 28) -> float (n, 1, 32, 32), zero-padded, normalised."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = F.pad(x, (2, 2, 2, 2))
    return ((x - MEAN) / STD).unsqueeze(1)


def load_mnist(directory):
    train_x = prepared(read_idx(directory, "train-images-idx3-ubyte"))
    train_y = torch.from_numpy(read_idx(directory, "train-labels-idx1-ubyte").astype(np.int64))
    test_x = prepared(read_idx(directory, "t10k-images-idx3-ubyte"))
    test_y = torch.from_numpy(read_idx(directory, "t10k-labels-idx1-ubyte").astype(np.int64))
    return train_x, train_y, test_x, test_y


def optimizer_for(model, name):
    decay = 5e-4 if name == "lenet5_reg" else 0.0
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=decay)


def train_step(model, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(x), EVAL_BATCH):
        logits = model(x[start:start + EVAL_BATCH])
        target = y[start:start + EVAL_BATCH]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    model.train()
    return loss / len(x), correct / len(x)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(args, device, data):
    """mnist-lab bench's protocol: steps on batches already on the device after
    warm-up, then whole passes over the test set for at least half a second."""
    train_x, train_y, test_x, test_y = (t.to(device) for t in data)
    model = build(args.model).to(device)
    optimizer = optimizer_for(model, args.model)
    generator = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(BATCH_POOL):
        index = torch.randint(len(train_x), (args.batch_size,), generator=generator).to(device)
        pool.append((train_x[index], train_y[index]))
    for i in range(WARMUP_STEPS):
        train_step(model, optimizer, *pool[i % BATCH_POOL])
    sync(device)
    start = time.perf_counter()
    for i in range(args.bench_steps):
        train_step(model, optimizer, *pool[i % BATCH_POOL])
    sync(device)
    train_rate = args.bench_steps * args.batch_size / (time.perf_counter() - start)
    evaluate(model, test_x, test_y)
    sync(device)
    passes, start = 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - start < EVAL_SECS:
        evaluate(model, test_x, test_y)
        passes += 1
    sync(device)
    eval_rate = passes * len(test_x) / (time.perf_counter() - start)
    print(f"train_images_per_s={train_rate:.0f}")
    print(f"eval_images_per_s={eval_rate:.0f}")


def train(args, device, data):
    """55,000 training and 5,000 validation images (a seeded split), the test set
    once at the end with the weights of the best validation epoch."""
    train_x, train_y, test_x, test_y = (t.to(device) for t in data)
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed))
    val_index, train_index = order[:5000].to(device), order[5000:].to(device)
    val_x, val_y = train_x[val_index], train_y[val_index]
    train_x, train_y = train_x[train_index], train_y[train_index]
    torch.manual_seed(args.seed)
    model = build(args.model).to(device)
    optimizer = optimizer_for(model, args.model)
    best, best_state = -1.0, None
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        for batch in torch.randperm(len(train_x), device=device).split(args.batch_size):
            train_step(model, optimizer, train_x[batch], train_y[batch])
        val_loss, val_acc = evaluate(model, val_x, val_y)
        if val_acc > best:
            best, best_state = val_acc, {k: v.clone() for k, v in model.state_dict().items()}
        print(f"epoch {epoch}: val_loss {val_loss:.4f} val_acc {100 * val_acc:.2f}% "
              f"({time.perf_counter() - start:.1f} s)")
    model.load_state_dict(best_state)
    test_loss, test_acc = evaluate(model, test_x, test_y)
    print(f"test accuracy {100 * test_acc:.2f}% (loss {test_loss:.4f})")


def load_checkpoint(args, device, data):
    """Evaluates a checkpoint whose tensor names are PyTorch's state_dict names."""
    from safetensors.torch import load_file

    _, _, test_x, test_y = (t.to(device) for t in data)
    model = build(args.model).to(device)
    model.load_state_dict(load_file(args.load_safetensors, device=str(device)))
    test_loss, test_acc = evaluate(model, test_x, test_y)
    print(f"test accuracy {100 * test_acc:.2f}% (loss {test_loss:.4f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["lenet5", "lenet5_reg", "custom_mlp"], default="lenet5")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DIR", "data/mnist"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bench-steps", type=int, help="measure throughput over this many steps")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--load-safetensors", help="evaluate this checkpoint on the test set")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_mnist(args.data_dir)
    if args.load_safetensors:
        load_checkpoint(args, device, data)
    elif args.bench_steps:
        bench(args, device, data)
    else:
        train(args, device, data)


if __name__ == "__main__":
    main()
