"""Train the bundled default model: a BPE tokenizer and a 1-layer ReLU-MLP transformer on the KJV.

    python -m saekit.scripts.experiments.train_default_model              # train, write activations/default_model/
    python -m saekit.scripts.experiments.train_default_model --evaluate   # held-out loss vs unigram entropy

Deterministic: fixed seeds, a fixed number of steps, deterministic torch algorithms, 2 threads.
Training samples windows at random offsets of the train split's token stream (BOS-separated
chapters), each prefixed with BOS, so that every position of the context sees every kind of
text; evaluation uses the fixed layout of `tokenize_contexts` on the test split.

Held-out loss: the mean next-token cross-entropy (nats) over every position of the test
split's contexts (the model's own `return_type="loss"`; this includes predicting the first
token from BOS alone and predicting the BOS that separates chapters). Unigram entropy: the
cross-entropy on the same test targets of the train split's unigram distribution with add-one
smoothing, i.e. the loss of the best model that ignores context.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from saekit.activations.corpus import load_texts, tokenize_contexts
from saekit.activations.models import BOS, default_tokenizer
from saekit.sae.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_json

OUT_DIR = Path(__file__).resolve().parents[2] / "activations" / "default_model"
VOCAB = 4096
SEED = 0

# HookedTransformerConfig arguments, stored as config.json. The architecture of Anthropic's
# 2023 toy model: one layer, d_model 128, d_mlp 512, ReLU MLP.
MODEL_CFG = dict(
    n_layers=1,
    d_model=128,
    d_head=32,
    n_heads=4,
    d_mlp=512,
    d_vocab=VOCAB,
    n_ctx=256,
    act_fn="relu",
    normalization_type="LN",
    positional_embedding_type="standard",
    default_prepend_bos=True,
    model_name="default",
    seed=SEED,
)
TRAIN = dict(
    steps=700, batch=32, context=256, lr=3e-3, warmup=50, weight_decay=0.1, min_lr_frac=0.05
)


class Evaluation(NamedTuple):
    heldout_loss: float  # nats/token on the test split
    unigram_entropy: float  # nats/token: train unigram (add-one) cross-entropy on the same targets
    gap: float  # unigram_entropy - heldout_loss
    n_tokens: int  # test targets evaluated


def train_tokenizer(texts: list[str]):
    """Byte-level BPE (GPT-2 style pretokenisation, so decoding is exact), vocab 4096, BOS id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def lr_at(step: int) -> float:
    if step < TRAIN["warmup"]:
        return TRAIN["lr"] * (step + 1) / TRAIN["warmup"]
    t = (step - TRAIN["warmup"]) / max(1, TRAIN["steps"] - TRAIN["warmup"])
    lo = TRAIN["min_lr_frac"]
    return TRAIN["lr"] * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model, max_tokens: int | None = None, batch: int = 64) -> Evaluation:
    """Held-out loss of `model` on the test split and the unigram entropy, as the module doc says."""
    ctx = MODEL_CFG["n_ctx"]
    test = tokenize_contexts(load_texts("default", "test"), model.tokenizer, ctx, max_tokens)
    train = tokenize_contexts(load_texts("default", "train"), model.tokenizer, ctx)
    counts = torch.bincount(train[:, 1:].flatten(), minlength=model.cfg.d_vocab).double() + 1
    log_p = counts.log() - counts.sum().log()
    targets = test[:, 1:].flatten()
    unigram = -log_p[targets].mean().item()
    total = 0.0
    for i in range(0, len(test), batch):
        rows = test[i : i + batch].to(model.cfg.device)
        total += model(rows, return_type="loss").item() * rows.shape[0]
    loss = total / len(test)
    return Evaluation(loss, unigram, unigram - loss, targets.numel())


def train(out_dir: Path = OUT_DIR) -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()

    train_texts = load_texts("default", "train")
    tok = train_tokenizer(train_texts["text"])
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(str(Path(tmp) / "tokenizer.json"))
        tok_json = (Path(tmp) / "tokenizer.json").read_bytes()
        tokenizer = default_tokenizer(Path(tmp))

    # One stream: BOS-separated chapters; windows are cut at random offsets below.
    ctx = TRAIN["context"]
    rows = tokenize_contexts(train_texts, tokenizer, ctx)
    stream = rows[:, 1:].flatten()
    n_train_tokens = stream.numel()
    print(
        f"tokenizer trained ({time.time() - t0:.1f}s); train stream {n_train_tokens} tokens",
        file=sys.stderr,
    )

    cfg = HookedTransformerConfig(**MODEL_CFG, device="cpu")
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": TRAIN["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=TRAIN["lr"],
        betas=(0.9, 0.98),
    )
    gen = torch.Generator().manual_seed(SEED)
    offsets = torch.arange(ctx - 1)
    bos = torch.full((TRAIN["batch"], 1), tokenizer.bos_token_id, dtype=torch.int64)
    bar = tqdm(range(TRAIN["steps"]), desc="training", file=sys.stderr, mininterval=5)
    for step in bar:
        starts = torch.randint(0, n_train_tokens - ctx, (TRAIN["batch"],), generator=gen)
        batch = torch.cat([bos, stream[starts[:, None] + offsets]], dim=1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(batch, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == TRAIN["steps"] - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0

    model.eval()
    ev = evaluate(model)
    metrics = {
        **ev._asdict(),
        "tokens_trained": TRAIN["steps"] * TRAIN["batch"] * (ctx - 1),
        "train_stream_tokens": n_train_tokens,
        "train_wall_s": round(train_s, 1),
        "train": TRAIN,
        "torch": torch.__version__,
        "heldout_loss_def": "mean next-token CE (nats) over all positions of the test split's BOS-prefixed 256-token contexts",
        "unigram_entropy_def": "CE (nats) on the same test targets of the train split's add-one-smoothed unigram distribution",
    }
    # Parameters only: the attention mask buffers are rebuilt by HookedTransformer(cfg).
    weights = {k: v.detach().contiguous() for k, v in model.named_parameters()}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "tokenizer.json", tok_json)
    atomic_write_json(out_dir / "config.json", MODEL_CFG)
    atomic_save_safetensors(out_dir / "model.safetensors", weights, metadata={"format": "pt"})
    atomic_write_json(out_dir / "metrics.json", metrics)
    print(
        f"trained in {train_s:.0f}s: held-out loss {ev.heldout_loss:.3f}, unigram entropy "
        f"{ev.unigram_entropy:.3f}, gap {ev.gap:.3f} nats/token; wrote {out_dir}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--evaluate", action="store_true", help="measure the committed model instead of training"
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=OUT_DIR,
        help="where to write the model (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.evaluate:
        from saekit.activations.models import load_model

        torch.set_num_threads(2)
        ev = evaluate(load_model("default"))
        print(
            f"held-out loss {ev.heldout_loss:.3f} nats/token, unigram entropy {ev.unigram_entropy:.3f} "
            f"nats/token, gap {ev.gap:.3f} (bar: 1.5) over {ev.n_tokens} test tokens"
        )
    else:
        train(args.out_dir)


if __name__ == "__main__":
    main()
