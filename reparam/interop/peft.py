"""Hugging Face PEFT adapter directories <-> a plan's trainables: LoRA, rsLoRA, DoRA, PiSSA, VeRA, LoKr.

    from reparam.interop import peft as rpeft
    frozen, trainable0 = plan.init(key, params)
    ...                                                          # train
    rpeft.export(plan, frozen, trainable, "out/adapter", initial=trainable0)
    # torch: PeftModel.from_pretrained(torch_model, "out/adapter") gives the same outputs
    trainable = rpeft.load(plan, frozen, "out/adapter")         # a PEFT adapter -> our trainables

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (written with
``safetensors.numpy``; an export adds ``reparam_plan.json``, the exporting plan's
:meth:`~reparam.Plan.fingerprint`, which PEFT ignores and :func:`load` does not need: the
config and keys are checked one by one, and alpha is reconciled), with the key names of PEFT's ``save_pretrained``:
``base_model.model.<module>.lora_A.weight`` and so on. ``module_map`` names the torch module of
each adapted param path: a dict, a function, or ``None`` for :func:`default_module_name`
(``"params/enc/l0/kernel"`` -> ``"enc.l0"``). Our kernels are ``[d_in, d_out]`` and torch's
Linear weights ``[out, in]``, so every factor is transposed:

- LoRA / rsLoRA / EVA: ``lora_A.weight = Aᵀ``, ``lora_B.weight = Bᵀ``; ``lora_alpha`` (per module in
  ``alpha_pattern``, ranks in ``rank_pattern`` where they differ) makes PEFT's scaling ours.
- DoRA: the same plus ``lora_magnitude_vector = m`` and ``use_dora``.
- PiSSA / MiLoRA / CorDA, export only: PEFT loads onto the ORIGINAL ``W0``, and ours is
  ``W_res + s·A@B = W0 + s·(A@B − A0@B0)``, written exactly as a rank-``2r`` LoRA
  ``A' = [A, −A0]``, ``B' = [B; B0]`` with the same ``s``. ``A0``, ``B0`` are the factors
  ``plan.init`` returned: pass that trainable as ``initial``.
- VeRA: ``vera_lambda_d = d``, ``vera_lambda_b = b`` per module and the shared
  ``base_model.vera_A [r, in_max]``, ``base_model.vera_B [out_max, r]`` regenerated from the
  plan's key (:func:`reparam.random_basis.vera_basis`, ``fan_in = in_max``); a layer whose ``A``
  has its own fan-in scale (``vera(fan_in=None)`` on a narrower input) gets the ratio folded into
  ``vera_lambda_d``. Loading needs those bases in the file (``save_projection=True``) and equal to
  the plan's: torch-drawn bases cannot be regenerated here.
- LoKr: ``lokr_w1 = Aᵀ``, ``lokr_w1_a = A2ᵀ``, ``lokr_w1_b = A1ᵀ``, ``lokr_w2 = Bᵀ``,
  ``lokr_w2_a = B2ᵀ``, ``lokr_w2_b = B1ᵀ``; ``r``, ``alpha``, ``decompose_both``, ``decompose_factor``.

On a quantised base (:mod:`reparam.quant`; QLoRA) an export is the adapter alone, as PEFT's is for QLoRA: the
base is never read but for its shape, so the file is the one the same trainables on the dequantised base give;
load likewise. (A PiSSA export on a quantised base -- QPiSSA, its residual re-quantised -- is PEFT's conversion
too: ``W0 + s·(A@B − A0@B0)`` on the ORIGINAL ``W0``, which differs from ours by the residual's quantisation error.)

Loading rescales one factor where the file's scaling differs from the plan's (same ``ΔW``) and
raises :class:`~reparam.ReparamError` when the method, a rank or a key does not match the plan, when
``adapter_config.json`` is not a JSON object with the keys its ``peft_type`` needs (of the right types and
ranges), or when the weights file is damaged or holds integer or non-finite tensors. Export writes each
file beside its target and renames it into place: atomic, and a symlink there is replaced, not followed.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import secrets
from collections import Counter
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from reparam import views
from reparam.core import Reparam, ReparamError, check_confined, check_finite
from reparam.random_basis import vera_basis
from reparam.structure import LowRank

PyTree = Any
ModuleMap = Union[None, Mapping[str, str], Callable[[str], str]]

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PLAN_NAME = "reparam_plan.json"     # the exporting plan's fingerprint; PEFT reads only the two files above
PREFIX = "base_model.model."
LOKR_NAMES = {"A": "lokr_w1", "A1": "lokr_w1_b", "A2": "lokr_w1_a",     # ours -> PEFT (each transposed)
              "B": "lokr_w2", "B1": "lokr_w2_b", "B2": "lokr_w2_a"}
_KIND = {"lora": "lora", "rslora": "lora", "eva": "lora", "pissa": "principal", "milora": "principal",
         "corda": "principal", "dora": "dora", "vera": "vera", "lokr": "lokr"}
_PEFT_TYPE = {"lora": "LORA", "principal": "LORA", "dora": "LORA", "vera": "VERA", "lokr": "LOKR"}
_COMMON = {"task_type": None, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
           "layers_pattern": None, "revision": None}


def default_module_name(path: str) -> str:
    """``"params/enc/l0/kernel"`` -> ``"enc.l0"``: drops a leading ``params/`` and a trailing ``/kernel``,
    then ``/`` -> ``.``."""
    path = path.removeprefix("params/")
    return path.removesuffix("/kernel").replace("/", ".")


class _Entry(NamedTuple):
    index: Any            # the leaf's index in plan.leaves; (index, layer) for one layer of a stacked kernel
    path: str
    module: str           # torch module name, without "base_model.model."
    kind: str             # lora | principal | dora | vera | lokr
    transform: Reparam    # the rule's transform, on the [d_in, d_out] matrix view
    hparams: dict         # the transform's hyperparameters (transform.ident.hparams)
    frozen: dict          # the leaf's frozen entry (one layer's), "base" a ShapeDtypeStruct of its [d_in, d_out] view
    shape: tuple          # (d_in, d_out)


def _namer(module_map: ModuleMap) -> Callable[[str], str]:
    if module_map is None:
        return default_module_name
    if callable(module_map):
        return module_map
    if isinstance(module_map, Mapping):
        def lookup(path):
            if path not in module_map:
                raise ReparamError(f"module_map has no entry for the adapted parameter '{path}'; add "
                                   f"'{path}': '<torch module name>' (it has {sorted(module_map)[:3]}...) or pass "
                                   "a function path -> module name.")
            return module_map[path]
        return lookup
    raise ReparamError(f"module_map must be None, a dict or a function path -> module name; got {module_map!r}.")


def _entries(plan, frozen: PyTree, module_map: ModuleMap) -> list[_Entry]:
    """One entry per adapted leaf, with its torch module name; errors for leaves PEFT cannot hold."""
    namer, out, seen = _namer(module_map), [], {}
    for i, (leaf, f) in enumerate(zip(plan.leaves, plan.treedef.flatten_up_to(frozen))):
        if leaf.transform is None:
            continue
        t = plan.rules[leaf.rule][1]
        method, hp = t.ident.method, t.ident.hparams
        kind = _KIND.get(method)
        where = f"parameter '{leaf.path}' (rule {leaf.rule} {plan.rules[leaf.rule][0]!r} -> {t.name})"
        if kind is None:
            raise ReparamError(f"{where}: no PEFT format for this transform here; exportable: "
                               f"{sorted(_KIND)}. Give this parameter no rule in the plan you export, "
                               "or merge it into the base weights (plan.merge) instead.")
        # an adapter file holds the adapter alone (as PEFT's does for QLoRA): of the base, export and load read only
        # its matrix shape, so the entry holds it abstractly -- a quantised base is never dequantised, nor a
        # stacked one copied per layer
        m = leaf.shape if leaf.view is None else jax.eval_shape(
            lambda w: views.to_matrix(leaf.view, w), jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)).shape
        base = jax.ShapeDtypeStruct(tuple(m[-2:]), leaf.dtype)
        f = {k: v for k, v in f.items() if k != "base"}
        module = namer(leaf.path)
        if not isinstance(module, str) or not module:
            raise ReparamError(f"{where}: module_map gave {module!r}; it must give a torch module name "
                               "such as 'encoder.layer.0.attention.self.query'.")
        module = module.removeprefix(PREFIX)
        stack = leaf.view.batch if leaf.view is not None else ()
        if len(stack) > 1:
            raise ReparamError(f"{where}: {len(stack)} stacked axes {stack}; export unstacks one layer axis.")
        if stack and "{layer}" not in module:
            raise ReparamError(f"{where}: a stacked kernel ({leaf.shape[stack[0]]} layers on axis {stack[0]}) "
                               f"exports one torch module per layer; module_map gave {module!r}, which needs a "
                               "'{layer}' field, e.g. {'" + leaf.path + "': 'model.layers.{layer}.<module>'}.")
        layers = range(leaf.shape[stack[0]]) if stack else [None]
        for layer in layers:
            name = module if layer is None else module.format(layer=layer)
            if name in seen:
                raise ReparamError(f"module_map sends both '{seen[name]}' and '{leaf.path}' to the torch module "
                                   f"'{name}'; each adapted parameter (and layer) needs its own module.")
            seen[name] = leaf.path
            fl = {**(f if layer is None else jax.tree_util.tree_map(lambda a: a[layer], f)), "base": base}
            out.append(_Entry(i if layer is None else (i, layer), leaf.path if layer is None else
                              f"{leaf.path}[{layer}]", name, kind, t, hp, fl, tuple(fl["base"].shape)))
    if not out:
        raise ReparamError("the plan adapts no parameter: nothing to export or load; add rules such as "
                           "(r'.*/kernel', rp.lora(8)).")
    return out


def _unit(x):
    """Zeros shaped like ``x`` with a 1 in the first entry."""
    u = np.zeros(x.shape, np.float32)
    u.flat[0] = 1.0
    return u


def _scale(e: _Entry, like: dict) -> float:
    """The transform's scale ``s`` (``ΔW = s·A@B`` or ``s·A⊗B``), read off the transform on unit factors."""
    probe = {k: _unit(v) for k, v in like.items()}
    if e.kind == "dora":        # V = base + s·A@B with V[:, 0] = (s, 1, 0, ...): W[0, 0] / W[1, 0] = s
        if e.shape[0] < 2:
            raise ReparamError(f"parameter '{e.path}': DoRA export needs d_in >= 2, got {e.shape}.")
        base = np.zeros(e.shape, np.float32)
        base[1, 0] = 1.0
        w = e.transform.apply({**e.frozen, "base": base}, {**probe, "m": np.ones(like["m"].shape, np.float32)})
        return float(w[0, 0] / w[1, 0])
    st = e.transform.structure(e.frozen, probe)
    return float((st.l if isinstance(st, LowRank) else st.a).reshape(-1)[0])


