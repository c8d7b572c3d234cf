"""PEFT adapter files (reparam.interop.peft) as an adversary writes them: a bad adapter_config.json, a damaged or
integer safetensors file, a symlinked target. Each is refused with an error naming the file, the key and the fix
(no KeyError, no silent cast); export writes atomically and never through a symlink. No torch needed."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import reparam as rp
from reparam.interop import peft as rpeft

KEY_A = "base_model.model.enc.l0.lora_A.weight"


@pytest.fixture
def adapter(tmp_path):
    """``(plan, frozen, trainable, directory)``: a LoRA adapter exported from a one-layer plan."""
    params = {"params": {"enc": {"l0": {"kernel": jax.random.normal(jax.random.key(0), (6, 5))}}}}
    plan = rp.plan([(r".*/kernel", rp.lora(2, alpha=4))], params)
    frozen, trainable = plan.init(jax.random.key(1), params)
    trainable = jax.tree_util.tree_map(lambda x: x + 0.1, trainable)
    directory = tmp_path / "adapter"
    rpeft.export(plan, frozen, trainable, str(directory))
    return plan, frozen, trainable, directory


def _edit_config(directory, **changes):
    path = directory / rpeft.CONFIG_NAME
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not ...}))


@pytest.mark.parametrize("changes, message", [
    ({"lora_alpha": ...}, r"has no 'lora_alpha', which a LORA adapter needs; add \"lora_alpha\""),
    ({"lora_alpha": ..., "lora_alpah": 4}, r"has no 'lora_alpha'.*\(it has \['lora_alpah'\]: a misspelling\?\)"),
    ({"r": ...}, r"has no 'r', which a LORA adapter needs"),
    ({"r": 0}, r"r=0 must be an int >= 1"),
    ({"r": -3}, r"r=-3 must be an int >= 1"),
    ({"r": True}, r"r=True must be an int >= 1"),
    ({"r": "8"}, r"r='8' must be an int >= 1"),
    ({"lora_alpha": -4}, r"lora_alpha=-4 must be a finite number > 0"),
    ({"lora_alpha": 0}, r"lora_alpha=0 must be a finite number > 0"),
    ({"lora_alpha": math.nan}, r"lora_alpha=nan must be a finite number > 0"),
    ({"lora_alpha": math.inf}, r"lora_alpha=inf must be a finite number > 0"),
    ({"alpha_pattern": {"enc.l0": -2}}, r"alpha_pattern=\{'enc.l0': -2\} must be an object of module-name "
                                        r"patterns -> a finite number > 0"),
    ({"rank_pattern": {"enc.l0": 0}}, r"rank_pattern=.* must be an object of module-name patterns -> an int >= 1"),
    ({"use_rslora": "yes"}, r"use_rslora='yes' must be true or false"),
    ({"fan_in_fan_out": True}, r"fan_in_fan_out=True must be false \(reparam reads torch Linear"),
    ({"peft_type": ...}, r"peft_type=None; reparam loads \['LOKR', 'LORA', 'VERA'\] adapters: use PEFT itself for "
                         r"another kind, or fix peft_type"),
    ({"peft_type": "IA3"}, r"peft_type='IA3'; reparam loads"),
    ({"r": 4}, r"r=4 for module 'enc.l0' \(r, rank_pattern\), but its lora_A.weight in .*adapter_model.safetensors "
               r"has rank 2: the config and the weights disagree .*fix r or rank_pattern in the config"),
    ({"r": 4, "rank_pattern": {"enc.l0": 3}}, r"r=3 for module 'enc.l0'.*has rank 2"),
    ({"r": 0, "lora_alpha": -1}, r"r=0 must be an int >= 1; lora_alpha=-1 must be a finite number > 0\. Fix the file"),
], ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None)
def test_a_bad_config_names_the_file_and_the_key(adapter, changes, message):
    plan, frozen, _, directory = adapter
    _edit_config(directory, **changes)
    with pytest.raises(rp.ReparamError, match=rf"{directory / rpeft.CONFIG_NAME}.*{message}"):
        rpeft.load(plan, frozen, str(directory))


@pytest.mark.parametrize("content, message", [
    (b"{not json", r"is not readable JSON \(JSONDecodeError"),
    (b"", r"is not readable JSON \(JSONDecodeError"),
    (b"\xff\xfe\x00garbage", r"is not readable JSON \(UnicodeDecodeError"),
    (b"[1, 2]", r"holds a JSON list, not an object of PEFT config keys"),
    (b'"LORA"', r"holds a JSON str, not an object"),
], ids=["truncated", "empty", "binary", "list", "string"])
def test_a_config_that_is_not_a_json_object_names_the_file(adapter, content, message):
    plan, frozen, _, directory = adapter
    (directory / rpeft.CONFIG_NAME).write_bytes(content)
    with pytest.raises(rp.ReparamError, match=rf"{directory / rpeft.CONFIG_NAME} {message}.*save the adapter again "
                                              r"\(PEFT's save_pretrained, or rp.interop.peft.export\)"):
        rpeft.load(plan, frozen, str(directory))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _garbage(path):
    path.write_bytes(b"\x00" * 64)


def _header(path):
    data = bytearray(path.read_bytes())
    data[8:12] = b"}}}}"
    path.write_bytes(bytes(data))


def _as_int(path):
    tensors = load_file(str(path))
    tensors[KEY_A] = (tensors[KEY_A] * 100).astype(np.int32)
    save_file(tensors, str(path))


def _nan(path):
    tensors = load_file(str(path))
    tensors[KEY_A] = np.full_like(tensors[KEY_A], np.nan)
    save_file(tensors, str(path))


@pytest.mark.parametrize("damage, message", [
    (_truncate, r"is not a readable safetensors file \(.*\); it is damaged or not an adapter_model.safetensors"),
    (_garbage, r"is not a readable safetensors file"),
    (_header, r"is not a readable safetensors file"),
    (_as_int, rf"'{KEY_A}' in .* has dtype int32; adapter weights are floats"),
    (_nan, rf"'{KEY_A}' in .* has 12 non-finite entries \(inf/NaN\).*export a finite one"),
], ids=lambda f: getattr(f, "__name__", None))
def test_a_damaged_weights_file_names_its_path(adapter, damage, message):
    plan, frozen, _, directory = adapter
    path = directory / rpeft.WEIGHTS_NAME
    damage(path)
    with pytest.raises(rp.ReparamError, match=message) as err:
        rpeft.load(plan, frozen, str(directory))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("name", [rpeft.CONFIG_NAME, rpeft.WEIGHTS_NAME, rpeft.PLAN_NAME])
def test_export_replaces_a_symlink_instead_of_writing_through_it(adapter, tmp_path, name):
    plan, frozen, trainable, directory = adapter
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    (directory / name).unlink()
    (directory / name).symlink_to(outside)
    rpeft.export(plan, frozen, trainable, str(directory))
    assert outside.read_text() == "not yours"
    assert not (directory / name).is_symlink() and (directory / name).is_file()
    loaded = rpeft.load(plan, frozen, str(directory))
    np.testing.assert_allclose(plan.merge(frozen, loaded)["params"]["enc"]["l0"]["kernel"],
                               plan.merge(frozen, trainable)["params"]["enc"]["l0"]["kernel"], rtol=1e-6)


def test_export_is_atomic(adapter, monkeypatch):
    """A write that fails midway leaves the previous file whole and no temporary file behind."""
    plan, frozen, trainable, directory = adapter
    before = (directory / rpeft.CONFIG_NAME).read_bytes()

    def fail(obj, fh, **kw):
        fh.write('{"peft_type": "LO')
        raise OSError("disk full")
    monkeypatch.setattr(rpeft.json, "dump", fail)
    with pytest.raises(OSError, match="disk full"):
        rpeft.export(plan, frozen, jax.tree_util.tree_map(jnp.zeros_like, trainable), str(directory))
    assert (directory / rpeft.CONFIG_NAME).read_bytes() == before
    assert sorted(os.listdir(directory)) == sorted([rpeft.CONFIG_NAME, rpeft.WEIGHTS_NAME, rpeft.PLAN_NAME])


@pytest.mark.parametrize("name", [rpeft.CONFIG_NAME, rpeft.WEIGHTS_NAME])
def test_load_reads_nothing_outside_the_adapter_directory(adapter, tmp_path, name):
    """An adapter file that is a symlink to a file elsewhere is refused by load, naming the link."""
    plan, frozen, trainable, directory = adapter
    outside = tmp_path / f"elsewhere_{name}"
    outside.write_bytes((directory / name).read_bytes())
    (directory / name).unlink()
    (directory / name).symlink_to(outside)
    with pytest.raises(rp.ReparamError, match=rf"{directory / name} is a symlink to {outside}, outside"):
        rpeft.load(plan, frozen, str(directory))


def test_the_config_rank_is_read_per_module(adapter):
    """A config whose r differs from the weights' rank only where rank_pattern overrides it loads as before."""
    plan, frozen, trainable, directory = adapter
    _edit_config(directory, r=4, rank_pattern={"enc.l0": 2})
    loaded = rpeft.load(plan, frozen, str(directory))
    np.testing.assert_allclose(plan.merge(frozen, loaded)["params"]["enc"]["l0"]["kernel"],
                               plan.merge(frozen, trainable)["params"]["enc"]["l0"]["kernel"], rtol=1e-6)


def test_export_onto_a_file_and_load_from_nowhere_name_the_path(adapter, tmp_path):
    plan, frozen, trainable, _ = adapter
    target = tmp_path / "adapter_here"
    target.write_text("a file")
    with pytest.raises(rp.ReparamError, match=rf"export: {target} is a file, not a directory; give export a "
                                              r"directory"):
        rpeft.export(plan, frozen, trainable, str(target))
    assert target.read_text() == "a file"
    with pytest.raises(rp.ReparamError, match=rf"{tmp_path / 'nowhere' / rpeft.CONFIG_NAME} does not exist: .*give "
                                              r"load the directory that save_pretrained or rp.interop.peft.export "
                                              r"wrote"):
        rpeft.load(plan, frozen, str(tmp_path / "nowhere"))
