"""openmsa.integrations.transformers: dense-to-MSA conversion of HF transformers models.

Tiny random-initialised Llama / Qwen2 (q/k/v biases) / Qwen3 (q_norm, k_norm) models on
CPU in float32 with the reference backend: hidden 64, 4 query heads / 2 KV heads,
head_dim = index_head_dim = 16, block_size 16, topk 2, prompts of 40-48 tokens, so that
several key blocks exist and the sparse selection drops some of them.

initializer_range is 0.2 (not 0.02) so that the random models have peaked attention and
well-separated logits: greedy tokens then do not hinge on float rounding (the smallest
top-1/top-2 logit margin of the generation tests is ~0.04 against ~1e-6 differences).

Tolerances: dense-mode logits vs the original model, relative error norm <= 1e-5
(openmsa's reference and SDPA/eager reduce in different orders; measured ~4e-7).
"""

from __future__ import annotations

import copy


import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from openmsa.integrations.transformers import (MSACacheLayer, MSAHFAttention,  # noqa: E402
                                               collect_kl_losses, convert_to_msa,
                                               index_parameters, msa_layers, set_msa_mode)
from helpers import rel  # noqa: E402

VOCAB, BS, TOPK = 128, 16, 2
TOL = 1e-5
KINDS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
INDEX_NAMES = ("qi_proj", "ki_proj", "qi_norm", "ki_norm")


def make_model(kind="llama", attn="sdpa", layers=3, seed=0):
    cfg_cls, model_cls = KINDS[kind]
    cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
                  max_position_embeddings=256, initializer_range=0.2, rms_norm_eps=1e-6,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    if kind == "qwen3":  # non-trivial q/k norm weights, so that a skipped norm shows
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


def converted(kind="llama", mode="dense", **kw):
    model = make_model(kind, **{k: kw.pop(k) for k in ("attn", "layers", "seed") if k in kw})
    kw.setdefault("first_dense_layers", 1)
    return convert_to_msa(model, block_size=BS, topk=TOPK, mode=mode, **kw)


def tokens(batch=1, n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, n), generator=g)


# ------------------------------------------------------------------ (a) dense conversion


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dense_mode_keeps_outputs(kind, attn):
    model = make_model(kind, attn)
    ids = tokens(2, 48)
    with torch.no_grad():
        ref = model(ids, labels=ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_to_msa(model, first_dense_layers=1, block_size=BS, topk=TOPK)  # mode="dense"
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert rel(out.logits, ref.logits) <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL * abs(ref.loss.item())

    # Original weights kept under their names; the new keys are the index branch only.
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    added = set(after) - set(before)
    assert added and all(k.split(".")[-2] in INDEX_NAMES for k in added)
    assert not any(".0.self_attn." in k for k in added)  # layer 0 stays dense
    assert not isinstance(model.model.layers[0].self_attn, MSAHFAttention)
    assert [m.layer_idx for m in msa_layers(model)] == [1, 2]
    assert model.config.openmsa["layers"] == [1, 2]
    if kind == "qwen3":  # the model's per-head q/k norm carries over to qi/ki
        assert isinstance(model.model.layers[1].self_attn.qi_norm, type(model.model.layers[1].self_attn.q_norm))

    # The same model in sparse mode really differs: the selection drops blocks.
    set_msa_mode(model, "sparse")
    with torch.no_grad():
        sparse = model(ids).logits
    assert rel(sparse, ref.logits) > 1e-2


def test_dense_mode_generate_equals_original():
    model = make_model("llama")
    ids = tokens(1, 40)
    ref = model.generate(ids, do_sample=False, max_new_tokens=12)
    convert_to_msa(model, block_size=BS, topk=TOPK)
    assert torch.equal(model.generate(ids, do_sample=False, max_new_tokens=12), ref)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_layer_matches_openmsa_msattention(kind, mode):
    """A converted layer computes what openmsa.MSAttention computes with the same weights
    (projections, q/k/qi/ki norms, RoPE on q, k, qi, ki): output and KL. This pins down the
    index branch (its RoPE and norms), which generation-vs-forward tests cannot see."""
    from openmsa import MSAttention
    model = converted(kind, mode=mode, index_init="random")
    attn = model.model.layers[1].self_attn
    qk_norm = kind == "qwen3"
    ref = MSAttention(64, 4, 2, 16, index_head_dim=16, block_size=BS, topk=TOPK, qk_norm=qk_norm,
                      rope_theta=model.config.rope_parameters["rope_theta"], mode=mode, norm_eps=1e-6)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "qi_proj", "ki_proj"):
            getattr(ref, name).weight.copy_(getattr(attn, name).weight)
        if qk_norm:
            for name in ("q_norm", "k_norm", "qi_norm", "ki_norm"):
                getattr(attn, name).weight.uniform_(0.5, 1.5)
                getattr(ref, name).weight.copy_(getattr(attn, name).weight)
    x = torch.randn(2, 48, 64)
    pos = torch.arange(48).expand(2, 48)
    cos_sin = model.model.rotary_emb(x, pos)
    out, _ = attn(x, position_embeddings=cos_sin, attention_mask=None)
    want = ref(x)
    assert rel(out, want) <= TOL
    assert abs(attn.kl_loss.item() - ref.kl_loss.item()) <= TOL * ref.kl_loss.item()


