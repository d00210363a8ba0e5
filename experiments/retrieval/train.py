"""Train one variant of the retrieval experiment (one run = one config = one output dir).

    python -m experiments.retrieval.train --variant dense --out out/retrieval/dense
    python -m experiments.retrieval.train --variant msa_converted --init out/retrieval/dense \
        --out out/retrieval/msa_converted

Variants (README.md has the full story):
  dense          dense GQA from scratch.
  window         sliding-window GQA (window = topk * block_size tokens) from scratch.
  msa_native     MSA from scratch: the first --warmup-steps in MSA "dense" mode (full
                 attention, KL over all visible tokens), then sparse; every step trains
                 loss = answer CE + kl_weight * KL (the KL reaches only the index projections,
                 the CE everything else: docs/spec.md sections 6-7).
  msa_converted  the trained dense checkpoint (--init) loaded into an MSA model (same q/k/v/o
                 and MLP weights, index projections added), then --warmup-steps of index
                 warmup (dense mode, backbone frozen, loss = KL, only the index learns), then
                 --steps of sparse fine-tuning with CE + kl_weight * KL.

Loss: the answers' CE, plus (--haystack chain --lm-weight W) W times the next-token CE of the
filler's in-context Markov chain (task.py), plus for MSA kl_weight times the KL.

Training data is drawn on the training device from a seeded generator; the length follows
an optional curriculum (--curriculum: shorter lengths first, each for an equal share of
--curriculum-steps, held longer with --curriculum-gate until learned), at a constant token
budget per step (batch = tokens_per_step // length).

Writes to --out: config.json (everything needed to rebuild the model), log.json (the loss
curve: train CE / KL / answer accuracy every --log-every steps, validation accuracy every
--val-every steps; rewritten at every log step so that a killed run leaves its curve), and
model.pt (the final weights). Host syncs: only at log / validation steps (the metrics are
accumulated on the device in between). MSA "dense" mode runs on the Triton kernels on a GPU
(up to 64 blocks all three stages; beyond, torch SDPA and the dense KL through the KL kernels
64 blocks at a time); on a CPU on openmsa's PyTorch reference (--ref-chunk-mb: its chunk size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.retrieval.evaluation import answer_accuracy, filler_ce, indexer_recall
from experiments.retrieval.model import (Decoder, ModelConfig, convert_dense_to_msa, count_parameters,
                                         index_parameters, kl_loss, msa_layers, set_msa_mode)
from experiments.retrieval.task import HAYSTACKS, TaskConfig, eval_set, make_batch

VARIANTS = ("dense", "window", "msa_native", "msa_converted")
ATTN_OF = {"dense": "dense", "window": "window", "msa_native": "msa", "msa_converted": "msa"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", required=True, choices=VARIANTS)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--init", default=None, help="msa_converted: the dense run directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    g = p.add_argument_group("task")
    g.add_argument("--num-keys", type=int, default=128)
    g.add_argument("--num-values", type=int, default=64)
    g.add_argument("--num-noise", type=int, default=64)
    g.add_argument("--num-pairs", type=int, default=16)
    g.add_argument("--num-queries", type=int, default=16)
    g.add_argument("--haystack", default="noise", choices=HAYSTACKS,
                   help="filler: i.i.d. noise, or an in-context Markov chain (task.py)")
    g.add_argument("--chain-prob", type=float, default=0.8,
                   help="--haystack chain: probability of the chain step (else a jump)")
    g.add_argument("--chain-occurrences", type=float, default=0.0,
                   help="--haystack chain: walk over a random subset of about haystack length / "
                        "this many noise tokens per sequence, so that a token recurs about this "
                        "often at any length (0: all --num-noise tokens)")
    g.add_argument("--lm-weight", type=float, default=0.0,
                   help="--haystack chain: loss = answer CE + this * the filler's next-token CE "
                        "(0: answers only)")
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--mlp-hidden", type=int, default=512)
    g.add_argument("--rotary-dim", type=int, default=32)
    g.add_argument("--rope-theta", type=float, default=10000.0)
    g.add_argument("--block-size", type=int, default=64)
    g.add_argument("--topk", type=int, default=8)
    g.add_argument("--index-head-dim", type=int, default=64)
    g.add_argument("--window", type=int, default=None, help="window tokens (default topk * block_size)")
    g.add_argument("--msa-dense-layers", type=int, default=0)
    g.add_argument("--no-token-shift", action="store_true",
                   help="drop the token shift before attention (model.py says why it is there)")
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=int, default=1500,
                   help="optimizer steps (msa_native: warmup included; msa_converted: the "
                        "sparse fine-tuning after the index warmup)")
    g.add_argument("--train-len", type=int, default=4096)
    g.add_argument("--curriculum", default="",
                   help="comma-separated shorter lengths trained first, e.g. 512,1024,2048")
    g.add_argument("--curriculum-steps", type=int, default=0,
                   help="steps spent on the curriculum lengths (equal shares)")
    g.add_argument("--curriculum-gate", type=float, default=0.0,
                   help="hold a curriculum length <= topk * block_size (at most 3 shares) until the "
                        "training accuracy of the last log window reaches this (0: no gate)")
    g.add_argument("--tokens-per-step", type=int, default=65536)
    g.add_argument("--lr", type=float, default=1.5e-3)
    g.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decays to lr * this")
    g.add_argument("--lr-warmup", type=int, default=100, help="linear LR warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g = p.add_argument_group("MSA")
    g.add_argument("--warmup-steps", type=int, default=100,
                   help="MSA dense-mode steps (native: at the start, everything trains; "
                        "converted: index only, before --steps)")
    g.add_argument("--warmup-len", type=int, default=None,
                   help="length of the dense-mode warmup steps (default: converted --train-len, "
                        "native the curriculum's; the reference loops over sequences, so short "
                        "ones at a constant token budget cost many small GPU ops)")
    g.add_argument("--warmup-wide-steps", type=int, default=0,
                   help="msa_converted: index-warmup steps after the dense ones, in sparse mode at "
                        "--train-len with K = --warmup-wide-topk (backbone frozen, loss = KL)")
    g.add_argument("--warmup-wide-topk", type=int, default=64,
                   help="K of those steps; 0: dense mode instead (the KL over every visible "
                        "token, docs/spec.md section 6's warmup; on a GPU through the KL kernels, "
                        "64 blocks at a time)")
    g.add_argument("--warmup-wide-tokens", type=int, default=None,
                   help="tokens per step of those steps (default --tokens-per-step)")
    g.add_argument("--warmup-time-limit", type=float, default=0,
                   help="msa_converted: end the index warmup (not the run) after this many "
                        "seconds (0: no limit)")
    g.add_argument("--index-lr", type=float, default=1e-3, help="msa_converted: index warmup LR")
    g.add_argument("--kl-weight", type=float, default=0.1, help="lambda in CE + lambda * KL")
    g.add_argument("--index-init", default="copy", choices=["copy", "random"],
                   help="msa_converted: index projections from the group-mean q/k ones, or random")
    g = p.add_argument_group("logging")
    g.add_argument("--log-every", type=int, default=25)
    g.add_argument("--val-every", type=int, default=250)
    g.add_argument("--val-seqs", type=int, default=32)
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast (auto: on CUDA)")
    g.add_argument("--ref-chunk-mb", type=int, default=0,
                   help="OPENMSA_REF_CHUNK_BYTES in MiB for openmsa's reference (dense mode); "
                        "0: 8192 on CUDA (fewer, larger chunks: the reference is launch-bound "
                        "there), the library default on CPU")
    g.add_argument("--recall-every", type=int, default=0,
                   help="MSA runs: the indexer's recall (evaluation.py's metric) every N steps of "
                        "each phase, at the first --recall-contexts length, and at the end of the "
                        "converted index warmup at every --recall-contexts length (0: never)")
    g.add_argument("--recall-contexts", type=int, nargs="+", default=[4096, 8192, 16384])
    g.add_argument("--recall-seqs", type=int, default=1, help="sequences per recall measurement")
    g.add_argument("--time-limit", type=float, default=0,
                   help="stop (and save) after this many seconds of training (0: none)")
    g.add_argument("--no-save", action="store_true", help="do not write model.pt")
    return p.parse_args(argv)


def task_config(a) -> TaskConfig:
    return TaskConfig(num_keys=a.num_keys, num_values=a.num_values, num_noise=a.num_noise,
                      num_pairs=a.num_pairs, num_queries=a.num_queries, haystack=a.haystack,
                      chain_prob=a.chain_prob, chain_occurrences=a.chain_occurrences)


def model_config(a, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden=a.hidden, layers=a.layers, heads=a.heads,
                       kv_heads=a.kv_heads, head_dim=a.head_dim, mlp_hidden=a.mlp_hidden,
                       rotary_dim=a.rotary_dim, rope_theta=a.rope_theta, attn=ATTN_OF[a.variant],
                       block_size=a.block_size, topk=a.topk, index_head_dim=a.index_head_dim,
                       window=a.window, msa_dense_layers=a.msa_dense_layers,
                       token_shift=not a.no_token_shift)


class Curriculum:
    """The lengths of --curriculum, each for at least an equal share of --curriculum-steps,
    then --train-len. With --curriculum-gate ACC a length of at most K * B tokens (where
    every variant, the window and MSA included, sees the whole context) is held (for at
    most 3 shares) until the training accuracy of the last log window reaches ACC: escaping MQAR's early
    plateau is stochastic (the same seed escaped in one H100 run and not in the next, GPU
    reductions being non-deterministic), and a model that has not learned the task at a
    short length rarely learns it at 16K."""

    def __init__(self, a):
        self.lengths = [int(x) for x in a.curriculum.split(",") if x.strip()]
        self.share = max(1, a.curriculum_steps // len(self.lengths)) if self.lengths else 0
        self.gate, self.train_len = a.curriculum_gate, a.train_len
        self.gate_len = a.topk * a.block_size  # K * B: every variant sees all of the context
        self.i = self.n = 0
        self.acc = None

    def length(self) -> int:
        return self.lengths[self.i] if self.i < len(self.lengths) else self.train_len

    def step_done(self, acc=None) -> None:
        """After each step; ``acc`` = the training accuracy of a log window that just closed."""
        if self.i >= len(self.lengths):
            return
        self.n += 1
        if acc is not None:
            self.acc = acc
        passed = (not self.gate or self.lengths[self.i] > self.gate_len
                  or (self.acc is not None and self.acc >= self.gate))
        if self.n >= self.share and (passed or self.n >= 3 * self.share):
            self.i, self.n, self.acc = self.i + 1, 0, None


def lr_at(step: int, total: int, base: float, warmup: int, min_frac: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(params, lr, weight_decay):
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=params[0].is_cuda)


def _answer_ce(logits, batch):
    """CE and #correct of answer logits [B, Q, V] against the batch's answers."""
    logits = logits.float()
    target = batch["labels"].gather(1, batch["answer_pos"])
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    return loss, (logits.argmax(-1) == target).sum(), target.numel()


