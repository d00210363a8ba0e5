"""Train a small MSA language model with context parallelism (openmsa.distributed).

    torchrun --nproc-per-node 2 examples/cp_train.py            # CPU: gloo
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 8 examples/cp_train.py         # GPUs: NCCL

Every rank holds its zigzag shard of one packed batch (chunks r and 2W-1-r of each
sequence); the MSA layers all-gather K, V and the index keys and attend with their local
queries, so the ranks together compute exactly the single-process model. The parameter
gradients are partial sums over each rank's tokens and are all-reduced before the step.
At the first step rank 0 also runs the whole batch alone and prints both losses.
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import openmsa
from openmsa.distributed import shard


class TinyLM(nn.Module):
    def __init__(self, vocab=256, hidden=128, layers=2, process_group=None, backend="auto"):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.attn = nn.ModuleList(
            openmsa.MSAttention(hidden, num_heads=4, num_kv_heads=2, index_head_dim=64,
                                block_size=64, topk=2, qk_norm=True, backend=backend,
                                process_group=process_group)
            for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.RMSNorm(hidden), nn.Linear(hidden, 4 * hidden),
                                               nn.GELU(), nn.Linear(4 * hidden, hidden))
                                 for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids, cu_seqlens):
        h = self.embed(ids)
        for attn, mlp in zip(self.attn, self.mlp):
            h = h + attn(h, cu_seqlens)
            h = h + mlp(h)
        return self.head(h)


def batch(device):
    """One packed batch of three sequences of uneven lengths, the same on every rank (the
    same batch at every step: the loss falls as the model learns it)."""
    gen = torch.Generator().manual_seed(0)
    lens = [300, 37, 180]
    ids = torch.randint(0, 256, (sum(lens),), generator=gen)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    # next-token labels inside each sequence, -100 at each sequence's last token
    labels = torch.roll(ids, -1)
    labels[cu[1:].long() - 1] = -100
    return ids.to(device), labels.to(device), cu.to(device)


def loss_of(model, ids, labels, cu, num_labels, kl_weight=0.1):
    """This rank's part of the loss: its tokens' cross-entropy over all labelled tokens of
    the batch, plus its part of the KL (the parts over the ranks sum to the whole loss)."""
    logits = model(ids, cu)
    lm = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum") / num_labels
    return lm + kl_weight * openmsa.collect_kl_losses(model)


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = TinyLM(process_group=dist.group.WORLD).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(5):
        ids, labels, cu = batch(device)
        num_labels = int((labels != -100).sum())
        if step == 0 and rank == 0:  # the same model on the whole batch, one process
            single = TinyLM(process_group=None).to(device)
            single.load_state_dict(model.state_dict())
            with torch.no_grad():
                alone = loss_of(single, ids, labels, cu, num_labels).item()
        loss = loss_of(model, shard(ids, cu, world, rank), shard(labels, cu, world, rank), cu,
                       num_labels)
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():  # partial sums over the ranks' tokens
            dist.all_reduce(p.grad)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            extra = f"   (one process: {alone:.6f})" if step == 0 else ""
            print(f"step {step}: loss {total.item():.6f} over {world} ranks{extra}", flush=True)
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
