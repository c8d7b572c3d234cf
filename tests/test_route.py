"""Routing does not depend on how the model is written (reparam.route).

A small Llama-style decoder in four forms (linen per-layer Dense, linen nn.scan with DenseGeneral/Einsum,
NNX, a plain function of a dict under lax.scan and jax.checkpoint) trains with the hot path to the values
of plain autodiff; its compiled LoRA step forms no xᵀg in any form; uses the router cannot take are
reported and warned about, and still train correctly.
"""
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reparam as rp
from experiments.models import decoder_forms as D
from tests.methods import perturb
from tests.hlo import dot_shapes as _dot_shapes

CFG = D.Config(vocab=64, d=32, layers=2, heads=4, kv_heads=2, ffn=64)
BATCH = D.batch(CFG, n=3, t=10)                 # 30 tokens: no other dot of the step contracts 30 rows
METHODS = {"lora": lambda: rp.lora(4, alpha=8), "dora": lambda: rp.dora(4, alpha=8), "pissa": lambda: rp.pissa(4),
           "vera": lambda: rp.vera(8), "lokr": lambda: rp.lokr(2), "sparse": lambda: rp.sparse.random(density=0.1),
           "lora+sparse": lambda: rp.add(rp.lora(2), rp.sparse.random(density=0.05))}


def _run(plan, loss, frozen, trainable, mode, steps=2):
    opt = optax.sgd(0.05)
    step = rp.train.make_train_step(plan, loss, opt, matmul=mode, donate=False)
    state = rp.train.init_state(trainable, opt, jax.random.key(5))
    losses = []
    for _ in range(steps):
        state, m = step(state, frozen, BATCH)
        losses.append(float(m["loss"]))
    return losses, state.trainable, step


def _setup(form, method, dtype=None):
    params, loss, rules_for = D.make(form, CFG)
    if dtype is not None:
        params = jax.tree.map(lambda a: a.astype(dtype), params)
    if method == "mixed":       # one method per projection: lora, dora, pissa, vera, lokr, sparse, then lora+sparse
        names = D.PROJ[form]
        t = {name: METHODS[m]() for name, m in zip(names, ("lora", "dora", "pissa", "vera", "lokr", "sparse"))}
        t.update({name: METHODS["lora+sparse"]() for name in names[6:]})
    else:
        t = METHODS[method]()
    plan = rp.plan(rules_for(t), params)
    frozen, trainable = plan.init(jax.random.key(1), params)
    return plan, loss, frozen, perturb(trainable, jax.random.key(2), 0.05)


@pytest.mark.parametrize("method", ["mixed", "lora+sparse"])
@pytest.mark.parametrize("form", D.FORMS)
def test_every_form_trains_like_autodiff(form, method):
    """Two steps with the hot path equal plain autodiff to 1e-5, and every projection's use was routed: lora,
    dora, pissa, vera, lokr, sparse.random and add(lora, sparse.random), one per projection ("mixed"; the
    scanned form's fused gate/up takes lokr, its down the sparse part), and add(lora, sparse) on all."""
    plan, loss, frozen, trainable = _setup(form, method)
    ref_losses, ref, _ = _run(plan, loss, frozen, trainable, "autodiff")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # no fallback warning: everything is routed
        losses, got, step = _run(plan, loss, frozen, trainable, "auto")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert set(step.routing.uses) == set(plan.adapted())
    assert not step.routing.fallbacks(), step.routing.report()


@pytest.mark.parametrize("form", D.FORMS)
def test_bf16_base_trains_like_autodiff(form):
    plan, loss, frozen, trainable = _setup(form, "lora", jnp.bfloat16)
    ref_losses, ref, _ = _run(plan, loss, frozen, trainable, "autodiff")
    losses, got, step = _run(plan, loss, frozen, trainable, "auto")
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(b, a, rtol=5e-2, atol=5e-3)
    assert not step.routing.fallbacks()


