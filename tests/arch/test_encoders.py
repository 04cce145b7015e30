"""Bidirectional encoders: tiny random BERT (post-LN, padded text) and ViT (pre-LN, pixel inputs) from configs."""

import pytest
import torch
from transformers import BertConfig, BertModel, ViTConfig, ViTForImageClassification, ViTModel

import elastiformer as ef
from helpers.encoders import word_level_bert_tokenizer
from helpers.models import ALL_COMPONENTS, VOCAB, make_elastic, tokens
from elastiformer.layers import ElasticMLP
from elastiformer.training.routers import train_routers


def tiny_bert(seed: int = 0, init: float = 0.02) -> BertModel:
    """`init=0.2`: a larger init, so that what the routers skip changes the embedding measurably."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, pad_token_id=0, initializer_range=init)
    return BertModel(cfg).eval()


def tiny_vit(seed: int = 0, classifier: bool = False):
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=3,
                    num_attention_heads=4, intermediate_size=48, num_labels=5)
    return (ViTForImageClassification(cfg) if classifier else ViTModel(cfg)).eval()


def text_batch(B: int = 3, T: int = 14, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded sentences of different lengths (the last one is 5 tokens shorter)."""
    ids = tokens(B, T, seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, T - 5:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def image_batch(B: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(B, 1, 16, 16, generator=torch.Generator().manual_seed(seed))}


ENCODERS = {
    "bert": (tiny_bert, text_batch),
    "vit": (tiny_vit, image_batch),
    "vit-classifier": (lambda seed=0: tiny_vit(seed, classifier=True), image_batch),
}


def final(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def real_tokens(x: torch.Tensor, batch: dict) -> torch.Tensor:
    """The outputs of non-padding tokens (padding positions of BERT are not compared)."""
    mask = batch.get("attention_mask")
    return x[mask.bool()] if mask is not None and x.dim() == 3 else x


@pytest.fixture(params=sorted(ENCODERS))
def encoder(request):
    return request.param


def make_encoder(name: str, component: str, seed: int = 0, **overrides) -> ef.ElasticModel:
    return ef.get_elastic_model(ENCODERS[name][0](seed), ef.ElasticConfig(**(ALL_COMPONENTS[component] | overrides)))


def test_encoders_are_non_causal_and_equal_base_when_disabled_or_at_full_budget(encoder, component):
    build, data = ENCODERS[encoder]
    batch = data()
    ref = final(build(0)(**batch))
    em = make_encoder(encoder, component)
    assert not em.is_causal and em.is_calibrated  # top-k at inference: nothing to calibrate
    with torch.no_grad():
        with em.disable_routers():
            assert torch.equal(final(em(**batch)), ref)
        em.set_budget(1.0)
        assert torch.equal(final(em(**batch)), ref)
        assert em.last_stats()["elastic_flops"] == em.last_stats()["dense_flops"]
        # routed paths (gather, per-head attention, expert dispatch, post-LN) with every unit kept: same outputs
        em.set_budget(0.999)
        out = final(em(**batch))
    assert torch.allclose(real_tokens(out, batch), real_tokens(ref, batch), atol=1e-5)


def test_inference_routes_by_top_k_without_calibration(encoder):
    build, data = ENCODERS[encoder]
    em = make_encoder(encoder, "mlp_tokens", keep_first_token=False)
    em.set_budget(0.5)
    batch = data()
    with torch.no_grad():
        em(**batch)  # a causal LM would refuse this (no thresholds): see test below
    valid = int(batch["attention_mask"].sum(1).float().mul(0.5).round().sum()) if "attention_mask" in batch else None
    stats = em.last_stats()["per_layer"]
    for s in (s for s in stats if s["sublayer"] == "mlp"):
        if valid is not None:  # exactly round(0.5 * real tokens) per sentence
            n_real = int(batch["attention_mask"].sum())
            assert round(s["token_fraction"] * n_real) == valid
        else:
            assert abs(s["token_fraction"] - 0.5) < 0.07
    lm = make_elastic("llama", "mlp_tokens")
    lm.set_budget(0.5)
    with pytest.raises(ef.NotCalibratedError):
        lm(tokens())


def mlp_calls(em, batch: dict) -> list[tuple[ElasticMLP, torch.Tensor, torch.Tensor]]:
    """(wrapper, input, output) of every routed MLP in one forward of `batch`."""
    seen = []
    wrappers = [m for m in em.base_model.modules() if isinstance(m, ElasticMLP)]
    hooks = [w.register_forward_hook(lambda m, a, o: seen.append((m, a[0], o))) for w in wrappers]
    with torch.no_grad():
        em(**batch)
    for h in hooks:
        h.remove()
    return seen


def test_skipped_tokens_leave_the_residual_stream_unchanged(encoder):
    """Post-LN (BERT): a skipped token comes out of the sub-layer exactly as it went in (its LayerNorm skipped too);
    pre-LN (ViT): the sub-layer adds exactly zero for it. Processed tokens get the base sub-layer's output."""
    build, data = ENCODERS[encoder]
    em = make_encoder(encoder, "mlp_tokens")
    em.set_budget(0.5)
    batch = data()
    post_norm = encoder == "bert"
    for wrapper, x, y in mlp_calls(em, batch):
        identity = y if post_norm else x + y
        skipped = (identity == x).all(-1)  # (B, T)
        with torch.no_grad():
            full = wrapper.base_layer(x)
        full = full if post_norm else x + full
        processed = ~skipped
        if "attention_mask" in batch:
            processed &= batch["attention_mask"].bool()
        assert skipped.any() and processed.any()
        assert torch.allclose(identity[processed], full[processed], atol=1e-6)


def test_padding_is_respected():
    """A padded sentence gives, on its real tokens, what it gives alone (every component, routing on)."""
    em = make_encoder("bert", "combined")
    em.set_budget(0.6)
    batch = text_batch()
    n = int(batch["attention_mask"][-1].sum())
    with torch.no_grad():
        padded = em(**batch).last_hidden_state[-1, :n]
        alone = em(input_ids=batch["input_ids"][-1:, :n]).last_hidden_state[0]
        emb = em.embed(batch).pooled[-1]
        emb_alone = em.embed({"input_ids": batch["input_ids"][-1:, :n]}).pooled[0]
    assert torch.allclose(padded, alone, atol=1e-5)
    assert torch.allclose(emb, emb_alone, atol=1e-5)  # mean pooling ignores padding


def layer_output(model, layer: int, batch: dict) -> torch.Tensor:
    """The hidden states BERT's encoder layer `layer` returns. model: a BertModel, elastic or not."""
    seen = {}
    inner = getattr(model, "base_model", model)
    hook = inner.encoder.layer[layer].register_forward_hook(
        lambda m, a, o: seen.setdefault("out", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    return seen["out"]


@pytest.mark.parametrize("component", ["mlp_tokens", "attn_tokens", "combined"])
def test_layers_held_dense_skip_padding_while_routing(component):
    """Routed layers never compute padding; a layer held at full capacity under routing (here layer 0, in
    `dense_layers`) skips it too, with the same outputs on the real tokens. At budget 1 nothing is skipped."""
    em = make_encoder("bert", component, dense_layers=(0,))
    # every sentence ends in 3 padding tokens, the last one in 8: padding the attention can drop too
    batch = {k: torch.cat([v, torch.zeros(v.shape[0], 3, dtype=v.dtype)], dim=1) for k, v in text_batch().items()}
    n_real, n_all = int(batch["attention_mask"].sum()), batch["attention_mask"].numel()

    def layer0(kind: str) -> dict:
        return next(s for s in em.last_stats()["per_layer"] if s["layer"] == 0 and s["sublayer"] == kind)

    with torch.no_grad():
        em.set_budget(1.0)
        em(**batch)
        assert all(layer0(k)["executed_flops"] == layer0(k)["dense_flops"] for k in ("attn", "mlp"))
        em.set_budget(0.8)
        em(**batch)
    mlp, attn = layer0("mlp"), layer0("attn")
    assert mlp["executed_flops"] * n_all == mlp["dense_flops"] * n_real  # exactly the real tokens' share
    assert attn["executed_flops"] < attn["dense_flops"] and attn["token_fraction"] == 1.0
    routed, base = layer_output(em, 0, batch), layer_output(tiny_bert(0), 0, batch)
    assert torch.allclose(real_tokens(routed, batch), real_tokens(base, batch), atol=1e-5)


def test_a_padded_encoders_joint_budget_spends_the_real_tokens_compute():
    """The allocation's FLOPs are relative to what the routed sub-layers run at full capacity on the real tokens
    (padding skipped), so its path starts at 1, and block FLOPs fall with every step of the joint budget below 1
    (a path that started at the padding-free point made budgets above it run the dense model, padding included)."""
    em = make_encoder("bert", "combined")
    batch = {k: torch.cat([v, torch.zeros(v.shape[0], 4, dtype=v.dtype)], dim=1) for k, v in text_batch().items()}
    em.fit_allocation([batch], progress=False)
    assert em.allocation.flops[0] == pytest.approx(1.0)
    ratios = []
    with torch.no_grad():
        for b in (1.0, 0.95, 0.85, 0.75, 0.65):
            em.set_budget(b)
            em(**batch)
            ratios.append(em.last_stats()["flops_ratio"])
    assert ratios[0] == 1.0 and all(b < a for a, b in zip(ratios, ratios[1:])), ratios
    n_real, n_all = int(batch["attention_mask"].sum()), batch["attention_mask"].numel()
    assert ratios[1] < n_real / n_all + 0.05  # just below 1: the padding is gone, and only a little real work


def test_learned_routers_are_matched_to_the_routing_free_point_of_a_padded_encoder():
    """Static pruning that drops nothing runs every real token with the padding skipped: the learned routers just
    below budget 1 run the same function at the same FLOPs, and the FLOPs matching finds that point (bisection steps
    alone stop at a budget that still routes a few tokens, so the pair read as a loss)."""
    from elastiformer.evaluation.baselines import EDGE, match_flops, probe_flops

    em = make_encoder("bert", "mlp_tokens")
    batch = text_batch(B=3, T=60)  # long enough rows that a budget a bisection step below 1 still routes a token
    em.fit_allocation([batch], progress=False)
    learned = lambda: em.routing_method("learned")  # noqa: E731
    edge = probe_flops(em, batch, EDGE, learned, None, 0)
    assert edge < probe_flops(em, batch, 1.0, learned, None, 0)  # the padding is skipped just below 1
    budget, got = match_flops(em, batch, 0.9, edge, learned, 0.1, None, 0)
    assert got == edge
    with torch.no_grad(), em.budget(budget):
        routed = em(**batch).last_hidden_state
    with torch.no_grad(), em.disable_routers():
        dense = em(**batch).last_hidden_state
    torch.testing.assert_close(real_tokens(routed, batch), real_tokens(dense, batch), atol=1e-5, rtol=1e-4)


def test_save_load_round_trip(tmp_path, encoder):
    build, data = ENCODERS[encoder]
    em = make_encoder(encoder, "combined", lora_rank=1)
    with torch.no_grad():
        for p in em.router_parameters():
            p.normal_(0, 0.3)
    em.set_budget(0.6)
    batch = data()
    with torch.no_grad():
        out = final(em(**batch))
    em.save_pretrained(tmp_path / "routers")
    em2 = ef.ElasticModel.from_pretrained(build(0), tmp_path / "routers")
    em2.set_budget(0.6)
    with torch.no_grad():
        assert torch.equal(final(em2(**batch)), out)
    base = em2.unload()
    with torch.no_grad():
        assert torch.equal(final(base(**batch)), final(build(0)(**batch)))


def held_out_distance(em, batches) -> float:
    with torch.no_grad():
        total = 0.0
        for b in batches:
            with em.disable_routers():
                t = em.embed(b).pooled
            total += float(1 - torch.cosine_similarity(t, em.embed(b).pooled).mean())
    return total / len(batches)


def test_cosine_training_lowers_the_distance_on_a_tiny_encoder():
    train = [text_batch(B=8, T=16, seed=s) for s in range(8)]
    held = [text_batch(B=8, T=16, seed=100 + s) for s in range(2)]
    em = ef.get_elastic_model(tiny_bert(0, init=0.2), ef.ElasticConfig(mlp_tokens=0.5, attn_heads=0.5))
    em.set_budget(0.5)
    before = held_out_distance(em, held)
    with em.routing_method("random"):
        torch.manual_seed(0)
        random = held_out_distance(em, held)
    report = train_routers(em, train, steps=40, budget=0.5, lr=5e-3, warmup=2, progress=False,
                           allocation=False)  # equal budgets are equal FLOPs only with uniform capacities
    assert report.loss == "cosine" and all("cosine_distance" in h and "kl" not in h for h in report.history)
    assert report.tokens == sum(int(b["attention_mask"].sum()) for b in train) * 5  # 40 steps over 8 batches
    after = held_out_distance(em, held)
    assert after < 0.8 * before and after < 0.9 * random, (before, random, after)


def test_encoder_bad_input_gives_clear_errors():
    em = make_encoder("bert", "mlp_tokens")
    with pytest.raises(ef.ConfigError, match="pooling='max'"):
        em.embed(text_batch(), pooling="max")
    with pytest.raises(ef.ConfigError, match="no pooler output"):
        make_encoder("vit-classifier", "mlp_tokens").embed(image_batch(), pooling="pooler")
    with pytest.raises(ef.ConfigError, match="loss='cosine' distils embeddings of an encoder"):
        train_routers(make_elastic("llama", "mlp_tokens"), tokens(4, 8), steps=1, loss="cosine", progress=False)
    with pytest.raises(ef.ConfigError, match="loss='hinge'"):
        train_routers(em, [text_batch()], steps=1, loss="hinge", progress=False)
    with pytest.raises(ef.ConfigError, match="loss='kl' needs a model with logits"):
        train_routers(em, [text_batch()], steps=1, loss="kl", progress=False)
    with pytest.raises(ef.ConfigError, match="embed\\(\\) is for encoders"):
        make_elastic("llama", "mlp_tokens").embed({"input_ids": tokens()})
    with pytest.raises(ef.DataError, match="holding input_ids .* or pixel_values"):
        em.fit_static([{"labels": torch.zeros(3)}])
    with pytest.raises(ef.DataError, match="input_ids of shape \\(14,\\)"):
        em(input_ids=text_batch()["input_ids"][0])


def test_load_model_returns_the_encoder_class(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "bert")
    tiny_vit(classifier=True).save_pretrained(tmp_path / "vit")
    assert type(ef.load_model(str(tmp_path / "bert"))) is BertModel
    assert type(ef.load_model(str(tmp_path / "vit"))) is ViTForImageClassification


def test_static_baseline_and_random_routing_on_an_encoder():
    em = make_encoder("vit-classifier", "combined")
    em.fit_static([image_batch(seed=5)])
    em.set_budget(0.6)
    with torch.no_grad():
        for method in ("static", "random", "learned"):
            with em.routing_method(method):
                out = em(**image_batch())
            assert torch.isfinite(out.logits).all()
            assert em.last_stats()["flops_ratio"] < 0.8


# ---------------------------------------------------------------------------------------------- evaluation, bench
def test_evaluate_encoder_reports_cosine_retrieval_and_flops():
    from elastiformer.evaluation.encoder import evaluate_encoder, retrieval_agreement

    emb = torch.randn(6, 4)
    assert retrieval_agreement(emb, emb) == 1.0 and retrieval_agreement(emb, emb * 3) == 1.0
    assert retrieval_agreement(emb, torch.randn(6, 4, generator=torch.Generator().manual_seed(3))) < 1.0

    em = make_encoder("bert", "mlp_tokens")
    held = [text_batch(B=4, seed=s) for s in range(2)]
    ev = evaluate_encoder(em, held, budgets=[1.0, 0.5], baselines=["random", "norm", "static"],
                          calibration_data=[text_batch(seed=9)], progress=False)
    assert ev["inputs"] == 8 and ev["tokens"] == sum(int(b["attention_mask"].sum()) for b in held)
    full = [r for r in ev["records"] if r["budget"] == 1.0]
    assert all(r["cosine"] > 0.9999 and r["retrieval_agreement"] == 1.0 and r["block_flops_ratio"] == 1.0
               for r in full)
    half = [r for r in ev["records"] if r["budget"] == 0.5]
    assert {r["method"] for r in half} == {"learned", "random", "norm", "static"}
    assert all(r["block_flops_ratio"] < 0.9 and r["cosine"] < 1.0 for r in half)
    learned = next(r for r in half if r["method"] == "learned")
    for r in half:  # a baseline whose FLOPs were not matched gets the learned routers measured again at its FLOPs
        if r["method"] == "learned":
            continue
        again = r.get("learned_at_same_flops")
        if abs(r["block_flops_ratio"] - learned["block_flops_ratio"]) > 0.02:
            assert again is not None, r
        if again is not None:
            assert abs(again["block_flops_ratio"] - r["block_flops_ratio"]) < 0.05 and 0.0 < again["cosine"] <= 1.0
    # padding is never computed once tokens are routed: just below budget 1 the FLOPs jump down, and a baseline that
    # lands past the learned FLOPs is paired with the learned routers at its own FLOPs
    ev = evaluate_encoder(em, held, budgets=[0.97], baselines=["random"], progress=False)
    learned, rand = ev["records"]
    if abs(rand["block_flops_ratio"] - learned["block_flops_ratio"]) > 0.02:
        assert abs(rand["learned_at_same_flops"]["block_flops_ratio"] - rand["block_flops_ratio"]) < 0.02

    vit = make_encoder("vit-classifier", "mlp_experts")
    labelled = [image_batch(B=4, seed=s) | {"labels": torch.tensor([0, 1, 2, 3])} for s in range(2)]
    ev = evaluate_encoder(vit, labelled, budgets=[1.0], progress=False)
    with torch.no_grad():  # the teacher's accuracy, computed another way: the base classifier's argmax
        base = tiny_vit(0, classifier=True)
        correct = sum(int((base(pixel_values=b["pixel_values"]).logits.argmax(-1) == b["labels"]).sum())
                      for b in labelled)
    assert ev["teacher_accuracy"] == correct / 8 and ev["records"][0]["accuracy"] == ev["teacher_accuracy"]
    with pytest.raises(ef.ConfigError, match="evaluate_encoder is for encoders"):
        evaluate_encoder(make_elastic("llama", "mlp_tokens"), [{"input_ids": tokens()}], progress=False)


def test_split_sentences():
    from elastiformer.data.text import split_sentences

    text = ("It was late. Mr. Elliot came home at last,\nand the lamps were lit in every room. "
            "Why? Nobody could say why the old house felt so cold that night, not even Anne!")
    assert split_sentences(text, min_words=4) == [
        "Mr. Elliot came home at last, and the lamps were lit in every room.",
        "Nobody could say why the old house felt so cold that night, not even Anne!"]


@pytest.fixture(scope="module")
def bert_workspace(tmp_path_factory):
    """A tiny BERT + word-level tokenizer as a Hugging Face folder, and sentence files."""
    import random

    root = tmp_path_factory.mktemp("enc")
    words = ("the a cat dog sat ran on under mat house far away and then came back home big small red blue green "
             "tree river walked slept quickly slowly over with night day sun moon").split()
    tok = word_level_bert_tokenizer(words)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64, initializer_range=0.2)).save_pretrained(
        root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    for name, n in (("train.txt", 200), ("held.txt", 24)):
        (root / name).write_text(" ".join("The " + " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))
                                          + "." for _ in range(n)))
    return root


def test_encoder_bench_writes_the_result_schema_and_readme(bert_workspace, tmp_path, monkeypatch):
    import json

    fits = []
    fit = ef.ElasticModel.fit_allocation
    monkeypatch.setattr(ef.ElasticModel, "fit_allocation", lambda self, data, max_batches=1, **kw: (
        fits.append((len(data), max_batches)), fit(self, data, max_batches, **kw))[1])

    from elastiformer.benchmarks.runner import update_readme
    from elastiformer.benchmarks.encoder import (ENCODER_BENCH_DEFAULTS, encoder_results_markdown,
                                                plot_encoder_bench, run_encoder_bench)

    out = tmp_path / "encoder.json"
    o = dict(ENCODER_BENCH_DEFAULTS) | dict(
        model=str(bert_workspace / "model"), train_data=str(bert_workspace / "train.txt"),
        eval_data=str(bert_workspace / "held.txt"), components="mlp_tokens,combined", budgets="0.5,0.9", steps=2,
        batch_size=8, train_sentences=32, eval_sentences=20, timing_reps=1, allocation_batches=3, output=str(out))
    result = run_encoder_bench(o, plot=plot_encoder_bench, echo=lambda *_: None)
    saved = json.loads(out.read_text())
    assert saved["records"] == result["records"] and saved["eval_sentences"] == 20 and saved["train_tokens"] > 0
    assert fits == [(3, 3), (3, 3)]  # each setting's allocation fitted on 3 calibration batches of 8 sentences
    assert all(saved["components"][c]["allocation_tokens"] > 0 for c in ("mlp_tokens", "combined"))
    schema = {"method": str, "component": str, "budget": float, "block_flops_ratio": float, "cosine": float,
              "retrieval_agreement": float}
    for r in saved["records"]:
        assert all(isinstance(r[k], kind) for k, kind in schema.items()), r
    assert {(r["component"], r["method"]) for r in saved["records"]} == \
        {("mlp_tokens", m) for m in ("learned", "random", "static", "norm", "norm_allocated")} | \
        {("combined", m) for m in ("learned", "random", "static")}
    assert set(saved["target"]) == {"mlp_tokens", "combined"}
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:encoder -->\nold\n<!-- /results:encoder -->\nafter\n")
    update_readme(saved, readme, "encoder.png", marker="encoder", render=encoder_results_markdown)
    text = readme.read_text()
    again = sum("learned_at_same_flops" in r for r in saved["records"] if r["component"] == "mlp_tokens")
    assert "\nold\n" not in text and text.endswith("after\n")
    assert text.count("| mlp_tokens |") == 1 + 10 + again  # (+ a "learned @ static FLOPs" row per step pair)


def test_encoder_bench_cli_refuses_bad_options(capsys, tmp_path):
    from helpers.cli import run

    code, _, err = run(["bench", "--task", "vision-x"], capsys)
    assert code == 2 and err.strip() == "error: --task 'vision-x': pass one of lm, encoder"
    code, _, err = run(["bench", "--task", "encoder", "--components", "mlp_tokens,heads", "--output",
                        tmp_path / "encoder.json"], capsys)
    assert code == 2 and "unknown bench components ['heads']" in err and len(err.strip().splitlines()) == 1


def test_skipped_tokens_get_the_fitted_stand_in_through_the_post_ln(encoder):
    """With fitted stand-ins, a skipped token gets the stand-in's estimate where the MLP's update would be: post-LN
    (BERT) LayerNorm(x + stand_in(x)), pre-LN (ViT) x + stand_in(x); a processed one the base sub-layer's output."""
    build, data = ENCODERS[encoder]
    em = make_encoder(encoder, "mlp_tokens")
    em.fit_stand_ins([data(seed=4), data(seed=5)])
    em.set_budget(0.5)
    batch = data()
    post_norm = encoder == "bert"
    calls = mlp_calls(em, batch)
    assert all(wrapper.stand_in.is_fitted for wrapper, _, _ in calls)
    for wrapper, x, y in calls:
        with torch.no_grad():
            full, estimate = wrapper.base_layer(x), wrapper.stand_in(x)
            norm = wrapper.spec.mlp_weights(wrapper.base_layer).norm
            stood_in = norm(x + estimate) if post_norm else estimate
        real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones(y.shape[:2], dtype=bool)
        processed = (y - full).abs().amax(-1) < 1e-5
        skipped = (y - stood_in).abs().amax(-1) < 1e-5
        assert (processed & real).any() and (skipped & real).any() and bool((processed | skipped)[real].all())
