"""Train the tiny Qwen2-VL shipped as ``llmc/assets/tiny_qwen2vl_mme`` (CPU, from scratch, seeded).

A random tiny VLM answers the synthetic MME benchmark (:mod:`llmc.data.mme_synth`) at chance, so
quantization cannot be seen to hurt it. This script trains a real ``Qwen2VLForConditionalGeneration``
(about 1.3M parameters) on the *train* split of the generator until it answers well above chance, then
evaluates it on the *test* split with greedy generation parsed like lmms-eval's MME task.

Recipe (see ``docs/tiny_vlm.md``, which also gives the exact commands and the results):

* images 56x56 (the generator default); the vision tower uses 7x7 patches and a 2x2 merge, so an
  image is an 8x8 patch grid and 16 ``<|image_pad|>`` tokens (each covers a 14x14 pixel area);
* data (``tools/tiny_vlm_data.py``): the generator's yes/no pairs (generator and lmms-eval wording),
  open-ended auxiliary questions read off the same scene descriptors, one-object warm-up scenes;
* stage 0: vision tower + merger alone on a dense training-only linear probe of the merged tokens;
* stage 1: the whole model on the chat template (user: image + question; assistant: answer), loss on
  the answer tokens and ``<|im_end|>`` only, averaged per example, plus the probe loss; a curriculum
  of example pools (warm-up -> auxiliary -> MME); AdamW, linear warmup + cosine decay, fp32 weights
  with bf16 autocast on CPU;
* yes/no questions need the training-only :class:`AnswerProbe` (``--cmp-aux``): without it the yes/no
  accuracy stays at chance (the shipped model was continued from a probe-less run with it, ``--init-from``);
* ``--outlier-scale``: LLM-like weight-outlier columns planted by an exact re-parametrisation
  (:mod:`llmc.testing.outliers`), so that quantization hurts the model the way it hurts an LLM;
* the checkpoint is saved in bfloat16 together with its processor, reloaded and evaluated on the
  test split (greedy generation, lmms-eval's ``parse_pred_ans``, acc + acc+ per category).

The shipped checkpoint is two runs (stage 0+1, then stage 2 ``--init-from`` it):
``tools/make_tiny_vlm.sh OUT`` runs both.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo (llmc)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_vlm_data

from eval_tiny_vlm import evaluate
from tiny_vlm_data import (
    MERGE,
    OBJ_CLASSES,
    PATCH,
    TEMPORAL,
    TEXT_CHARS,
    collate,
    make_train_set,
)

from llmc.data import mme_synth as ms
from llmc.testing import tiny_models as tm
from llmc.testing import tiny_tokenizers as tt

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


# ------------------------------------------------------------------------------------------ model
def build_model(seed: int, hidden: int, layers: int, vision_dim: int, depth: int) -> tuple[Any, Any]:
    """A seeded, randomly initialised Qwen2-VL and its processor (tokenizer from tiny_tokenizers)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = tt.qwen_tokenizer(vision=True)
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    pkw = {"size": size, "patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": TEMPORAL}
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pkw), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(**pkw), chat_template=tok.chat_template)
    heads = hidden // 32
    half = hidden // heads // 2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    ids = tm._special_ids(tok)
    text = {"vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": 3 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": 512, "tie_word_embeddings": True, "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}}
    vision = {"depth": depth, "embed_dim": vision_dim, "hidden_size": hidden, "mlp_ratio": 2,
              "num_heads": vision_dim // 32, "patch_size": PATCH, "spatial_merge_size": MERGE,
              "temporal_patch_size": TEMPORAL}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                           **tm._qwen_vl_ids(tok))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = tm._generation_config(tok)
    return model, processor