def _weight_grads(plan, loss, frozen, trainable, mode):
    """Dots of the compiled step that contract the 30 tokens into a result the size of an adapted kernel."""
    opt = optax.sgd(0.1)
    step = rp.train.make_train_step(plan, loss, opt, matmul=mode, donate=False)
    hlo = step.lower(rp.train.init_state(trainable, opt, jax.random.key(0)), frozen, BATCH).compile().as_text()
    shapes = set()
    for leaf in plan.leaves:
        if leaf.transform is not None:
            v, per_layer = leaf.view, [n for a, n in enumerate(leaf.shape) if a not in leaf.view.batch]
            m = (int(np.prod([leaf.shape[a] for a in v.inp])), int(np.prod([leaf.shape[a] for a in v.out])))
            shapes |= {tuple(sorted(m)), tuple(sorted(per_layer))}
    tokens = BATCH["ids"].size
    return [d for d in _dot_shapes(hlo) if tuple(sorted(n for n in d[0] if n != 1)) in shapes
            and int(np.prod(d[1])) == tokens]


@pytest.mark.parametrize("form", D.FORMS)
def test_lora_step_never_forms_the_weight_gradient(form):
    """In every form the compiled LoRA step has no xᵀg dot; plain autodiff has one per kernel (so the check can fail)."""
    plan, loss, frozen, trainable = _setup(form, "lora")
    assert _weight_grads(plan, loss, frozen, trainable, "autodiff")
    assert not _weight_grads(plan, loss, frozen, trainable, "auto")


def test_linen_remat_is_routed():
    """``nn.remat(Block)``: the uses inside the rematerialised blocks are routed, the values are autodiff's."""
    params, loss, rules_for = D.make("linen", CFG, remat=True)
    plan = rp.plan(rules_for(rp.lora(4)), params)
    frozen, trainable = plan.init(jax.random.key(1), params)
    trainable = perturb(trainable, jax.random.key(2), 0.05)
    ref_losses, ref, _ = _run(plan, loss, frozen, trainable, "autodiff")
    losses, got, step = _run(plan, loss, frozen, trainable, "auto")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert set(step.routing.uses) == set(plan.adapted()) and not step.routing.fallbacks()


def test_fallbacks_are_reported_warned_and_correct():
    """The tied embedding (a gather, and a head that contracts its output axis) and a kernel scaled in the loss
    cannot take the structured op: they fall back to autodiff, the step warns once naming them, the summary
    says why -- and the step still equals plain autodiff. A kernel copied with ``jnp.array`` is still routed."""
    params = D.function_params(CFG, jax.random.key(0))

    def loss(p, batch, rng):
        p = {**p, "layers": {**p["layers"], "q": jnp.array(p["layers"]["q"]), "k": p["layers"]["k"] * 1.5}}
        return D.next_token_loss(D.function_logits(p, batch["ids"], CFG), batch["ids"])
    plan = rp.plan([(r"embed", rp.lora(4)), (r"layers/(q|k|v)", rp.on_axes(rp.lora(4), batch_axes=(0,)))], params)
    frozen, trainable = plan.init(jax.random.key(1), params)
    trainable = perturb(trainable, jax.random.key(2), 0.05)
    ref_losses, ref, _ = _run(plan, loss, frozen, trainable, "autodiff")
    with pytest.warns(UserWarning, match=r"fell back to plain autodiff.*embed: .*gather \(embedding lookup\)") as rec:
        losses, got, step = _run(plan, loss, frozen, trainable, "auto")
    assert len([w for w in rec if "fell back" in str(w.message)]) == 1          # once, not per step
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    fallbacks = step.routing.fallbacks()
    assert set(fallbacks) == {"embed", "layers/k"}, step.routing.report()
    assert "gather (embedding lookup)" in fallbacks["embed"]
    assert any("not the view's inputs" in r for r in fallbacks["embed"])        # the tied head: x @ embed.T
    assert fallbacks["layers/k"] == ["mul"]
    text = plan.summary(routing=step.routing)
    assert re.search(r"layers/q .* 1/1 routed \(materialised @ 30 tok x2 layers\)", text), text
    assert re.search(r"embed .* 0/2 routed; autodiff: .*gather", text), text
    assert "custom-vjp" not in text


def test_routing_record_belongs_to_the_step():
    """Two steps of one plan keep their own records; tracing leaves the plan unchanged."""
    plan, loss, frozen, trainable = _setup("linen", "lora")
    before = plan.summary()
    _, _, s1 = _run(plan, loss, frozen, trainable, "factored", steps=1)
    _, _, s2 = _run(plan, loss, frozen, trainable, "materialised", steps=1)
    assert plan.summary() == before
    assert {u.route for sites in s1.routing.uses.values() for u in sites.values()} == {"factored"}
    assert {u.route for sites in s2.routing.uses.values() for u in sites.values()} == {"materialised"}