def _nice(x: float):
    """``x`` rounded to 6 significant digits (an int when whole) where that moves it by < 1e-6 relative."""
    y = float(f"{x:.6g}")
    if abs(y - x) > 1e-6 * abs(x):
        return x
    return int(y) if y == int(y) else y


def _rank(e: _Entry) -> int:
    if "r" not in e.hparams:
        raise ReparamError(f"parameter '{e.path}': the transform {e.transform.name!r} has no rank r among its "
                           f"hyperparameters {sorted(e.hparams)}; export lora / dora / vera / lokr rules.")
    return int(e.hparams["r"])


def _patterns(modules: list[str], values: list) -> tuple[Any, dict]:
    """The most common value as the global one; the others per module (PEFT's rank/alpha_pattern)."""
    common = Counter(values).most_common(1)[0][0]
    return common, {m: v for m, v in zip(modules, values) if v != common}


def _per_module(cfg: dict, module: str, what: str, default_key: str):
    for key, v in (cfg.get(what) or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return v
    return cfg[default_key]


def _np(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32))


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a fresh file beside ``path``, then ``os.replace`` onto it: a reader sees the old file or
    the new, never half of one, and a symlink at ``path`` is replaced, never written through."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:                # a fresh random name (created with the umask's mode, as a plain write would be)
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --- what adapter_config.json must hold: (test, what it must be) per key, the keys each peft_type needs ---------
def _is_int(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


_RANK = (lambda v: _is_int(v, 1), "an int >= 1")
_ALPHA = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
          "a finite number > 0")