# ------------------------------------------------------------------------------------------- data
class VisionProbe(torch.nn.Module):
    """Training-only linear heads on the merged image tokens (not saved with the model)."""

    def __init__(self, dim: int, n_tokens: int) -> None:
        super().__init__()
        self.n_tokens = n_tokens
        self.cell = torch.nn.Linear(dim, 1 + len(OBJ_CLASSES))
        self.text = torch.nn.Linear(dim, 3 * (1 + len(TEXT_CHARS)))

    def loss(self, feats: torch.Tensor, cells: torch.Tensor, chars: torch.Tensor) -> torch.Tensor:
        feats = feats.float().view(-1, self.n_tokens, feats.shape[-1])
        ce = torch.nn.functional.cross_entropy
        out = ce(self.cell(feats).flatten(0, 1), cells.flatten(), ignore_index=-100) if (cells >= 0).any() else 0.0
        if (chars >= 0).any():
            logits = self.text(feats.mean(1)).view(-1, 3, 1 + len(TEXT_CHARS))
            out = out + ce(logits.flatten(0, 1), chars.flatten(), ignore_index=-100)
        return out


class AnswerProbe(torch.nn.Module):
    """Training-only heads on an intermediate hidden state at the answer position of yes/no questions.

    They predict the question's attribute token and the image's true one (the Yes question's), so both are
    in the residual stream and the last layer only has to compare them. Without them yes/no accuracy stays
    at 0.5: the answer is an XOR of image and question, neither alone carries signal. Not saved.
    """

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.q = torch.nn.Linear(dim, vocab)
        self.y = torch.nn.Linear(dim, vocab)

    def loss(self, h: torch.Tensor, q_tok: torch.Tensor, y_tok: torch.Tensor) -> torch.Tensor:
        if not (q_tok >= 0).any():
            return h.sum() * 0.0
        ce = torch.nn.functional.cross_entropy
        h = h.float()
        return ce(self.q(h), q_tok, ignore_index=-100) + ce(self.y(h), y_tok, ignore_index=-100)