def answer_loss(model, batch):
    """CE over the answer tokens only (the task's supervised positions) and #correct."""
    return _answer_ce(model(batch["tokens"], positions=batch["answer_pos"]), batch)


def task_loss(model, batch, lm_weight: float = 0.0):
    """(loss to minimise, answer CE, #correct answers, #answers, LM stats or None).

    With ``lm_weight`` > 0 and a "chain" haystack the filler's next-token CE is added
    (weighted); LM stats = (filler CE, #correct filler predictions, #filler targets)."""
    if lm_weight <= 0 or "lm_labels" not in batch:
        loss, correct, count = answer_loss(model, batch)
        return loss, loss, correct, count, None
    logits = model(batch["tokens"])  # [B, L, V]: every position is scored
    ans = batch["answer_pos"]
    loss, correct, count = _answer_ce(logits.gather(1, ans[..., None].expand(-1, -1, logits.shape[-1])),
                                      batch)
    lm = filler_ce(logits, batch["lm_labels"])
    return loss + lm_weight * lm[0], loss, correct, count, lm


class Logger:
    """Accumulates step metrics on the device; syncs (and rewrites log.json) every
    --log-every steps only."""

    def __init__(self, out: Path, meta: dict, log_every: int):
        self.out, self.meta, self.log_every = out, meta, log_every
        self.train, self.val, self.recall, self.t0 = [], [], [], time.time()
        self.t_flush = self.t0
        self._reset()

    def _reset(self):
        self.sum_loss = self.sum_kl = self.correct = self.lm = None
        self.count = self.steps = self.tokens = 0

    def add(self, loss, kl, correct, count, tokens, lm=None):
        z = lambda t: t.detach().float() if t is not None else None  # noqa: E731
        if lm is not None:  # (filler CE, #correct, #targets): summed on the device
            lm = torch.stack([z(x) for x in lm])
            self.lm = lm if self.lm is None else self.lm + lm
        self.sum_loss = z(loss) if self.sum_loss is None else self.sum_loss + z(loss)
        if kl is not None:
            self.sum_kl = z(kl) if self.sum_kl is None else self.sum_kl + z(kl)
        self.correct = z(correct) if self.correct is None else self.correct + z(correct)
        self.count += count
        self.steps += 1
        self.tokens += tokens

    def maybe_flush(self, step, phase, length, lr, force=False):
        if self.steps == 0 or not (force or (step + 1) % self.log_every == 0):
            return
        now = time.time()
        rec = dict(step=step + 1, phase=phase, length=length, lr=lr,
                   loss=self.sum_loss.item() / self.steps,
                   kl=None if self.sum_kl is None else self.sum_kl.item() / self.steps,
                   acc=self.correct.item() / max(1, self.count),
                   **self._lm_record(),
                   tokens_per_s=self.tokens / max(1e-9, now - self.t_flush),
                   time=now - self.t0)
        self.train.append(rec)
        kl = "" if rec["kl"] is None else f" kl {rec['kl']:.4f}"
        lm = "" if "lm_loss" not in rec else f" lm {rec['lm_loss']:.3f}/{rec['lm_acc']:.3f}"
        print(f"[{phase}] step {rec['step']:5d} len {length:5d} loss {rec['loss']:.4f}{kl} "
              f"acc {rec['acc']:.3f}{lm} lr {lr:.2e} {rec['tokens_per_s'] / 1e3:.0f}k tok/s "
              f"t {rec['time']:.0f}s", flush=True)
        self._reset()
        self.write()
        self.t_flush = time.time()  # the JSON write is not training time
        return rec

    def _lm_record(self) -> dict:
        if self.lm is None:
            return {}
        lm_loss, lm_correct, lm_count = self.lm.tolist()
        return dict(lm_loss=lm_loss / self.steps, lm_acc=lm_correct / max(1.0, lm_count))

    def add_val(self, step, phase, acc, loss):
        self.val.append(dict(step=step, phase=phase, acc=acc, loss=loss, time=time.time() - self.t0))
        print(f"[{phase}] step {step:5d} val acc {acc:.3f} loss {loss:.4f}", flush=True)
        self.write()
        self.t_flush = time.time()  # validation is not training time either

    def add_recall(self, step, phase, length, per_layer):
        mean = {key: sum(lay[key] for lay in per_layer) / len(per_layer)
                for key in ("block_recall", "mass_recall")}
        self.recall.append(dict(step=step, phase=phase, length=length, **mean,
                                mass_recall_per_layer=[lay["mass_recall"] for lay in per_layer],
                                time=time.time() - self.t0))
        print(f"[{phase}] step {step:5d} recall @{length}: mass {mean['mass_recall']:.3f} block "
              f"{mean['block_recall']:.3f} per layer "
              + " ".join(f"{lay['mass_recall']:.3f}" for lay in per_layer), flush=True)
        self.write()
        self.t_flush = time.time()

    def write(self, **extra):
        self.meta.update(extra)
        data = dict(self.meta, train=self.train, val=self.val, recall=self.recall)
        tmp = self.out / "log.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.out / "log.json")