_BOOL = (lambda v: isinstance(v, bool), "true or false")


def _pattern(rule):
    return (lambda v: isinstance(v, dict) and all(isinstance(k, str) and rule[0](x) for k, x in v.items()),
            f"an object of module-name patterns -> {rule[1]}")


_CONFIG_RULES = {
    "r": _RANK, "lora_alpha": _ALPHA, "alpha": _ALPHA, "rank_pattern": _pattern(_RANK),
    "alpha_pattern": _pattern(_ALPHA), "use_rslora": _BOOL, "use_dora": _BOOL, "decompose_both": _BOOL,
    "decompose_factor": (lambda v: v == -1 or _is_int(v, 1), "-1 or an int >= 1"),
    "fan_in_fan_out": (lambda v: v is False, "false (reparam reads torch Linear [out, in] weights, not Conv1D's)"),
}
_REQUIRED = {"LORA": ("r", "lora_alpha"), "VERA": ("r",), "LOKR": ("r", "alpha")}


def _read_config(path: str) -> dict:
    """``adapter_config.json``, checked: a JSON object with a ``peft_type`` reparam loads, its required keys, and
    every key reparam reads of the right type and range; each error names the file, the key and the fix."""
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReparamError(f"{path} is not readable JSON ({type(e).__name__}: {e}); a PEFT adapter's "
                           f"{CONFIG_NAME} is the JSON object save_pretrained writes: save the adapter again "
                           "(PEFT's save_pretrained, or rp.interop.peft.export).") from None
    if not isinstance(cfg, dict):
        raise ReparamError(f"{path} holds a JSON {type(cfg).__name__}, not an object of PEFT config keys "
                           "(peft_type, r, lora_alpha, ...); save the adapter again (PEFT's save_pretrained, or "
                           "rp.interop.peft.export).")
    peft_type = cfg.get("peft_type")
    if peft_type not in _REQUIRED:
        raise ReparamError(f"{path}: peft_type={peft_type!r}; reparam loads {sorted(_REQUIRED)} adapters: use "
                           "PEFT itself for another kind, or fix peft_type if the file is one of these.")
    for key in _REQUIRED[peft_type]:
        if cfg.get(key) is None:
            near = difflib.get_close_matches(key, [k for k in cfg if k not in _CONFIG_RULES], n=2, cutoff=0.6)
            raise ReparamError(f"{path} has no {key!r}, which a {peft_type} adapter needs"
                               + (f" (it has {near}: a misspelling?)" if near else "")
                               + f"; add \"{key}\": <value> as PEFT's save_pretrained writes it.")
    bad = [f"{k}={cfg[k]!r} must be {what}" for k, (ok, what) in _CONFIG_RULES.items()
           if cfg.get(k) is not None and not ok(cfg[k])]
    if bad:
        raise ReparamError(f"{path}: " + "; ".join(bad) + ". Fix the file (or re-save the adapter with PEFT).")
    return cfg


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    """``adapter_model.safetensors`` as numpy arrays: a damaged file, an integer tensor or a non-finite one is an
    error naming the file (and the key)."""
    from safetensors.numpy import load_file
    try:
        tensors = load_file(path)
    except Exception as e:           # safetensors raises its own SafetensorError, OSError, ValueError ...
        raise ReparamError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is damaged "
                           "or not an adapter_model.safetensors: export or save the adapter again.") from None
    for key, x in tensors.items():
        if not np.issubdtype(x.dtype, np.floating):
            raise ReparamError(f"'{key}' in {path} has dtype {x.dtype}; adapter weights are floats: the file "
                               "is not a PEFT adapter of this kind (save it again with float weights).")
        check_finite(x, f"'{key}' in {path}", "the adapter diverged or the file is damaged; export a finite one.")
    return tensors