# --------------------------------------------------------------------------------------- training
def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged per example (so a one-token "Yes" weighs as much as a long answer)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = (labels != -100).float()
    return ((ce * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain_vision(model: Any, probe: VisionProbe, data: dict[str, Any], args: argparse.Namespace,
                    log: list[dict]) -> None:
    """Stage 0: the vision tower + merger alone, trained on the dense probe loss (no language model)."""
    rng = random.Random(args.seed + 1)
    params = list(model.model.visual.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.wd)
    t0, acc = time.time(), []
    for step in range(args.vision_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vision_steps, args.lr, args.warmup)
        idx = [rng.randrange(len(data["pixels"])) for _ in range(2 * args.bs)]
        pixels = torch.cat([data["pixels"][i] for i in idx]).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.model.visual(pixels, grid_thw=torch.cat([data["grids"][i] for i in idx]))
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        loss = probe.loss(feats, torch.stack([data["cells"][i] for i in idx]),
                          torch.stack([data["chars"][i] for i in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        acc.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.vision_steps:
            entry = {"vision_step": step + 1, "vision_aux_loss": round(sum(acc) / len(acc), 4),
                     "minutes": round((time.time() - t0) / 60, 2)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            acc = []


def sample_batch(rng: random.Random, data: dict[str, Any], args: argparse.Namespace,
                 frac: float) -> tuple[list[Any], float]:
    """The curriculum: draw ``args.bs`` examples from the pools at training progress ``frac`` in [0, 1]."""
    p_warm = max(0.0, 1.0 - frac / args.warm_frac) if args.warm_frac > 0 else 0.0
    p_aux = args.aux_start + (args.aux_end - args.aux_start) * frac
    p_yn = args.yn_warm * max(0.0, 1.0 - frac / args.yn_frac)
    batch = [rng.choice(data["warm_yn"] if args.yn_warm > 0 and rng.random() < p_yn else
                        data["warm"] if rng.random() < p_warm else
                        data["aux"] if rng.random() < p_aux else data["mme"]) for _ in range(args.bs)]
    return batch, p_aux


def train(model: Any, processor: Any, data: dict[str, Any], args: argparse.Namespace, log: list[dict],
          val: Path | None = None) -> None:
    """AdamW on a mixture of MME and auxiliary examples; logs loss every ``--log-every`` steps."""
    rng = random.Random(args.seed)
    probe = VisionProbe(model.config.text_config.hidden_size, data["cells"][0].numel())
    pretrain_vision(model, probe, data, args, log)
    feats: list[torch.Tensor] = []
    hook = model.model.visual.merger.register_forward_hook(lambda m, i, o: feats.append(o))
    cmp = AnswerProbe(model.config.text_config.hidden_size, model.config.text_config.vocab_size)
    params = list(model.named_parameters()) + list(probe.named_parameters()) + list(cmp.named_parameters())
    decay = [p for n, p in params if p.ndim >= 2]
    other = [p for n, p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    model.train()
    t0, acc, vacc, hits = time.time(), [], [], {}
    for step in range(args.steps):
        batch, p_aux = sample_batch(rng, data, args, step / max(1, args.steps - 1))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        inputs = collate(data, batch)
        cells, chars = inputs.pop("cells"), inputs.pop("chars")
        q_tok, y_tok = inputs.pop("q_tok"), inputs.pop("y_tok")
        feats.clear()
        labels = inputs.pop("labels")
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls: ~4x faster on CPU
            out = model(**inputs, output_hidden_states=args.cmp_aux > 0)
        lm_loss = answer_loss(out.logits, labels)
        vis_loss = probe.loss(feats[0], cells, chars)
        first = (labels != -100).float().argmax(1)  # first answer token of each row
        rows = torch.arange(len(batch))
        loss = lm_loss + args.vis_aux * vis_loss
        if args.cmp_aux > 0:
            loss = loss + args.cmp_aux * cmp.loss(out.hidden_states[args.cmp_layer][rows, first - 1], q_tok, y_tok)
        hit = out.logits[rows, first - 1].argmax(-1) == labels[rows, first]
        for b, h in zip(batch, hit.tolist()):
            kind = b[3] if b[3] in ("warm", "warm_yn", "aux") else "mme"
            hits.setdefault(kind, []).append(h)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        acc.append(lm_loss.item())
        vacc.append(float(vis_loss.detach()))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            entry = {"step": step + 1, "loss": round(sum(acc) / len(acc), 4),
                     "vision_aux_loss": round(sum(vacc) / len(vacc), 4), "p_aux": round(p_aux, 3),
                     "minutes": round((time.time() - t0) / 60, 2),
                     "first_token_acc": {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            acc, vacc, hits = [], [], {}
        if val is not None and args.eval_every and (step + 1) % args.eval_every == 0:
            scores, _ = evaluate(model, processor, val)
            log[-1]["val"] = {k: round(v, 1) for k, v in scores.items()}
            print("val (calib split)", json.dumps(log[-1]["val"]), flush=True)
            model.train()
        if args.minutes and time.time() - t0 > 60 * args.minutes:
            print(f"time budget of {args.minutes} min reached at step {step + 1}", flush=True)
            break
    hook.remove()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder (replaced if --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--minutes", type=float, default=0.0, help="also stop after this many minutes (0: no limit)")
    p.add_argument("--n-train-images", type=int, default=9000)
    p.add_argument("--n-test-images", type=int, default=300, help="test images (round-robin over categories)")
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--vision-steps", type=int, default=400, help="stage 0: vision tower + probe only")
    p.add_argument("--vis-aux", type=float, default=1.0, help="weight of the dense vision probe loss")
    p.add_argument("--warm-frac", type=float, default=0.1, help="one-object warm-up share decays to 0 here")
    p.add_argument("--yn-warm", type=float, default=0.0, help="initial share of one-object yes/no pairs")
    p.add_argument("--yn-frac", type=float, default=0.5, help="the yes/no warm-up share decays to 0 here")
    p.add_argument("--cmp-aux", type=float, default=1.0, help="weight of the yes/no answer-position probe loss")
    p.add_argument("--cmp-layer", type=int, default=2, help="hidden_states index of that probe (0 = embeddings)")
    p.add_argument("--init-from", type=Path, default=None, help="start from this checkpoint (stage 2)")
    p.add_argument("--outlier-scale", type=float, default=0.0,
                   help="plant LLM-like weight-outlier columns scaled by this (0: none; see llmc.testing.outliers)")
    p.add_argument("--outlier-channels", type=int, default=4, help="outlier columns per layer group")
    p.add_argument("--aux-start", type=float, default=0.6)
    p.add_argument("--aux-end", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--vision-dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=1000, help="greedy MME eval on 120 calib-split images")
    return p.parse_args(argv)


def plant_outliers(ckpt: Path, args: argparse.Namespace) -> dict[str, list[int]]:
    """Rewrite the bf16 checkpoint ``ckpt`` with ``--outlier-channels`` columns per layer group scaled by
    ``--outlier-scale`` (a power of two keeps the bf16 weights exact); nothing when the scale is 0."""
    if not args.outlier_scale:
        return {}
    from llmc.models import load_adapter
    from llmc.testing.outliers import plant_outlier_columns

    adapter = load_adapter("qwen2_vl", str(ckpt), dtype="bfloat16")
    planted = plant_outlier_columns(adapter, args.outlier_scale, args.outlier_channels, seed=args.seed)
    adapter.model.save_pretrained(ckpt)
    print(f"planted {args.outlier_channels} outlier columns x{args.outlier_scale:g} in {len(planted)} layer groups",
          flush=True)
    return planted


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"{args.out} exists; pass --overwrite")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, processor = build_model(args.seed, args.hidden, args.layers, args.vision_dim, args.depth)
    if args.init_from is not None:  # continue from a saved checkpoint (weights upcast to float32)
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(args.init_from, dtype=torch.float32)
    data = make_train_set(processor, args.n_train_images, args.seed, args.size)
    print(f"data: {len(data['mme'])} MME + {len(data['aux'])} aux examples in {time.time() - t0:.0f}s", flush=True)
    log: list[dict] = []
    val = None
    if args.eval_every:
        val = ms.generate(Path(tempfile.mkdtemp(prefix=".tiny_vlm_val-")) / "val", "calib", 120, seed=0,
                          size=args.size)
    train(model, processor, data, args, log, val)
    train_min = (time.time() - t0) / 60
    tmp = Path(tempfile.mkdtemp(prefix=".tiny_vlm-"))
    try:
        model.to(torch.bfloat16).save_pretrained(tmp / "ckpt")
        processor.save_pretrained(tmp / "ckpt")
        planted = plant_outliers(tmp / "ckpt", args)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        reloaded = AutoModelForImageTextToText.from_pretrained(tmp / "ckpt", dtype=torch.float32)
        bench = ms.generate(tmp / "test", "test", args.n_test_images, seed=0, size=args.size)
        proc = AutoProcessor.from_pretrained(tmp / "ckpt")
        scores, _ = evaluate(reloaded, proc, bench, lmms_prompt=True)
        raw, _ = evaluate(reloaded, proc, bench, lmms_prompt=False)
        summary = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "n_parameters": sum(p.numel() for p in model.parameters()),
                   "train_wall_minutes": round(train_min, 2), "machine": f"CPU, torch threads={args.threads}",
                   "test_split": {"split": "test", "n_images": args.n_test_images, "seed": 0, "size": args.size},
                   "mme_test_scores": {k: round(v, 2) for k, v in scores.items()},
                   "mme_test_mean": round(sum(scores.values()) / len(scores), 2),
                   "mme_test_scores_generator_prompt": {k: round(v, 2) for k, v in raw.items()},
                   "mme_test_mean_generator_prompt": round(sum(raw.values()) / len(raw), 2), "loss_log": log,
                   "outlier_columns": planted}
        previous = args.init_from / "training_summary.json" if args.init_from else None
        if previous is not None and previous.is_file():
            summary["previous_stage"] = json.loads(previous.read_text())
        (tmp / "ckpt" / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp / "ckpt"), args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"scores": summary["mme_test_scores"], "mean": summary["mme_test_mean"],
                      "scores_generator_prompt": summary["mme_test_scores_generator_prompt"],
                      "train_minutes": summary["train_wall_minutes"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