# ------------------------------------------------------------------ (b) KL warmup


@pytest.mark.parametrize("index_init", ["copy", "random"])
def test_kl_warmup_lowers_kl_and_trains_only_index(index_init):
    model = converted("llama", index_init=index_init)
    ids = tokens(2, 48)
    set_msa_mode(model, "dense", compute_kl=True)

    def kl_now():
        with torch.no_grad():
            model(ids, use_cache=False)
        return collect_kl_losses(model).item()

    kl0 = kl_now()
    index_ids = {id(p) for p in index_parameters(model)}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in index_ids}
    opt = torch.optim.Adam(index_parameters(model), lr=1e-2)
    for _ in range(12):
        model(ids, use_cache=False)
        opt.zero_grad()
        collect_kl_losses(model).backward()
        opt.step()
    kl1 = kl_now()
    assert kl1 < 0.8 * kl0, (kl0, kl1)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_stop_gradient_routes_losses(mode):
    """LM loss reaches no index parameter; the KL reaches nothing else."""
    model = converted("qwen3", mode=mode)
    ids = tokens(1, 48)
    out = model(ids, labels=ids, use_cache=False)
    kl = collect_kl_losses(model)
    assert kl is not None and kl.item() > 0
    index = index_parameters(model)
    index_ids = {id(p) for p in index}
    backbone = [p for p in model.parameters() if id(p) not in index_ids]
    g_lm = torch.autograd.grad(out.loss, index, retain_graph=True, allow_unused=True)
    assert all(g is None for g in g_lm)
    g_kl_backbone = torch.autograd.grad(kl, backbone, retain_graph=True, allow_unused=True)
    assert all(g is None for g in g_kl_backbone)
    g_kl_index = torch.autograd.grad(kl, [m.qi_proj.weight for m in msa_layers(model)])
    assert all(g.abs().sum() > 0 for g in g_kl_index)


def test_kl_only_when_requested():
    model = converted("llama", mode="sparse")
    ids = tokens(1, 40)
    with torch.no_grad():
        model(ids)
    assert all(m.kl_loss is None for m in msa_layers(model))  # auto: no autograd, no KL
    with pytest.raises(RuntimeError, match="has computed a KL loss.*forward"):
        collect_kl_losses(model)  # a clear error rather than None, which breaks lam * kl
    set_msa_mode(model, "sparse", compute_kl=True)
    with torch.no_grad():
        model(ids)
    assert collect_kl_losses(model).item() > 0