# --- export ------------------------------------------------------------------------------------

def _export_lora(entries, trs, initial, config):
    kinds = {e.kind for e in entries}
    if "dora" in kinds and kinds != {"dora"}:
        raise ReparamError(f"one PEFT LoRA adapter is DoRA for all modules or for none (use_dora is global); "
                           f"this plan mixes {sorted(kinds)}: export them from separate plans.")
    rslora = all(e.hparams.get("rslora") is True or e.transform.ident.method == "rslora" for e in entries)
    tensors, ranks, alphas = {}, [], []
    init_tr = None
    if "principal" in kinds:
        if initial is None:
            p = next(e.path for e in entries if e.kind == "principal")
            raise ReparamError(f"parameter '{p}' uses a principal init (PiSSA/MiLoRA/CorDA): PEFT loads the "
                               "adapter onto the original W0, so export needs the initial factors A0, B0; pass "
                               "initial=<the trainable plan.init returned> (plan.init is deterministic in "
                               "its key).")
        init_tr = initial
    for e in entries:
        tr = trs[e.index]
        a, b = _np(tr["A"]), _np(tr["B"])
        s = _scale(e, tr)
        if e.kind == "principal":
            a0, b0 = _np(init_tr[e.index]["A"]), _np(init_tr[e.index]["B"])
            if a0.shape != a.shape or b0.shape != b.shape:
                raise ReparamError(f"parameter '{e.path}': initial factors {a0.shape}, {b0.shape} do not match "
                                   f"the trainable ones {a.shape}, {b.shape}; pass the trainable of the same "
                                   "plan's init.")
            a, b = np.concatenate([a, -a0], 1), np.concatenate([b, b0], 0)
        r = a.shape[1]
        tensors[f"{PREFIX}{e.module}.lora_A.weight"] = _np(a.T)
        tensors[f"{PREFIX}{e.module}.lora_B.weight"] = _np(b.T)
        if e.kind == "dora":
            tensors[f"{PREFIX}{e.module}.lora_magnitude_vector"] = _np(tr["m"])
        ranks.append(r)
        alphas.append(_nice(s * (math.sqrt(r) if rslora else r)))
    modules = [e.module for e in entries]
    r, rank_pattern = _patterns(modules, ranks)
    alpha, alpha_pattern = _patterns(modules, alphas)
    config.update(peft_type="LORA", r=r, lora_alpha=alpha, rank_pattern=rank_pattern,
                  alpha_pattern=alpha_pattern, use_rslora=rslora, use_dora=kinds == {"dora"}, lora_dropout=0.0,
                  bias="none", fan_in_fan_out=False, init_lora_weights=True)
    return tensors


