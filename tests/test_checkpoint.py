"""Orbax checkpoints: bit-identical resume, refusal of another config, and survival of a kill during a save."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reparam as rp


def _setup():
    params = {"l1": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))},
              "l2": {"kernel": jax.random.normal(jax.random.key(1), (6, 3)), "bias": jnp.zeros((3,))}}
    plan = rp.plan([(r"l1/kernel", rp.lora(2)), (r"l2/.*", rp.full())], params)
    frozen, trainable = plan.init(jax.random.key(2), params)
    opt = optax.adam(1e-2)

    def loss_fn(p, batch, rng):
        noise = 0.01 * jax.random.normal(rng, batch.shape)          # uses the rng: resumes must restore it
        return jnp.mean((jnp.tanh((batch + noise) @ p["l1"]["kernel"]) @ p["l2"]["kernel"] + p["l2"]["bias"]) ** 2)

    step = rp.train.make_train_step(plan, loss_fn, opt)
    x = jax.random.normal(jax.random.key(3), (16, 8))
    fresh = lambda: rp.train.init_state(plan.init(jax.random.key(2), params)[1], opt, jax.random.key(4))
    return step, frozen, x, fresh


CONFIG = {"lr": 0.01, "method": "lora", "rank": 2, "output_dir": "/somewhere"}


def test_resume_is_bit_identical(tmp_path):
    step, frozen, x, fresh = _setup()
    straight = fresh()
    for _ in range(6):
        straight, _ = step(straight, frozen, x)

    mgr = rp.checkpoint.manager(str(tmp_path / "ck"), max_to_keep=2)
    assert rp.checkpoint.restore(mgr, like=fresh(), config=CONFIG) is None
    state = fresh()
    for i in range(3):
        state, _ = step(state, frozen, x)
        rp.checkpoint.save(mgr, state, CONFIG)
    assert mgr.all_steps() == [2, 3]                                  # keeps the newest two
    resumed = rp.checkpoint.restore(mgr, like=fresh(), config={**CONFIG, "output_dir": "/elsewhere"})
    assert int(resumed.step) == 3
    for _ in range(3):
        resumed, _ = step(resumed, frozen, x)
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)


def test_another_config_is_refused(tmp_path):
    step, frozen, x, fresh = _setup()
    mgr = rp.checkpoint.manager(str(tmp_path / "ck"))
    rp.checkpoint.save(mgr, fresh(), CONFIG)
    with pytest.raises(rp.ReparamError, match=r"another config: lr: saved 0.01, now 0.1; rank: saved 2, now 4"):
        rp.checkpoint.restore(mgr, like=fresh(), config={**CONFIG, "lr": 0.1, "rank": 4})


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    step, frozen, x, fresh = _setup()
    directory = tmp_path / "ck"
    mgr = rp.checkpoint.manager(str(directory))
    state, _ = step(fresh(), frozen, x)
    rp.checkpoint.save(mgr, state, CONFIG)
    # what a SIGKILL during orbax's save of step 2 leaves behind: an unfinished temporary directory
    partial = directory / "2.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(os.urandom(64))
    mgr = rp.checkpoint.manager(str(directory))                         # a new process after the kill
    assert mgr.latest_step() == 1
    got = rp.checkpoint.restore(mgr, like=fresh(), config=CONFIG)
    np.testing.assert_array_equal(got.trainable["l1"]["kernel"]["A"], state.trainable["l1"]["kernel"]["A"])


def _lora_state(t, rank_l2=None):
    params = {"l1": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))},
              "l2": {"kernel": jax.random.normal(jax.random.key(1), (6, 3)), "bias": jnp.zeros((3,))}}
    plan = rp.plan([(r"l1/kernel", t), (r"l2/.*", rp.full())], params)
    state = rp.train.init_state(plan.init(jax.random.key(2), params)[1], optax.adam(1e-2), jax.random.key(4))
    return plan, state


@pytest.mark.parametrize("now, message", [
    (rp.pissa(2), r"'l1/kernel' transform.hparams.alpha: saved 4, now '<absent>'; "
                  r"'l1/kernel' transform.method: saved 'lora', now 'pissa'"),
    (rp.lora(2, alpha=8), r"'l1/kernel' transform.hparams.alpha: saved 4, now 8"),
    (rp.lora(4, alpha=4), r"'l1/kernel' trainable.A: saved 'float32\[8, 2\]', now 'float32\[8, 4\]'"),
    (rp.lora(2, alpha=4, rslora=True), r"'l1/kernel' transform.method: saved 'lora', now 'rslora'"),
], ids=["pissa", "alpha", "rank", "rslora"])
def test_a_checkpoint_of_another_plan_is_refused_even_under_the_same_config(tmp_path, now, message):
    """The plan's fingerprint (each adapted leaf's method, hyperparameters, shapes) is saved with the state; a
    restore into another plan names the parameter, the field, and the saved and current values."""
    plan, state = _lora_state(rp.lora(2, alpha=4))
    mgr = rp.checkpoint.manager(str(tmp_path / "ck"))
    rp.checkpoint.save(mgr, state, CONFIG, plan=plan)
    assert rp.checkpoint.restore(mgr, like=state, config=CONFIG, plan=plan) is not None
    other, like = _lora_state(now)
    with pytest.raises(rp.ReparamError, match=r"ck \(step 0\) was written by another plan: " + message
                       + r".*Restore it with the plan of the run that wrote it"):
        rp.checkpoint.restore(mgr, like=like, config=CONFIG, plan=other)


def test_a_checkpoint_without_fingerprint_restores_with_a_warning(tmp_path):
    plan, state = _lora_state(rp.lora(2, alpha=4))
    mgr = rp.checkpoint.manager(str(tmp_path / "ck"))
    rp.checkpoint.save(mgr, state, CONFIG)                       # as before fingerprints (no plan=)
    with pytest.warns(UserWarning, match=r"holds no plan fingerprint .* restoring it without checking"):
        got = rp.checkpoint.restore(mgr, like=state, config=CONFIG, plan=plan)
    assert int(got.step) == 0
    # its arrays are still checked against the run's state: a rank-4 plan's state does not fit
    _, like = _lora_state(rp.lora(4, alpha=4))
    with pytest.raises(rp.ReparamError, match=r"does not fit this run's state \(expected: this run's, got: the "
                                              r"checkpoint's\): 'opt_state/0/mu/l1/kernel/A': expected "
                                              r"float32\[8, 4\], got float32\[8, 2\].*written by another plan"):
        rp.checkpoint.restore(mgr, like=like, config=CONFIG)


@pytest.mark.parametrize("name, how", [(n, h) for n in ("config/metadata", "plan/metadata", "state/_METADATA",
                                                         "state/array_metadatas/process_0", "state/d/*",
                                                         "state/manifest.ocdbt") for h in ("truncated", "garbage")])
def test_a_damaged_file_is_reported_as_damaged_by_name(tmp_path, name, how):
    plan, state = _lora_state(rp.lora(2, alpha=4))
    directory = tmp_path / "ck"
    mgr = rp.checkpoint.manager(str(directory))
    rp.checkpoint.save(mgr, state, CONFIG, plan=plan)
    mgr.close()
    (path,) = (directory / "0").glob(name)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if how == "truncated" else bytes(b ^ 0x5A for b in data))
    shown = str(path) if "*" not in name and not name.endswith(".ocdbt") else str(directory / "0" / "state")
    with pytest.raises(rp.ReparamError, match=rf"checkpoint {directory}/0 is damaged: .*{shown}.*"
                                              r"Restore an earlier step .* or delete"):
        rp.checkpoint.restore(rp.checkpoint.manager(str(directory)), like=state, config=CONFIG, plan=plan)


def test_restore_reads_nothing_outside_the_checkpoint_directory(tmp_path):
    """A file of the checkpoint replaced by a symlink to a file outside it (here: a config that would match) is
    refused, naming the link; nothing is restored."""
    plan, state = _lora_state(rp.lora(2, alpha=4))
    directory = tmp_path / "ck"
    mgr = rp.checkpoint.manager(str(directory))
    rp.checkpoint.save(mgr, state, CONFIG, plan=plan)
    mgr.close()
    (path,) = (directory / "0").glob("config/metadata")
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside)
    with pytest.raises(rp.ReparamError, match=rf"{path} is a symlink to {outside}, outside {directory}"):
        rp.checkpoint.restore(rp.checkpoint.manager(str(directory)), like=state, config=CONFIG, plan=plan)