@torch.no_grad()
def kernel_check(model, device, amp, length=1024, tol=5e-2):
    """On CUDA: one MSA layer's sparse forward with the Triton kernels against openmsa's
    PyTorch reference on a random input (outputs and KL), before training relies on them.
    The tolerance is loose on purpose: bf16 rounding, and the rare near-tie block that the
    two indexers rank differently, move a few rows; a broken kernel moves everything."""
    layer = msa_layers(model)[0]
    mode, backend = layer.mode, layer.backend
    x = torch.randn(2, length, layer.hidden_size, device=device, generator=torch.Generator(device=device).manual_seed(0))
    res = {}
    try:
        layer.mode = "sparse"
        for be in ("triton", "reference"):
            layer.backend = be
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                res[be] = (layer(x).float(), layer.kl_loss.float())
    finally:
        layer.mode, layer.backend = mode, backend
    err = ((res["triton"][0] - res["reference"][0]).norm() / res["reference"][0].norm()).item()
    kl_t, kl_r = res["triton"][1].item(), res["reference"][1].item()
    print(f"kernel check (Triton vs reference, {length} tokens): output rel. error {err:.2e}, "
          f"KL {kl_t:.5f} vs {kl_r:.5f}", flush=True)
    if not err <= tol or not abs(kl_t - kl_r) <= tol * abs(kl_r) + 1e-5:
        raise SystemExit("kernel check failed: the Triton MSA ops disagree with the reference")
    return dict(output_rel_error=err, kl_triton=kl_t, kl_reference=kl_r)