def _vera_shared(entries, r: int):
    """The shared ``(vera_A [r, in_max], vera_B [out_max, r])`` and per-module ``λ_d`` factors
    ``√(in_max/fan)``."""
    keys = {tuple(np.asarray(jax.random.key_data(e.frozen["key"])).tolist()) for e in entries}
    if len(keys) > 1:
        raise ReparamError("PEFT's VeRA shares one pair of bases across all modules, and these VeRA rules use "
                           f"{len(keys)} different keys (seeds); use one seed for every rule.")
    in_max, out_max = max(e.shape[0] for e in entries), max(e.shape[1] for e in entries)
    a, b = vera_basis(entries[0].frozen["key"], in_max, out_max, r, fan_in=in_max)
    ratios = [math.sqrt(in_max / int(e.hparams.get("fan_in", e.shape[0]))) for e in entries]
    return _np(a.T), _np(b.T), ratios


def _export_vera(entries, trs, config):
    ranks = {trs[e.index]["d"].shape[0] for e in entries}
    if len(ranks) > 1:
        raise ReparamError(f"PEFT's VeRA has one rank for all modules; this plan uses {sorted(ranks)}.")
    r = ranks.pop()
    va, vb, ratios = _vera_shared(entries, r)
    tensors = {"base_model.vera_A": va, "base_model.vera_B": vb}
    for e, ratio in zip(entries, ratios):
        tensors[f"{PREFIX}{e.module}.vera_lambda_d"] = _np(np.asarray(trs[e.index]["d"], np.float64) * ratio)
        tensors[f"{PREFIX}{e.module}.vera_lambda_b"] = _np(trs[e.index]["b"])
    config.update(peft_type="VERA", r=r, projection_prng_key=0, save_projection=True, vera_dropout=0.0,
                  d_initial=0.1, fan_in_fan_out=False, bias="none", init_weights=True)
    return tensors


def _lokr_layout(entries):
    layout = {(int(e.hparams.get("factor", -1)), e.hparams.get("decompose_both") is True) for e in entries}
    if len(layout) > 1:
        raise ReparamError(f"PEFT's LoKr has one decompose_factor and decompose_both for all modules; this "
                           f"plan uses (factor, decompose_both) = {sorted(layout)}.")
    return layout.pop()