def test_collect_kl_losses_is_openmsa_collect_kl_losses():
    """One function: openmsa.collect_kl_losses finds the converted layers (the README's
    ``loss = out.loss + 0.1 * openmsa.collect_kl_losses(model)``) and any MSAttention."""
    import openmsa
    import openmsa.integrations.transformers as integ
    from openmsa.layers.msa_attention import IndexBranchMixin

    assert integ.collect_kl_losses is openmsa.collect_kl_losses is collect_kl_losses
    assert "collect_kl_losses" in integ.__all__
    model = converted("llama", mode="sparse")
    assert all(isinstance(m, IndexBranchMixin) for m in msa_layers(model))
    with pytest.raises(RuntimeError, match="none of the 2 MSA layers"):
        openmsa.collect_kl_losses(model)  # no forward yet
    ids = tokens(1, 40)
    out = model(ids, labels=ids, use_cache=False)
    kl = openmsa.collect_kl_losses(model)
    assert kl.dim() == 0 and kl.dtype == torch.float32 and kl.item() > 0
    assert torch.allclose(kl, sum(m.kl_loss for m in msa_layers(model)))
    (out.loss + 0.1 * kl).backward()
    assert all(m.qi_proj.weight.grad.abs().sum() > 0 for m in msa_layers(model))
    # an openmsa.MSAttention inside the same model counts too
    extra = openmsa.MSAttention(64, 4, 2, 16, index_head_dim=16, block_size=BS, topk=TOPK)
    model.extra = extra
    extra(torch.randn(1, 20, 64))
    assert torch.allclose(openmsa.collect_kl_losses(model), kl + extra.kl_loss)
    # a model without MSA layers: a clear error too
    with pytest.raises(ValueError, match="no MSA layers"):
        openmsa.collect_kl_losses(make_model("llama"))


def test_layers_without_kl_contribute_nothing():
    """A layer whose forward skipped the KL (compute_kl=False) adds nothing to the sum."""
    model = converted("llama", mode="sparse", first_dense_layers=0)
    first, *rest = msa_layers(model)
    first.compute_kl = False
    ids = tokens(1, 40)
    model(ids, use_cache=False)
    assert first.kl_loss is None and all(m.kl_loss is not None for m in rest)
    assert torch.allclose(collect_kl_losses(model), sum(m.kl_loss for m in rest))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int64])
def test_wrong_hidden_states_dtype_raises_type_error(dtype):
    model = converted("llama", mode="sparse", first_dense_layers=0)  # float32 parameters
    embeds = model.get_input_embeddings()(tokens(1, 20))
    attn = msa_layers(model)[0]
    pos = torch.arange(20)[None]
    cos, sin = model.model.rotary_emb(embeds, pos)
    with torch.no_grad():
        attn(embeds, position_embeddings=(cos, sin))  # the parameters' dtype runs
        with pytest.raises(TypeError, match=r"^hidden_states must .*torch\.float32.*"
                           + str(dtype).replace(".", r"\.")):
            attn(embeds.to(dtype), position_embeddings=(cos, sin))
        if dtype == torch.float64:  # float64 reaches the first MSA layer through the model
            with pytest.raises(TypeError, match="hidden_states"):
                model(inputs_embeds=embeds.to(dtype))


def test_gradient_checkpointing_non_reentrant_keeps_gradients():
    model = converted("llama", mode="sparse").train()
    ids = tokens(1, 48)

    def grads(m):
        out = m(ids, labels=ids, use_cache=False)
        (out.loss + collect_kl_losses(m)).backward()
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]

    want = grads(copy.deepcopy(model))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = grads(model)
    assert len(got) == len(want) and all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, want))


def test_converted_checkpoint_round_trip():
    """config.openmsa rebuilds the converted architecture; its state dict then loads strictly."""
    model = converted("qwen2", mode="sparse", index_init="random")
    fresh = make_model("qwen2", seed=5)
    convert_to_msa(fresh, mode="sparse", **model.config.openmsa)
    fresh.load_state_dict(model.state_dict(), strict=True)
    ids = tokens(1, 48)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


# ------------------------------------------------------------------ (c) generation


