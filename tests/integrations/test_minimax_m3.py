"""transformers' MiniMax-M3 with its sparse layers on openmsa (enable_msa_kernels).

Tiny random M3 text models built from the config class (no downloads), CPU, float32, the
reference backend: hidden 64, 4 query heads / 2 KV heads, head_dim = index_head_dim = 16,
index_block_size 16, index_topk_blocks 3, three layers (full, sparse, sparse), a MoE MLP
in the middle layer. Prompts of 100 tokens span 7 blocks, so the Top-3 selection drops
blocks (checked: the sparse logits differ from the dense ones by far more than the
tolerance). The RMSNorm weights are drawn (transformers initialises them to 0, i.e. a
scale of 1) so that a skipped or misplaced norm shows. initializer_range 0.2 gives peaked
attention and well-separated logits, so greedy tokens do not hinge on float rounding.

Tolerance: logits relative error norm <= 1e-5 (openmsa's reference and transformers'
eager/SDPA reduce in different orders; measured ~3e-7).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
m3 = pytest.importorskip("transformers.models.minimax_m3_vl.modeling_minimax_m3_vl")

from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          MiniMaxM3VLConfig, MiniMaxM3VLTextConfig, MiniMaxM3VLForCausalLM,
                          StaticCache)

import openmsa  # noqa: E402
from openmsa.integrations.transformers import (MSAHFAttention, MSAM3Attention,  # noqa: E402
                                               enable_msa_kernels, index_parameters, msa_layers,
                                               set_msa_mode)
from helpers import rel  # noqa: E402

VOCAB, BS, TOPK, TOL = 128, 16, 3, 1e-5
LAYERS = ["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"]


def text_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, dense_intermediate_size=64,
                shared_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                index_n_heads=2, index_head_dim=16, index_block_size=BS, index_topk_blocks=TOPK,
                index_local_blocks=1, layer_types=LAYERS, mlp_layer_types=["dense", "sparse", "dense"],
                max_position_embeddings=512, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    base.update(kw)
    return MiniMaxM3VLTextConfig(**base)


def draw_norms(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
    return model


def make_model(attn="eager", seed=0, **kw):
    cfg = text_config(**kw)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return draw_norms(MiniMaxM3VLForCausalLM(cfg).eval())


def tokens(batch=1, n=100, seed=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def sparse_layers(model):
    return [layer.self_attn for layer in model.model.layers if layer.self_attn.indexer is not None]


def dense_logits(model, ids):
    """transformers' own model with every block kept (Top-K >= blocks): dense attention."""
    dense = copy.deepcopy(model)
    for attn in sparse_layers(dense):
        attn.indexer.topk_blocks = 1000
    with torch.no_grad():
        return dense(ids).logits


# ------------------------------------------------------------------ forward and generate


@pytest.mark.parametrize("index_heads", [2, 1, 4])  # = Hkv, < Hkv, > Hkv
@pytest.mark.parametrize("local_blocks", [1, 2])
def test_logits_match_transformers(index_heads, local_blocks):
    model = make_model(index_n_heads=index_heads, index_local_blocks=local_blocks)
    ids = tokens(2, 100)
    with torch.no_grad():
        want = model(ids).logits
    assert rel(dense_logits(model, ids), want) > 100 * TOL  # the selection matters
    enabled = enable_msa_kernels(copy.deepcopy(model))
    assert [type(layer.self_attn) for layer in enabled.model.layers] == [
        m3.MiniMaxM3VLAttention, MSAM3Attention, MSAM3Attention]  # full attention untouched
    with torch.no_grad():
        got = enabled(ids).logits
    assert rel(got, want) <= TOL


def test_logits_and_generate_match_transformers_on_the_triton_kernels(monkeypatch):
    """The same through the Triton kernels (the interpreter on a CPU) at shapes they take:
    B = 64, Di = 64, 3 blocks, K = 2; 4 index heads over 2 KV heads (k, v repeated to the
    4 openmsa groups); one sparse layer (the interpreter is slow). Decode runs the split
    index scan of the serving decode on the cache's index keys (from 64 cached keys here)."""
    from openmsa.integrations.transformers import minimax_m3
    monkeypatch.setattr(minimax_m3, "DECODE_SCAN_MIN_KEYS", 64)
    model = make_model(index_block_size=64, index_head_dim=64, index_topk_blocks=2, index_n_heads=4,
                       layer_types=["full_attention", "minimax_m3_sparse", "full_attention"])
    ids = tokens(1, 150, seed=7)
    with torch.no_grad():
        want = model(ids).logits
        assert rel(dense_logits(model, ids), want) > 100 * TOL
    want_tokens = model.generate(ids[:, :140], do_sample=False, max_new_tokens=5)
    enable_msa_kernels(model, backend="triton")
    with torch.no_grad():
        got = model(ids).logits
    assert rel(got, want) <= TOL
    scans, real = [], minimax_m3.MSAM3Attention._decode_index

    def spy(self, *args):
        scans.append(args[-1].shape[1])  # the cached keys it scans
        return real(self, *args)
    monkeypatch.setattr(minimax_m3.MSAM3Attention, "_decode_index", spy)
    assert torch.equal(model.generate(ids[:, :140], do_sample=False, max_new_tokens=5), want_tokens)
    assert scans == [141, 142, 143, 144]  # every decode step after the prefill