def _export_lokr(entries, trs, config):
    factor, both = _lokr_layout(entries)
    tensors, ranks, alphas = {}, [], []
    for e in entries:
        tr = trs[e.index]
        r = _rank(e)
        tensors.update({f"{PREFIX}{e.module}.{LOKR_NAMES[k]}": _np(_np(v).T) for k, v in tr.items()})
        ranks.append(r)
        alphas.append(_nice(_scale(e, tr) * r))
    modules = [e.module for e in entries]
    r, rank_pattern = _patterns(modules, ranks)
    alpha, alpha_pattern = _patterns(modules, alphas)
    config.update(peft_type="LOKR", r=r, alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                  decompose_both=both, decompose_factor=factor, rank_dropout=0.0, module_dropout=0.0,
                  use_effective_conv2d=False, init_weights=True)
    return tensors


def _per_entry(plan, entries, tree) -> dict:
    """Each entry's trainable dict: the leaf's, or one layer's slice of a stacked leaf's."""
    flat = plan.treedef.flatten_up_to(tree)
    return {e.index: flat[e.index] if isinstance(e.index, int) else
            jax.tree_util.tree_map(lambda a: a[e.index[1]], flat[e.index[0]]) for e in entries}


def export(plan, frozen: PyTree, trainable: PyTree, directory: str, *, module_map: ModuleMap = None,
           initial: Optional[PyTree] = None, base_model_name_or_path: Optional[str] = None,
           base_modules=None) -> dict:
    """Writes the plan's adapters as a PEFT adapter directory; returns the config written.

    ``PeftModel.from_pretrained(torch_model, directory)`` then computes what ``plan.apply``
    does, with ``torch_model`` holding the ORIGINAL ``W0``. ``initial``: the trainable
    ``plan.init`` returned, needed for PiSSA-like inits (see the module docstring). One
    PEFT method per directory: LoRA (with PiSSA / EVA), DoRA, VeRA or LoKr.

    A stacked kernel (``nn.scan`` layers) is written as one module per layer: its ``module_map`` name
    holds a ``{layer}`` field (``"model.layers.{layer}.self_attn.q_proj"``). ``base_modules``: the torch
    model's module names (``[n for n, _ in model.named_modules()]``); every exported module must be one of
    them, else an error lists those that are not -- PEFT itself would load such an adapter as a no-op.
    """
    from safetensors.numpy import save_file

    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ReparamError(f"export: {directory} is a file, not a directory; give export a directory (new or "
                           f"existing) to write {CONFIG_NAME}, {WEIGHTS_NAME} and {PLAN_NAME} into.")
    entries = _entries(plan, frozen, module_map)
    if base_modules is not None:
        known = set(base_modules)
        missing = [e.module for e in entries if e.module not in known]
        if missing:
            near = difflib.get_close_matches(missing[0], sorted(known), n=3, cutoff=0.3)
            raise ReparamError(f"{len(missing)} of {len(entries)} exported modules are not modules of the base "
                               f"model, e.g. {missing[:3]} (close: {near}); PEFT would load this adapter as a "
                               "silent no-op. Fix module_map so that each adapted path names the torch module, "
                               "e.g. {'layers/0/q/kernel': 'model.layers.0.self_attn.q_proj'}.")
    types = {_PEFT_TYPE[e.kind] for e in entries}
    if len(types) > 1:
        raise ReparamError(f"one PEFT adapter holds one method; this plan maps to {sorted(types)} "
                           f"({sorted({e.transform.name for e in entries})}); export from one plan per method.")
    trs = _per_entry(plan, entries, trainable)
    init_trs = None if initial is None else _per_entry(plan, entries, initial)
    config = {**_COMMON, "base_model_name_or_path": base_model_name_or_path,
              "target_modules": [e.module for e in entries]}
    kind = types.pop()
    if kind == "LORA":
        tensors = _export_lora(entries, trs, init_trs, config)
    elif kind == "VERA":
        tensors = _export_vera(entries, trs, config)
    else:
        tensors = _export_lokr(entries, trs, config)
    os.makedirs(directory, exist_ok=True)

    def write_json(obj, indent):
        def write(tmp):
            with open(tmp, "x") as fh:
                json.dump(obj, fh, indent=indent, sort_keys=True)
        return write
    _write_atomic(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _write_atomic(os.path.join(directory, CONFIG_NAME), write_json(config, 2))
    _write_atomic(os.path.join(directory, PLAN_NAME), write_json(plan.fingerprint(), 1))
    return config


# --- load --------------------------------------------------------------------------------------

def load(plan, frozen: PyTree, directory: str, *, module_map: ModuleMap = None) -> PyTree:
    """Reads a PEFT adapter directory into the plan's trainable pytree (LoRA, rsLoRA, DoRA, VeRA, LoKr).

    ``plan.apply(frozen, load(plan, frozen, d))`` computes what ``PeftModel.from_pretrained(m, d)``
    does on the torch model whose weights ``frozen`` holds. Factors are rescaled where the file's
    ``alpha/r`` differs from the plan's. Every adapted parameter must find its module's keys and
    every key in the file a parameter; ranks must match the plan's rules.
    """
    cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    check_confined(directory, "PEFT adapter")
    for p in (cfg_path, w_path):
        if not os.path.exists(p):
            raise ReparamError(f"{p} does not exist: a PEFT adapter directory holds {CONFIG_NAME} and "
                               f"{WEIGHTS_NAME} (PEFT's save_pretrained, safetensors format); give load the "
                               "directory that save_pretrained or rp.interop.peft.export wrote.")
    cfg = _read_config(cfg_path)
    tensors = _read_tensors(w_path)
    entries = _entries(plan, frozen, module_map)
    peft_type = cfg.get("peft_type")
    use_dora = bool(cfg.get("use_dora", False))
    for e in entries:
        want = {"lora": "LORA", "dora": "LORA", "vera": "VERA", "lokr": "LOKR"}.get(e.kind)
        ok = want == peft_type and (peft_type != "LORA" or use_dora == (e.kind == "dora"))
        if e.kind == "principal" or e.transform.ident.method == "eva":
            raise ReparamError(f"parameter '{e.path}' uses {e.transform.name}, whose init depends on W0 or data: "
                               "a PEFT adapter loads only into rp.lora / rp.dora / rp.vera / rp.lokr rules; use "
                               "one of those for this path.")
        if not ok:
            got = f"{peft_type}{' (use_dora)' if use_dora else ''}"
            fix = {"LORA": "rp.dora(r)" if use_dora else "rp.lora(r)", "VERA": "rp.vera(r)",
                   "LOKR": "rp.lokr(r)"}.get(peft_type, "a matching transform")
            raise ReparamError(f"{cfg_path} is a {got} adapter but the plan adapts '{e.path}' with "
                               f"{e.transform.name}; use {fix} on this path.")
    trs, used = {}, set()

    def get(e, name):
        key = f"{PREFIX}{e.module}.{name}"
        if key not in tensors:
            mods = sorted({k[len(PREFIX):].rsplit(".", 2)[0] for k in tensors if k.startswith(PREFIX)})
            raise ReparamError(f"key '{key}' is missing from {w_path}: the plan adapts '{e.path}' as torch module "
                               f"'{e.module}', and the file has modules {mods[:6]}; fix module_map (or the plan's "
                               "rules) so that each adapted path names a module of the file.")
        used.add(key)
        return np.asarray(tensors[key], np.float32)

    def check(e, key, got, want):
        if tuple(got) != tuple(want):
            raise ReparamError(f"'{PREFIX}{e.module}.{key}' has shape {tuple(got)} in the file, but the plan's "
                               f"{e.transform.name} on '{e.path}' {e.shape} needs {tuple(want)} (torch layout): "
                               "the rank (or factor layout) differs; use the file's r in this rule (config r="
                               f"{cfg.get('r')}, rank_pattern={cfg.get('rank_pattern') or {}}).")

    key0 = jax.random.key(0)
    vera = None
    for e in entries:
        like = jax.eval_shape(e.transform.init, key0, jax.ShapeDtypeStruct(e.shape, jnp.float32))[1]
        s_plan = None if e.kind == "vera" else _scale(e, like)
        if e.kind in ("lora", "dora"):
            a, b = get(e, "lora_A.weight"), get(e, "lora_B.weight")
            check(e, "lora_A.weight", a.shape, like["A"].shape[::-1])
            check(e, "lora_B.weight", b.shape, like["B"].shape[::-1])
            r = a.shape[0]
            if int(_per_module(cfg, e.module, "rank_pattern", "r")) != r:
                raise ReparamError(f"{cfg_path}: r={_per_module(cfg, e.module, 'rank_pattern', 'r')} for module "
                                   f"'{e.module}' (r, rank_pattern), but its lora_A.weight in {w_path} has rank "
                                   f"{r}: the config and the weights disagree (PEFT would not load them); fix r or "
                                   "rank_pattern in the config, or export the adapter again.")
            alpha = _per_module(cfg, e.module, "alpha_pattern", "lora_alpha")
            s_file = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
            tr = {"A": a.T * (s_file / s_plan), "B": b.T}
            if e.kind == "dora":
                name = "lora_magnitude_vector"
                m = get(e, name) if f"{PREFIX}{e.module}.{name}" in tensors else get(e, name + ".weight")
                check(e, name, m.shape, like["m"].shape)
                tr["m"] = m
        elif e.kind == "vera":
            if vera is None:
                vera = _load_vera_bases(entries, like["d"].shape[0], tensors, used, w_path)
            ratio = vera[e.index]
            d, b = get(e, "vera_lambda_d"), get(e, "vera_lambda_b")
            check(e, "vera_lambda_d", d.shape, like["d"].shape)
            check(e, "vera_lambda_b", b.shape, like["b"].shape)
            tr = {"d": np.asarray(d, np.float64) / ratio, "b": b}
        else:
            tr = {}
            for k, v in like.items():
                x = get(e, LOKR_NAMES[k])
                check(e, LOKR_NAMES[k], x.shape, v.shape[::-1])
                tr[k] = x.T
            r = int(_per_module(cfg, e.module, "rank_pattern", "r"))
            s_file = _per_module(cfg, e.module, "alpha_pattern", "alpha") / r
            first = "A" if "A" in tr else "A1"
            tr[first] = tr[first] * (s_file / s_plan)
        trs[e.index] = tr
    extra = sorted(set(tensors) - used)
    if extra:
        raise ReparamError(f"{w_path} has {len(extra)} keys no adapted parameter reads, e.g. {extra[:4]}; "
                           "add rules for those modules to the plan, or fix module_map (paths -> module names "
                           f"like {[e.module for e in entries[:2]]}).")
    dtype = plan.trainable_dtype or jnp.float32
    out = []
    for i in range(len(plan.leaves)):
        layers = sorted(k for k in trs if isinstance(k, tuple) and k[0] == i)
        if layers:                  # a stacked kernel: its layers' modules, stacked back
            trs[i] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[trs[k] for k in layers])
        out.append(jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), trs[i]) if i in trs else {})
    return plan.treedef.unflatten(out)