def greedy_full_forward(model, ids, n):
    """Greedy decoding without a cache: a full forward per new token."""
    seq, steps = ids, []
    with torch.no_grad():
        for _ in range(n):
            logits = model(seq, use_cache=False).logits[:, -1]
            steps.append(logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq, steps


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_generate_with_msa_cache_equals_full_forward(kind):
    model = converted(kind, mode="sparse")
    ids, n = tokens(1, 40), 24  # positions up to 63: blocks 0-3, topk 2
    out = model.generate(ids, do_sample=False, max_new_tokens=n, return_dict_in_generate=True,
                         output_logits=True)
    seq, steps = greedy_full_forward(model, ids, n)
    assert torch.equal(out.sequences, seq)
    for got, want in zip(out.logits, steps):
        assert rel(got, want) <= 1e-5
    # The index keys were cached, one per token of every MSA layer.
    cache = out.past_key_values
    for m in msa_layers(model):
        layer = cache.layers[m.layer_idx]
        assert isinstance(layer, MSACacheLayer)
        assert layer.index_keys.shape == (1, 1, 40 + n - 1, 16)
        assert layer.index_length() == layer.get_seq_length()


def test_generate_batch_and_beam_search_match_no_cache():
    """Batch 2 (equal lengths) greedy and beam search (reorders the cache) with the MSA
    cache give the same tokens as generate(use_cache=False)."""
    model = converted("qwen2", mode="sparse")
    ids = tokens(2, 40)
    kw = dict(do_sample=False, max_new_tokens=16)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))
    beam = model.generate(ids, num_beams=3, **kw)
    assert torch.equal(beam, model.generate(ids, num_beams=3, use_cache=False, **kw))
    assert not torch.equal(beam, model.generate(ids, **kw))  # beam search took other paths


def test_chunked_prefill_and_crop():
    """Cached chunks (Lq > 1 on a longer prefix) and a cropped cache reproduce the full
    forward's logits."""
    model = converted("qwen3", mode="sparse")
    ids = tokens(1, 56)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache()
        model(ids[:, :30], cache=cache, use_cache=True)
        chunk = model(ids[:, 30:], cache=cache, use_cache=True).logits
        assert rel(chunk, full[:, 30:]) <= TOL
        cache.crop(37 - 56)  # as assisted decoding does: drop rejected draft tokens
        assert all(cache.layers[m.layer_idx].index_length() == 37 for m in msa_layers(model))
        again = model(ids[:, 37:], cache=cache, use_cache=True).logits
        assert rel(again, full[:, 37:]) <= TOL


# ------------------------------------------------------------------ (d) bad input


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(mode="fast"), ValueError, "mode"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(topk=2.5), TypeError, "topk"),
    (dict(index_head_dim=8), ValueError, "index_head_dim"),
    (dict(index_head_dim=-1), ValueError, "index_head_dim"),
    (dict(index_head_dim=32, index_init="copy"), ValueError, "index_init"),
    (dict(index_init="zeros"), ValueError, "index_init"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(layers=[0, 3]), ValueError, "layers"),
    (dict(layers=[1, 1]), ValueError, "layers"),
    (dict(layers=[]), ValueError, "layers"),
    (dict(layers=1), TypeError, "layers"),
    (dict(layers=["1"]), TypeError, "layers"),
    (dict(layers=[1], first_dense_layers=1), ValueError, "first_dense_layers"),
    (dict(first_dense_layers=3), ValueError, "first_dense_layers"),
    (dict(first_dense_layers=True), TypeError, "first_dense_layers"),
    (dict(compute_kl="yes"), TypeError, "compute_kl"),
    (dict(index_norm=1), TypeError, "index_norm"),
])
def test_convert_rejects_bad_arguments(kwargs, exc, match):
    model = make_model("llama")
    with pytest.raises(exc, match=match):
        convert_to_msa(model, **kwargs)
    assert not msa_layers(model)  # nothing was converted
    assert not hasattr(model.config, "openmsa")