def main(argv=None):
    a = parse_args(argv)
    if a.variant == "msa_converted" and not a.init:
        raise SystemExit("--variant msa_converted needs --init <dense run dir>")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the reference's float32 products
        torch.backends.cudnn.allow_tf32 = True
        os.environ["OPENMSA_REF_CHUNK_BYTES"] = str((a.ref_chunk_mb or 8192) << 20)
    elif a.ref_chunk_mb:
        os.environ["OPENMSA_REF_CHUNK_BYTES"] = str(a.ref_chunk_mb << 20)
    amp = torch.bfloat16 if a.amp == "bf16" or (a.amp == "auto" and device.type == "cuda") else None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)

    tcfg = task_config(a)
    mcfg = model_config(a, tcfg.vocab_size)
    if a.variant == "msa_converted":
        init = json.loads((Path(a.init) / "config.json").read_text())
        if init["task"] != tcfg.to_dict():
            raise SystemExit(f"--init task config {init['task']} differs from this run's")
        dense_cfg = ModelConfig(**init["model"])
        # the architecture is the dense run's; only the MSA settings come from this run
        mcfg = replace(dense_cfg, attn="msa", block_size=a.block_size, topk=a.topk,
                       index_head_dim=a.index_head_dim, msa_dense_layers=a.msa_dense_layers)
        dense = Decoder(dense_cfg)
        dense.load_state_dict(torch.load(Path(a.init) / "model.pt", map_location="cpu"))
        model = convert_dense_to_msa(dense, mcfg, index_init=a.index_init)
        del dense
    else:
        model = Decoder(mcfg)
        model.reset_parameters(seed=a.seed)
    model.to(device)
    meta = dict(variant=a.variant, args=vars(a), task=tcfg.to_dict(), model=mcfg.to_dict(),
                parameters=count_parameters(model), device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__)
    (out / "config.json").write_text(json.dumps(dict(task=tcfg.to_dict(), model=mcfg.to_dict(),
                                                     variant=a.variant), indent=1))
    log = Logger(out, meta, a.log_every)
    print(f"{a.variant}: {count_parameters(model) / 1e6:.2f}M parameters, vocab {tcfg.vocab_size}, "
          f"device {meta['device_name']}, amp {amp}", flush=True)

    if device.type == "cuda" and mcfg.attn == "msa":
        meta["kernel_check"] = kernel_check(model, device, amp)

    gen = torch.Generator(device=device).manual_seed(a.seed * 7919 + 1)
    val_gen_seed = 10_000 + a.seed  # validation sequences: fixed, disjoint seed stream
    val_data = make_batch(tcfg, a.val_seqs, a.train_len, torch.Generator().manual_seed(val_gen_seed))
    val_batch = max(1, a.tokens_per_step // a.train_len)

    def autocast():
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    def validate(step, phase):
        model.eval()
        with autocast():
            acc, loss = answer_accuracy(model, val_data, val_batch, device)
        model.train()
        log.add_val(step, phase, acc, loss)

    recall_sets = {}

    def track_recall(step, phase, contexts):
        """The indexer's recall in sparse mode (what serving selects) on fixed sequences."""
        if not a.recall_every or mcfg.attn != "msa":
            return
        modes = [m.mode for m in msa_layers(model)]
        set_msa_mode(model, "sparse")
        model.eval()
        for length in contexts:
            if length not in recall_sets:  # evaluation.py's evaluation sequences (its seed)
                recall_sets[length] = eval_set(tcfg, length, a.recall_seqs, 1234)
            per_layer = indexer_recall(model, recall_sets[length], device, autocast)
            log.add_recall(step, phase, length, per_layer)
        for m, mode in zip(msa_layers(model), modes):
            m.mode = mode
        model.train()

    def batch_for(length, tokens=None):
        return make_batch(tcfg, max(1, (tokens or a.tokens_per_step) // length), length, gen)

    t_start = time.time()

    def out_of_time():
        return a.time_limit > 0 and time.time() - t_start > a.time_limit

    stopped_early = False
    step_base = 0
    # --- msa_converted: index warmup (dense mode, backbone frozen, loss = KL) ------------
    if a.variant == "msa_converted" and a.warmup_steps + a.warmup_wide_steps > 0:
        set_msa_mode(model, "sparse")
        validate(0, "converted_before_warmup")  # the converted model with an untrained index
        track_recall(0, "index_warmup", a.recall_contexts[:1])
        set_msa_mode(model, "dense")
        idx_params = set(index_parameters(model))
        for p in model.parameters():
            p.requires_grad_(p in idx_params)
        opt = make_optimizer(list(idx_params), a.index_lr, 0.0)
        wlen = a.warmup_len or a.train_len
        wsteps = a.warmup_steps + a.warmup_wide_steps
        for step in range(wsteps):
            # stage 1: dense mode at wlen (KL over every visible token); stage 2 (optional):
            # at the training length, either sparse mode with a wide K (the KL over the K
            # blocks the index ranks first; the Triton kernels' K stops at 64 blocks) or
            # (--warmup-wide-topk 0) dense mode, the KL over every visible token (the KL
            # kernels 64 blocks at a time): slower, but with no blind spot beyond the K blocks
            wide = step >= a.warmup_steps
            wide_sparse = wide and a.warmup_wide_topk > 0
            length = a.train_len if wide else wlen
            set_msa_mode(model, "sparse" if wide_sparse else "dense")
            for m in msa_layers(model):
                m.topk = a.warmup_wide_topk if wide_sparse else mcfg.topk
            lr = lr_at(step, wsteps, a.index_lr, min(a.lr_warmup, wsteps // 4), a.min_lr_frac)
            for grp in opt.param_groups:
                grp["lr"] = lr
            batch = batch_for(length, a.warmup_wide_tokens if wide else None)
            with autocast():
                loss, correct, count = answer_loss(model, batch)
            kl = kl_loss(model)
            kl.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            log.add(loss, kl, correct, count, batch["tokens"].numel())
            log.maybe_flush(step, "index_warmup_wide" if wide else "index_warmup", length, lr,
                            force=step in (a.warmup_steps - 1, wsteps - 1))
            if out_of_time():
                stopped_early = True
                break
            if a.warmup_time_limit > 0 and time.time() - t_start > a.warmup_time_limit:
                print(f"index warmup ended by --warmup-time-limit after {step + 1} steps", flush=True)
                log.meta["warmup_cut_after_steps"] = step + 1
                break
            if a.recall_every and (step + 1) % a.recall_every == 0 and step + 1 < wsteps:
                for m in msa_layers(model):
                    m.topk = mcfg.topk
                track_recall(step + 1, "index_warmup", a.recall_contexts[:1])
        for m in msa_layers(model):
            m.topk = mcfg.topk
        track_recall(step + 1, "index_warmup", a.recall_contexts)  # "after warmup"
        for p in model.parameters():
            p.requires_grad_(True)
        set_msa_mode(model, "sparse")
        step_base = wsteps
        validate(step_base, "index_warmup")

    # --- main training ----------------------------------------------------------------
    opt = make_optimizer(model.parameters(), a.lr, a.weight_decay)
    is_msa = mcfg.attn == "msa"
    native_warmup = a.warmup_steps if a.variant == "msa_native" else 0
    phase = "train"
    curriculum = Curriculum(a)
    for step in range(a.steps if not stopped_early else 0):
        if is_msa:
            phase = "dense_warmup" if step < native_warmup else "sparse"
            set_msa_mode(model, "dense" if step < native_warmup else "sparse")
        length = a.warmup_len if step < native_warmup and a.warmup_len else curriculum.length()
        lr = lr_at(step, a.steps, a.lr, a.lr_warmup, a.min_lr_frac)
        for grp in opt.param_groups:
            grp["lr"] = lr
        batch = batch_for(length)
        with autocast():
            objective, loss, correct, count, lm = task_loss(model, batch, a.lm_weight)
        kl = kl_loss(model) if is_msa else None
        total = objective if kl is None else objective + a.kl_weight * kl
        total.backward()
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.add(loss, kl, correct, count, batch["tokens"].numel(), lm)
        last = step == a.steps - 1 or out_of_time()
        # flush at the dense -> sparse switch too, so that each record has one phase
        rec = log.maybe_flush(step_base + step, phase, length, lr,
                              force=last or step == native_warmup - 1)
        curriculum.step_done(rec["acc"] if rec else None)
        if a.val_every and ((step + 1) % a.val_every == 0 or last):
            if is_msa:
                set_msa_mode(model, "sparse")  # validate what MSA serves: sparse attention
            validate(step_base + step + 1, phase)
        if a.recall_every and is_msa and ((step + 1) % a.recall_every == 0 or last):
            track_recall(step_base + step + 1, phase, a.recall_contexts[:1])
        if last and step != a.steps - 1:
            stopped_early = True
            print(f"time limit reached after {step + 1} steps", flush=True)
            break

    if is_msa:
        set_msa_mode(model, "sparse")
    if not a.no_save:
        torch.save(model.state_dict(), out / "model.pt")
    log.write(train_seconds=time.time() - t_start, stopped_early=stopped_early)
    print(f"done in {time.time() - t_start:.0f}s -> {out}", flush=True)


if __name__ == "__main__":
    main()