def _load_vera_bases(entries, r, tensors, used, w_path):
    """Checks the file's shared VeRA bases against the plan's; returns ``{leaf index: √(in_max/fan)}``."""
    names = ("base_model.vera_A", "base_model.vera_B")
    if not all(n in tensors for n in names):
        raise ReparamError(f"{w_path} has no {names[0]} / {names[1]}: the adapter was saved with "
                           "save_projection=False, so its bases are torch's, regenerated from a torch seed that "
                           "JAX cannot reproduce; save it with VeraConfig(save_projection=True) and bases equal to "
                           "rp.random_basis.vera_basis (e.g. an adapter exported by reparam).")
    va, vb, ratios = _vera_shared(entries, r)
    fa, fb = (np.asarray(tensors[n], np.float32) for n in names)
    used.update(names)
    for n, ours, theirs in ((names[0], va, fa[:, :va.shape[1]]), (names[1], vb, fb[:vb.shape[0]])):
        if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-5, atol=1e-6):
            raise ReparamError(f"{n} in {w_path} ({tuple(theirs.shape)}) is not the basis the plan's VeRA key "
                               f"regenerates {tuple(ours.shape)}: PEFT drew it with torch, and our VeRA cannot use "
                               "other bases. Only adapters whose bases equal rp.random_basis.vera_basis (e.g. "
                               "exported by reparam) load exactly; merge this one in PEFT (merge_and_unload).")
    return {e.index: ratio for e, ratio in zip(entries, ratios)}