def test_bad_models_and_states():
    with pytest.raises(TypeError, match="model"):
        convert_to_msa("llama")
    with pytest.raises(TypeError, match="model"):
        convert_to_msa(torch.nn.Linear(4, 4))
    model = make_model("llama")
    with pytest.raises(ValueError, match="convert_to_msa first"):
        index_parameters(model)
    with pytest.raises(ValueError, match="convert_to_msa first"):
        set_msa_mode(model, "sparse")
    dropout = make_model("llama")
    dropout.config.attention_dropout = 0.1
    for layer in dropout.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention_dropout"):
        convert_to_msa(dropout)
    convert_to_msa(model, block_size=BS, topk=TOPK)
    with pytest.raises(ValueError, match="already MSA"):
        convert_to_msa(model)
    with pytest.raises(ValueError, match="mode"):
        set_msa_mode(model, "warmup")
    with pytest.raises(TypeError, match="compute_kl"):
        set_msa_mode(model, "dense", compute_kl=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_is_refused(attn):
    model = converted("llama", mode="sparse", attn=attn)
    ids = tokens(2, 40)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        with torch.no_grad():
            model(ids, attention_mask=mask)
    with torch.no_grad():  # an all-ones mask is fine
        model(ids, attention_mask=torch.ones_like(ids))


def test_unsupported_caches_are_refused():
    from transformers import StaticCache
    model = converted("llama", mode="sparse")
    ids = tokens(1, 20)
    with torch.no_grad():
        with pytest.raises(TypeError, match="past_key_values"):
            model(ids, cache=StaticCache(config=model.config, max_cache_len=64), use_cache=True)
        dense = make_model("llama")
        cache = DynamicCache()
        dense(ids, cache=cache, use_cache=True)  # filled without index keys
        with pytest.raises(ValueError, match="past_key_values"):
            model(tokens(1, 1), cache=copy.deepcopy(cache), use_cache=True)


def test_dense_mode_sdpa_path_equals_the_reference_path():
    """Dense mode without a cached prefix runs the Main Branch through torch's SDPA; with
    backend="reference" the reference runs. Logits, KL and every gradient agree."""
    assert_same_dense_training_step(*(converted("qwen3", mode="dense", backend=b)
                                      for b in ("auto", "reference")), tokens(2, 40))


def assert_same_dense_training_step(model, ref, ids):
    """One dense-mode step (loss = mean(logits^2) + KL) of both models: logits, KL and every
    gradient agree."""
    results = []
    for m in (model, ref):
        m.train()
        set_msa_mode(m, "dense", compute_kl=True)
        out = m(ids, use_cache=False)
        kl = collect_kl_losses(m)
        (out.logits.square().mean() + kl).backward()
        results.append((out.logits, kl, {n: p.grad.clone() for n, p in m.named_parameters()
                                         if p.grad is not None}))
    (l1, k1, g1), (l2, k2, g2) = results
    assert rel(l1, l2) < 1e-5 and rel(k1, k2) < 1e-5
    assert g1.keys() == g2.keys() and len(g1) > 0
    for n in g1:
        assert rel(g1[n], g2[n]) < 1e-4, n


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="Triton's interpreter on CPU tensors; on a CUDA host Triton runs "
                           "compiled (the gpu tests cover the kernels there)")
def test_dense_mode_through_the_kernels_equals_the_reference_path(monkeypatch):
    """Dense mode with the KL, keys that fit 64 blocks and kernel-supported shapes runs as
    sparse mode with K = every block through the Triton kernels (here the interpreter):
    logits, KL and every gradient equal the reference path; the kernel path is spied (in
    openmsa.layers.msa_attention, whose dense_warmup_attention runs every MSA layer's
    dense mode)."""
    import openmsa.layers.msa_attention as layer_mod
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    real = layer_mod.msa_attention
    monkeypatch.setattr(layer_mod, "msa_attention",
                        lambda *a, **kw: calls.append(kw["topk"]) or real(*a, **kw))
    cfg = LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=VOCAB,
                      max_position_embeddings=256, initializer_range=0.2, bos_token_id=None,
                      eos_token_id=None, pad_token_id=None)
    models = []
    for backend in ("triton", "reference"):
        torch.manual_seed(0)  # the same weights, index projections included
        models.append(convert_to_msa(LlamaForCausalLM(cfg), index_head_dim=64, block_size=64, topk=1,
                                     mode="dense", backend=backend, first_dense_layers=0))
    assert_same_dense_training_step(*models, tokens(2, 100))
    assert calls == [2, 2]  # both layers, 100 keys = 2 blocks of 64
