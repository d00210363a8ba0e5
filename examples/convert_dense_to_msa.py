"""Convert a dense transformers model to MiniMax Sparse Attention (MSA): the recipe.

    python examples/convert_dense_to_msa.py                 # tiny Llama, CPU, < 1 minute
    python examples/convert_dense_to_msa.py --model NAME    # a Llama/Qwen checkpoint by name

Recipe (docs/spec.md sections 6-7; openmsa.integrations.transformers):

0. Start from a dense GQA model. Here, without ``--model``, a tiny Llama is first trained
   for 150 steps (seconds on a CPU) on a copy task (each sequence is a random segment written twice),
   so that it has induction heads that look far back: predicting the second copy needs
   the key block where the segment first occurred, which is what MSA's selection must find.
1. ``convert_to_msa(model, first_dense_layers=..., block_size=B, topk=K)``: adds the index
   projections (qi_proj: hidden -> Hkv*Di, ki_proj: hidden -> Di) to the chosen layers and
   routes their attention through openmsa, in ``mode="dense"``: outputs are unchanged.
2. Warmup (dense phase): dense attention in both branches, the KL between the group-mean
   attention and the index distribution taken over all visible tokens; only the index
   projections learn (the backbone is frozen, loss = KL). The index branch reads a detached
   copy of the layer input (stop-gradient), so the KL could not reach anything else anyway;
   freezing only saves the backbone's gradient memory.
3. Sparse phase: ``set_msa_mode(model, "sparse")``: the Index Branch picks the Top-k blocks
   and the Main Branch attends to them only; train everything with
   ``loss = lm_loss + lam * collect_kl_losses(model)``. Because of the stop-gradient, the LM
   loss trains the backbone through the sparse attention and the (now sparse) KL trains the
   index projections alone.
4. Generate: ``model.generate`` works as before; the index keys are cached next to k, v.

The script prints the LM loss (on the copied half, where it is learnable) and the summed
KL of the MSA layers at every step, the sparse-mode loss before and after the warmup, and a
greedy continuation. With the defaults (CPU, openmsa's exact PyTorch reference backend,
~15-20 s on 1 thread) the story is: dense-mode loss equal to the original model's; sparse mode before the
warmup much worse (the untrained index branch picks the wrong blocks); after 30 warmup
steps sparse mode matches dense; the sparse phase keeps it there; generation with the MSA
cache continues the copy.
"""

from __future__ import annotations

import argparse
import time

import torch