def test_sdpa_model_and_state_dict_unchanged():
    model = make_model("sdpa", index_local_blocks=2)
    ids = tokens(1, 90, seed=3)
    keys = set(model.state_dict())
    with torch.no_grad():
        want = model(ids).logits
        got = enable_msa_kernels(model)(ids).logits
    assert rel(got, want) <= TOL
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("index_heads,local_blocks", [(2, 1), (1, 2)])
def test_generate_matches_transformers(index_heads, local_blocks):
    model = make_model(index_n_heads=index_heads, index_local_blocks=local_blocks)
    ids = tokens(1, 60, seed=2)  # decode crosses block boundaries (64, 80 = 4 and 5 blocks)
    want = model.generate(ids, do_sample=False, max_new_tokens=24)
    got = enable_msa_kernels(model).generate(ids, do_sample=False, max_new_tokens=24)
    assert torch.equal(got, want)


def test_chunked_prefill_decode_and_crop_equal_one_shot():
    model = enable_msa_kernels(make_model(index_local_blocks=2))
    ids = tokens(2, 100, seed=4)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        parts = [model(ids[:, a:b], cache=cache, use_cache=True).logits
                 for a, b in ((0, 37), (37, 70), (70, 71), (71, 72), (72, 100))]
        assert rel(torch.cat(parts, 1), full) <= TOL
        layer = cache.layers[1]
        assert layer.idx_keys.shape == (2, 1, 100, 16)  # the index keys live in the model's cache
        cache.crop(-20)  # as assisted decoding does: drop rejected draft tokens
        assert layer.idx_keys.shape[-2] == 80
        again = model(ids[:, 80:], cache=cache, use_cache=True).logits
    assert rel(again, full[:, 80:]) <= TOL


def test_vl_model_text_layers():
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = MiniMaxM3VLConfig(text_config=text_config().to_dict(), vision_config=vision,
                            projector_hidden_size=64)
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = draw_norms(m3.MiniMaxM3SparseForConditionalGeneration(cfg).eval())
    ids = tokens(1, 100, seed=5)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        enable_msa_kernels(model)
        got = model(input_ids=ids).logits
    assert len(msa_layers(model)) == 2
    assert rel(got, want) <= TOL


# ------------------------------------------------------------------ indexer training (KL)


def layer_inputs(model, ids):
    """hidden_states and position_embeddings each sparse attention layer received."""
    seen = {}

    def hook(module, args, kwargs):
        seen[module.layer_idx] = (kwargs["hidden_states"].detach(), kwargs["position_embeddings"])
    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
               for layer in model.model.layers if layer.self_attn.layer_idx > 0]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen


def explicit_kl(attn, x, cos_sin, sparse: bool):
    """The spec's KL (section 6), O(S^2) in float64 on transformers' own tensors: the
    teacher is the softmax of the main scores over T averaged over the query heads of each
    index head, the student the softmax of the raw index scores over T; T from transformers'
    own indexer (sparse) or every visible key (dense)."""
    b, s, _ = x.shape
    d, hq = attn.head_dim, attn.config.num_attention_heads
    ix = attn.indexer
    rope = m3.apply_rotary_pos_emb
    cos, sin = cos_sin
    q = attn.q_norm(attn.q_proj(x).view(b, s, -1, d)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(b, s, -1, d)).transpose(1, 2)
    q, k = rope(q, k, cos, sin)
    qi = ix.q_norm(ix.q_proj(x).view(b, s, -1, ix.head_dim)).transpose(1, 2)
    ki = ix.k_norm(ix.k_proj(x).view(b, s, 1, ix.head_dim)).transpose(1, 2)
    qi, ki = rope(qi, ki, cos[..., :ix.head_dim], sin[..., :ix.head_dim])
    hidx = qi.shape[1]
    k = k.repeat_interleave(hq // k.shape[1], 1)
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None, None].expand(b, hidx, s, s)
    if sparse:
        pos = torch.arange(s).expand(b, s)
        with torch.no_grad():
            blocks = ix(x, cos_sin, None, pos)  # transformers' selection [b, Hidx, s, K]
        keep = torch.zeros(b, hidx, s, -(-s // BS) + 1, dtype=torch.bool)
        keep.scatter_(-1, blocks.masked_fill(blocks < 0, keep.shape[-1] - 1), True)
        allowed = allowed & keep[..., :-1].repeat_interleave(BS, -1)[..., :s]
    main = (q.double() @ k.double().transpose(-1, -2)) * attn.scaling
    main = main.masked_fill(~allowed.repeat_interleave(hq // hidx, 1), float("-inf"))
    teacher = main.softmax(-1).view(b, hidx, hq // hidx, s, s).mean(2).detach()
    z = (qi.double() @ ki.double().transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    log_student = z.log_softmax(-1)
    terms = torch.where(teacher > 0, teacher * (teacher.log() - log_student), 0.0)
    return terms.sum(-1).mean()


@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("index_heads", [2, 4, 1])
def test_kl_is_the_spec_kl_and_trains_only_the_indexer(mode, index_heads):
    """Each layer's KL is the spec's KL on transformers' own selection (value for
    index_n_heads >= Hkv; with fewer index heads the mean of the per-KV-group KLs, whose
    gradient is that of the spec's KL against the index head's group-mean teacher)."""
    model = make_model(index_n_heads=index_heads, index_local_blocks=2)
    ids = tokens(1, 100, seed=6)
    ref_model = copy.deepcopy(model)
    if mode == "dense":  # the layers' inputs of the dense model
        for attn in sparse_layers(ref_model):
            attn.indexer.topk_blocks = 1000
    seen = layer_inputs(ref_model, ids)
    enable_msa_kernels(model, mode=mode)
    out = model(ids, labels=ids)
    kl = openmsa.collect_kl_losses(model)
    params = dict(model.named_parameters())
    index_names = {n for n in params if ".indexer." in n}
    assert {id(p) for p in index_parameters(model)} == {id(params[n]) for n in index_names}
    out.loss.backward(retain_graph=True)  # the LM loss reaches no indexer parameter
    assert all(params[n].grad is None for n in index_names)
    model.zero_grad(set_to_none=True)
    kl.backward()  # the KL reaches the indexer parameters only
    assert all(params[n].grad is None for n in params if n not in index_names)
    for attn in msa_layers(model):
        want = explicit_kl(sparse_layers(ref_model)[attn.layer_idx - 1], *seen[attn.layer_idx],
                           sparse=mode == "sparse")
        if index_heads >= 2:
            assert abs(attn.kl_loss.item() - want.item()) <= TOL * want.item()
        ix_ref = sparse_layers(ref_model)[attn.layer_idx - 1].indexer
        want_grads = torch.autograd.grad(want, list(ix_ref.parameters()))
        grads = [p.grad for p in attn.indexer.parameters()]
        for g, w in zip(grads, want_grads):
            assert rel(g.double(), w) <= 1e-4  # float32 layer against the float64 formula


def test_index_warmup_with_trainer(tmp_path):
    """Re-warm the indexer with transformers' Trainer: the loss is the KL alone and only
    the indexer trains; the KL goes down and nothing else changes."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = enable_msa_kernels(make_model(index_local_blocks=2), mode="dense")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(".indexer." in n)
    data = [{"input_ids": tokens(1, 96, seed=10 + i)[0]} for i in range(4)]

    class IndexTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            out = model(**inputs)
            loss = openmsa.collect_kl_losses(model)
            return (loss, out) if return_outputs else loss

    def kl_now():
        model(tokens(1, 96, seed=10)[None, 0])
        return openmsa.collect_kl_losses(model).item()

    start = kl_now()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=12,
                             learning_rate=3e-3, report_to=[], save_strategy="no", use_cpu=True,
                             logging_strategy="no", disable_tqdm=True)
    IndexTrainer(model=model, args=args, train_dataset=data).train()
    assert kl_now() < 0.9 * start
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (".indexer." in n), n


def test_set_msa_mode_and_enable_again():
    model = enable_msa_kernels(make_model(), mode="dense")
    assert all(m.mode == "dense" for m in msa_layers(model))
    set_msa_mode(model, "sparse", compute_kl=False)
    assert all(m.mode == "sparse" and m.compute_kl is False for m in msa_layers(model))
    enable_msa_kernels(model, mode="dense", compute_kl=True)
    assert all(m.mode == "dense" and m.compute_kl for m in msa_layers(model))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("cfg, options, match", [
    (dict(), dict(backend="triton"), "index_block_size"),  # B = 16: not a Triton indexer size
    (dict(index_block_size=64, index_head_dim=16), dict(backend="triton"), "index_head_dim"),
    (dict(index_block_size=64, index_head_dim=64, head_dim=8), dict(backend="triton"), "head_dim"),
    (dict(index_local_blocks=0), dict(), "index_local_blocks"),
    (dict(index_local_blocks=4), dict(), "index_local_blocks"),
    (dict(index_local_blocks=2), dict(init_blocks=2), "index_local_blocks"),
    (dict(index_n_heads=3), dict(), "index_n_heads"),
    (dict(attention_dropout=0.1), dict(), "attention_dropout"),
    (dict(), dict(mode="fast"), "mode"),
    (dict(), dict(init_blocks=-1), "init_blocks"),
    (dict(), dict(index_softmax_scale=0.0), "index_softmax_scale"),
])
def test_bad_configurations_raise_naming_the_field(cfg, options, match):
    model = make_model(**cfg)
    with pytest.raises(ValueError, match=match):
        enable_msa_kernels(model, **options)
    assert not msa_layers(model)  # nothing was replaced


def test_unsupported_caches_and_masks_are_refused():
    model = enable_msa_kernels(make_model())
    ids = tokens(1, 40)
    with torch.no_grad():
        with pytest.raises(TypeError, match="DynamicCache\\(config=model.config\\)"):
            model(ids, cache=DynamicCache(), use_cache=True)
        with pytest.raises(TypeError, match="static caches"):
            model(ids, cache=StaticCache(config=model.config, max_cache_len=64), use_cache=True)
        mask = torch.ones(2, 40, dtype=torch.long)
        mask[1, :5] = 0  # left padding
        with pytest.raises(ValueError, match="padding"):
            model(tokens(2, 40), attention_mask=mask)


def test_llama_path_is_the_conversion():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, initializer_range=0.2,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = tokens(1, 48)
    with torch.no_grad():
        want = model(ids).logits
        assert enable_msa_kernels(model, block_size=16, topk=2) is model
        assert [type(m) for m in msa_layers(model)] == [MSAHFAttention, MSAHFAttention]
        assert enable_msa_kernels(model) is model  # already converted: unchanged
        assert rel(model(ids).logits, want) <= TOL  # dense mode keeps the outputs


@pytest.mark.gpu
def test_gpu_kernels_match_transformers_at_m3_block_shapes(monkeypatch):
    """On a GPU, bf16, B = 128, Di = D = 128, K = 4 on 8 blocks: prefill logits and the
    decode steps (the split index scan, here from 512 cached keys) against transformers'
    SDPA path. bf16 rounding may flip near-tied blocks, hence the loose logits tolerance."""
    from openmsa.integrations.transformers import minimax_m3
    monkeypatch.setattr(minimax_m3, "DECODE_SCAN_MIN_KEYS", 512)
    torch.manual_seed(0)
    cfg = text_config(head_dim=128, index_head_dim=128, index_block_size=128, index_topk_blocks=4,
                      index_local_blocks=2, num_attention_heads=8, num_key_value_heads=2)
    cfg._attn_implementation = "sdpa"
    model = draw_norms(MiniMaxM3VLForCausalLM(cfg)).eval().cuda().to(torch.bfloat16)
    ids = tokens(1, 1000, seed=8).cuda()
    with torch.no_grad():
        want = model(ids).logits.float()
    enabled = enable_msa_kernels(copy.deepcopy(model))
    with torch.no_grad():
        got = enabled(ids).logits.float()
    assert rel(got, want) <= 2e-2
    out_w = model.generate(ids[:, :600], do_sample=False, max_new_tokens=8, output_logits=True,
                           return_dict_in_generate=True)
    out_g = enabled.generate(ids[:, :600], do_sample=False, max_new_tokens=8, output_logits=True,
                             return_dict_in_generate=True)
    # Greedy tokens equal step by step, up to the first step whose two best logits (of
    # transformers' path) lie within bf16 rounding of each other (a stated bound: 5x the
    # logits' tolerance, in units of the row's rms); from a legitimate flip on, the two
    # generations continue from different prefixes, so the comparison stops there.
    new_w, new_g = out_w.sequences[0, 600:], out_g.sequences[0, 600:]
    for step, (a, b) in enumerate(zip(out_g.logits, out_w.logits)):
        assert rel(a.float(), b.float()) <= 2e-2
        if new_g[step] != new_w[step]:
            top2 = b.float()[0].topk(2).values
            bound = 5 * 2e-2 * b.float()[0].square().mean().sqrt()
            assert top2[0] - top2[1] <= bound, f"step {step}: a token flip without a near-tie"
            break