# --- matrix views from the model's own contractions -------------------------------------------------------
def _gemma_like():
    """Einsum projections as in Gemma: q [H, d, hd], fused kv [2, KV, d, hd], out [H, hd, d], gating [2, ffn, d]."""
    H, KV, d, hd, ffn = 4, 2, 16, 8, 24
    ks = iter(jax.random.split(jax.random.key(0), 5))
    params = {n: jax.random.normal(next(ks), s) * 0.1 for n, s in
              (("q", (H, d, hd)), ("kv", (2, KV, d, hd)), ("o", (H, hd, d)), ("gating", (2, ffn, d)),
               ("down", (ffn, d)))}

    def loss(p, x, rng):
        q = jnp.einsum("btd,hdk->bthk", x, p["q"])
        kv = jnp.einsum("btd,ckdh->cbtkh", x, p["kv"])
        o = jnp.einsum("bthk,hkd->btd", q * jnp.repeat(kv[0], H // KV, 2), p["o"])
        gate = jnp.einsum("btd,cfd->btcf", o, p["gating"])
        y = jnp.einsum("btf,fd->btd", jax.nn.gelu(gate[:, :, 0]) * gate[:, :, 1], p["down"])
        return jnp.mean(y ** 2) + jnp.mean(kv[1] ** 2)
    return params, loss, jax.random.normal(jax.random.key(1), (2, 5, d))


def test_views_come_from_the_contraction():
    """With model=, einsum kernels of ranks 3 and 4 (fused [2, ffn, d] gating, [heads, hd, d] output, a scanned
    stack) get the view their contraction gives, equal to the hand-declared correct one, without on_axes;
    LoRA's trainable count is then r·(d_in + d_out) per matrix (per layer of a stack)."""
    params, loss, x = _gemma_like()
    plan = rp.plan([(r".*", rp.lora(4))], params, model=loss, example=(x, None))
    views = {leaf.path: leaf.view for leaf in plan.leaves}
    assert views == {"q": ((), (1,), (0, 2)), "kv": ((), (2,), (0, 1, 3)), "o": ((), (0, 1), (2,)),
                     "gating": ((), (2,), (0, 1)), "down": ((), (0,), (1,))}
    counts = dict(zip(plan.adapted(), plan.trainable_counts()))
    assert counts == {"q": 4 * (16 + 32), "kv": 4 * (16 + 32), "o": 4 * (32 + 16), "gating": 4 * (16 + 48),
                      "down": 4 * (24 + 16)}
    # the scanned decoder: the same views as its hand-declared rules, with no declaration at all
    params, loss, rules_for = D.make("linen_scan", CFG)
    declared = rp.plan(rules_for(rp.lora(4)), params)
    derived = rp.plan([(r"layers/.*/kernel", rp.lora(4))], params, model=loss, example=(BATCH, None))
    adapted = [leaf for leaf in derived.leaves if leaf.transform is not None]
    assert adapted and {leaf.path: leaf.view for leaf in adapted} == {
        leaf.path: leaf.view for leaf in declared.leaves if leaf.transform is not None}
    assert derived.trainable_counts() == declared.trainable_counts()
    # and the derived plan trains, routed, like autodiff
    frozen, trainable = derived.init(jax.random.key(1), params)
    trainable = perturb(trainable, jax.random.key(2), 0.05)
    ref_losses, ref, _ = _run(derived, loss, frozen, trainable, "autodiff")
    losses, got, step = _run(derived, loss, frozen, trainable, "auto")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert not step.routing.fallbacks()


def test_views_that_contradict_the_contraction_are_errors():
    params, loss, x = _gemma_like()
    # per-head adapters declared for the output projection, which the model contracts over (heads, hd)
    with pytest.raises(rp.ReparamError, match=r"'o'.*declares batch_axes=\(0,\).*contraction gives batch \(\), "
                                              r"in \(0, 1\), out \(2,\)"):
        rp.plan([(r"o", rp.on_axes(rp.lora(4), batch_axes=(0,)))], params, model=loss, example=(x, None))
    # a transposed view of the gating kernel
    with pytest.raises(rp.ReparamError, match=r"'gating'.*in_axes=\(0, 1\)"):
        rp.plan([(r"gating", rp.on_axes(rp.lora(4), in_axes=(0, 1), out_axes=(2,)))], params, model=loss,
                example=(x, None))

    def tied(p, x, rng):            # one kernel contracted over its first axis and over its second
        return jnp.mean((x @ p["down"].T) ** 2) + jnp.mean((jnp.ones((2, 24)) @ p["down"]) ** 2)
    with pytest.raises(rp.ReparamError, match=r"'down'.*two incompatible ways: .*contracted \(1,\).*contracted \(0,\)"):
        rp.plan([(r"down", rp.lora(4))], params, model=tied, example=(x, None))


def test_batch_axes_on_a_2d_weight_says_so():
    with pytest.raises(rp.ReparamError, match=r"batch_axes=\(0,\).*leaves 1 axis.*needs no batch_axes"):
        rp.plan([(r"w", rp.on_axes(rp.lora(2), batch_axes=(0,)))], {"w": jnp.ones((8, 6))})


def test_full_on_a_stacked_kernel():
    """rp.full() trains a stacked (or any-rank) kernel as is: no matrix view needed."""
    params, loss, _ = D.make("linen_scan", CFG)
    plan = rp.plan([(r"layers/.*", rp.full())], params)
    frozen, trainable = plan.init(jax.random.key(0), params)
    losses, _, _ = _run(plan, loss, frozen, trainable, "auto", steps=3)
    assert losses[-1] < losses[0]


def test_stacked_declared_once():
    """plan(..., stacked=regex) gives every matching kernel a leading layer axis: the same plan as on_axes per rule."""
    params, loss, rules_for = D.make("linen_scan", CFG)
    declared = rp.plan(rules_for(rp.lora(4)), params)
    once = rp.plan([(r"layers/(q|k|v|o|down)/kernel", rp.lora(4)),
                    (r"layers/gate_up/kernel", rp.on_axes(rp.lora(4), in_axes=(2,), out_axes=(1, 3)))],
                   params, stacked=r"layers/.*")
    assert [leaf.view for leaf in once.leaves] == [leaf.view for leaf in declared.leaves]
    assert once.trainable_counts() == declared.trainable_counts()


def test_peft_export_unstacks_stacked_kernels(tmp_path):
    """A scanned model's stacked LoRA exports one PEFT module per layer (module_map with a {layer} field) and
    loads back to the same stacked trainables; names that are not the base model's modules fail loudly."""
    params, loss, rules_for = D.make("linen_scan", CFG)
    plan = rp.plan([(r"layers/(q|o|down)/kernel", rp.lora(4, alpha=8))], params, stacked=r"layers/.*")
    frozen, trainable = plan.init(jax.random.key(1), params)
    trainable = perturb(trainable, jax.random.key(2), 0.05)
    names = {"layers/q/kernel": "model.layers.{layer}.self_attn.q_proj",
             "layers/o/kernel": "model.layers.{layer}.self_attn.o_proj", "layers/down/kernel": "model.layers.{layer}.mlp.down_proj"}
    torch_modules = [f"model.layers.{i}.{m}" for i in range(CFG.layers)
                     for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
    cfg = rp.interop.peft.export(plan, frozen, trainable, str(tmp_path / "a"), module_map=names,
                                 base_modules=["model", *torch_modules])
    assert sorted(cfg["target_modules"]) == sorted(torch_modules)
    back = rp.interop.peft.load(plan, frozen, str(tmp_path / "a"), module_map=names)
    for a, b in zip(jax.tree.leaves(trainable), jax.tree.leaves(back)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    with pytest.raises(rp.ReparamError, match=r"'layers/down/kernel'.*one torch module per layer.*'\{layer\}'"):
        rp.interop.peft.export(plan, frozen, trainable, str(tmp_path / "b"))
    nnx_names = {k: v.replace("model.layers.{layer}", "layers.{layer}") for k, v in names.items()}
    with pytest.raises(rp.ReparamError, match=r"6 of 6 exported modules are not modules of the base model.*no-op"):
        rp.interop.peft.export(plan, frozen, trainable, str(tmp_path / "c"), module_map=nnx_names,
                               base_modules=torch_modules)


def _stacked_buffers(form, **kw):
    """``(plan, shapes)``: the LoRA plan of the decoder written as ``form`` and the shapes (``"2,30,32"``) of
    every buffer its compiled step (``make_train_step(**kw)``) writes with a dynamic-update-slice -- a scan's
    stacked outputs."""
    params, loss, rules_for = D.make(form, CFG)
    plan = rp.plan(rules_for(rp.lora(4)), params)
    frozen, trainable = plan.init(jax.random.key(1), params)
    opt = optax.sgd(0.1)
    step = rp.train.make_train_step(plan, loss, opt, donate=False, **kw)
    hlo = step.lower(rp.train.init_state(trainable, opt, jax.random.key(0)), frozen, BATCH).compile().as_text()
    return plan, re.findall(r"= f32\[([\d,]+)\]\{[^}]*\} dynamic-update-slice\(", hlo)


def test_scanned_layers_keep_no_copy_of_the_base():
    """In a scan the structured op's residuals are not stacked per layer: the compiled LoRA step writes no
    slice of a weight's shape into a stacked buffer (without the op's checkpoint it writes one per kernel), with
    the scan body as the model wrote it (``scan_remat=None``) as well as recomputed."""
    for scan_remat in (None, rp.train.SCAN_REMAT):
        plan, stacked = _stacked_buffers("nnx_scan", scan_remat=scan_remat)
        weights = {",".join(map(str, leaf.shape)) for leaf in plan.leaves if leaf.transform is not None}
        assert weights and not (set(stacked) & weights), set(stacked) & weights


def test_scanned_layers_save_the_models_own_activations():
    """In a scan the structured op keeps the model's own activation as its residual, not a per-use copy
    rearranged to ``[tokens, d_in]``: q, k and v, which contract the same normed input, stack it once (or
    not at all where autodiff already keeps it). Before, each adapted kernel stacked its own ``[L, N, d_in]``
    copy per step. (The scan body as the model wrote it: ``scan_remat=None``.)"""
    _, stacked = _stacked_buffers("linen_scan", scan_remat=None)
    tokens = BATCH["ids"].size
    copies = [s for s in stacked if s.split(",")[:2] == [str(CFG.layers), str(tokens)]]
    assert stacked and not copies, copies


@pytest.mark.parametrize("form", ["linen_scan", "nnx_scan", "function"])
def test_recomputed_scan_bodies_stack_less(form):
    """With the default ``scan_remat`` a scan's body is recomputed in the backward: the compiled LoRA step
    stacks fewer elements per step than with the body as written (the adapters' inputs x among them), and
    every routed use says so in the record. A body the model already checkpoints (the function form's
    ``jax.checkpoint`` layer) keeps the model's policy: the same program, nothing said."""
    size = lambda shapes: sum(math.prod(map(int, s.split(","))) for s in shapes)
    _, as_written = _stacked_buffers(form, scan_remat=None)
    _, recomputed = _stacked_buffers(form)
    own = form == "function"
    assert size(recomputed) == size(as_written) if own else size(recomputed) < size(as_written), \
        (recomputed, as_written)
    params, loss, rules_for = D.make(form, CFG)
    plan = rp.plan(rules_for(rp.lora(4)), params)
    frozen, trainable = plan.init(jax.random.key(1), params)
    for scan_remat, said in ((rp.train.SCAN_REMAT, not own), (None, False)):
        step = rp.train.make_train_step(plan, loss, optax.sgd(0.1), donate=False, scan_remat=scan_remat)
        step.lower(rp.train.init_state(trainable, optax.sgd(0.1), jax.random.key(0)), frozen, BATCH)
        cells = [step.routing.cell(p) for p in plan.adapted()]
        assert cells and all(("scan body rematerialised" in c) == said for c in cells), cells


def test_a_retrace_replaces_the_record():
    """A step traced again for another batch shape reports the uses of the program it traced last, not both."""
    plan, loss, frozen, trainable = _setup("linen", "lora")
    opt = optax.sgd(0.1)
    step = rp.train.make_train_step(plan, loss, opt, donate=False)
    state = rp.train.init_state(trainable, opt, jax.random.key(0))
    step(state, frozen, BATCH)
    step(state, frozen, D.batch(CFG, n=2, t=10))
    cells = {step.routing.cell(p) for p in plan.adapted()}
    assert cells == {"1/1 routed (materialised @ 20 tok)"}, cells