from openmsa.integrations.transformers import (collect_kl_losses, convert_to_msa,
                                               index_parameters, set_msa_mode)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="transformers model name/path (default: tiny Llama)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segment", type=int, default=48, help="copy-task segment length (sequence = 2x)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=64, help="token range of the synthetic data")
    p.add_argument("--pretrain-steps", type=int, default=150, help="dense steps (tiny model only)")
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--sparse-steps", type=int, default=20)
    p.add_argument("--first-dense-layers", type=int, default=1)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--index-lr", type=float, default=1e-2, help="lr of the warmup")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="lr of the sparse phase (all parameters: a fresh Adam's first steps "
                        "would move a warmed-up index branch too far at the warmup lr)")
    p.add_argument("--kl-weight", type=float, default=0.1, help="lambda of lm_loss + lambda * KL")
    p.add_argument("--index-init", default="auto", choices=["auto", "copy", "random"])
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (the default model is tiny: more threads only add overhead, "
                        "and OpenMP spin-waiting on a busy machine can make it many times slower)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    return p.parse_args(argv)


def tiny_llama(vocab: int, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=vocab,
                      max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device)


def copy_batch(args, gen, device):
    """Random segments written twice; labels only on the second copy (the first is noise)."""
    seg = torch.randint(0, args.vocab, (args.batch, args.segment), generator=gen)
    ids = torch.cat([seg, seg], dim=1).to(device)
    labels = ids.clone()
    labels[:, : args.segment + 1] = -100  # the first token of the copy is not predictable
    return ids, labels


def lm_and_kl(model, ids, labels):
    out = model(input_ids=ids, labels=labels, use_cache=False)
    return out.loss, collect_kl_losses(model)


@torch.no_grad()
def evaluate(model, batch, mode):
    set_msa_mode(model, mode, compute_kl=True)
    loss, kl = lm_and_kl(model, *batch)
    set_msa_mode(model, mode, compute_kl=None)
    return loss.item(), kl.item()


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)
    t0 = time.time()

    if args.model is None:
        model = tiny_llama(args.vocab, device)
        print(f"phase 0: dense pretraining of a tiny Llama on the copy task ({args.pretrain_steps} steps)")
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(args.pretrain_steps):
            ids, labels = copy_batch(args, gen, device)
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 20 == 0 or step == args.pretrain_steps - 1:
                print(f"  dense step {step:3d}  lm {loss.item():.4f}")
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32,
                                                     attn_implementation="sdpa").to(device)
        args.vocab = min(args.vocab, model.config.vocab_size)
    model.config.attention_dropout = 0.0
    for layer_attn in (m for m in model.modules() if hasattr(m, "attention_dropout")):
        layer_attn.attention_dropout = 0.0  # openmsa has no attention dropout

    held_out = copy_batch(args, torch.Generator().manual_seed(args.seed + 1), device)
    with torch.no_grad():
        dense_ref = model(input_ids=held_out[0], labels=held_out[1], use_cache=False).loss.item()

    # 1. Conversion: dense mode reproduces the dense model.
    convert_to_msa(model, first_dense_layers=args.first_dense_layers, block_size=args.block_size,
                   topk=args.topk, mode="dense", index_init=args.index_init, backend=args.backend)
    lm, kl = evaluate(model, held_out, "dense")
    print(f"converted: held-out lm {lm:.4f} in dense mode (original {dense_ref:.4f}), dense KL {kl:.4f}")
    lm_sparse0, kl_sparse0 = evaluate(model, held_out, "sparse")
    print(f"           sparse mode before warmup: lm {lm_sparse0:.4f}, sparse KL {kl_sparse0:.4f}")

    # 2. Warmup: dense attention, dense KL, only the index projections learn.
    set_msa_mode(model, "dense")
    for p in model.parameters():
        p.requires_grad_(False)
    index = index_parameters(model)
    for p in index:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(index, lr=args.index_lr, weight_decay=0.0)
    print(f"phase 2: warmup ({args.warmup_steps} steps, dense, loss = KL, index params only)")
    for step in range(args.warmup_steps):
        lm, kl = lm_and_kl(model, *copy_batch(args, gen, device))
        opt.zero_grad(set_to_none=True)
        kl.backward()
        opt.step()
        print(f"  warmup step {step:3d}  lm {lm.item():.4f}  kl {kl.item():.4f}")
    lm_sparse1, kl_sparse1 = evaluate(model, held_out, "sparse")
    print(f"after warmup: sparse-mode held-out lm {lm_sparse1:.4f} (before warmup {lm_sparse0:.4f}), "
          f"sparse KL {kl_sparse1:.4f} (before {kl_sparse0:.4f})")

    # 3. Sparse phase: everything trains; lm -> backbone, KL -> index projections.
    set_msa_mode(model, "sparse")
    for p in model.parameters():
        p.requires_grad_(True)
    index_ids = {id(p) for p in index}
    backbone = [p for p in model.parameters() if id(p) not in index_ids]
    opt = torch.optim.AdamW([{"params": backbone, "lr": args.lr},
                             {"params": index, "lr": args.lr, "weight_decay": 0.0}])
    print(f"phase 3: sparse training ({args.sparse_steps} steps, loss = lm + {args.kl_weight} * KL)")
    for step in range(args.sparse_steps):
        lm, kl = lm_and_kl(model, *copy_batch(args, gen, device))
        loss = lm + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"  sparse step {step:3d}  lm {lm.item():.4f}  kl {kl.item():.4f}")
    lm_sparse2, kl_sparse2 = evaluate(model, held_out, "sparse")
    print(f"after sparse phase: held-out lm {lm_sparse2:.4f}, sparse KL {kl_sparse2:.4f}")

    # 4. Generation with the MSA cache: continue the second copy greedily.
    model.eval()
    ids = held_out[0][:1]
    n_prompt, n_new = args.segment + 8, min(16, args.segment - 8)
    prompt = ids[:, :n_prompt]
    # An explicit all-ones mask: without it transformers would infer padding wherever the
    # prompt holds the pad token id, and MSA layers refuse padding.
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=n_new, pad_token_id=0)
    acc = (out[0, n_prompt:] == ids[0, n_prompt:n_prompt + n_new]).float().mean().item()
    print(f"generate: {n_new} greedy tokens after a {n_prompt}-token prompt, {acc:.0%} match the copy")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
