"""reparam: a model's weights as pure functional reparameterisations, ``W = f(frozen, trainable)``.

The public API, as a table of contents:

  core        Reparam(init, apply) pair; additive(); combinators add, in_basis, full, frozen; Basis
  structure   ΔW in factored form, a protocol: LowRank, Kron, Sparse, Sum, InBasis, Scaled (dense, matvec,
              costs, pullback from (x, g)); right-multiplicative W = (W0 + inner)·R
  views       on_axes(): matrix view of >2-D kernels and stacked layers; derive(): views from the model's contractions
  plan        plan(rules, params, model=, stacked=) -> Plan with init / apply / merge / penalty / summary;
              check (trees against the plan, at trace time), fingerprint (saved with checkpoints and exports)
  lowrank     lora (rsLoRA), dora, lora_xs (LoRA-XS, LoRA-SB), dylora
  svd         pissa (exact / randomized SVD), milora, svfit, sorsa, corda, eva (+ eva_allocate)
  wavelet     bases wavelet_basis (periodized Haar/db2-4, multi-level), dct_basis, fourier_basis;
              waveft, wara, fourierft (all in_basis compositions)
  kronecker   krona, lokr, compacter (S_i shared across layers), soka; kron_matmul (vec trick)
  random_basis vera, nola, randlora (bases regenerated from a key held in frozen)
  sparse      random (SLTrain/PaCA), magnitude (SaRA), sensitivity (SPT), lt_sft + diffs (LT-SFT), structured (S²FT)
  compose     merge_adapters (task arithmetic, composable SFT), weight_deltas, orthogonality_penalty
  quant       quantised frozen bases: QArray, quantize(params, "int8"|"nf4"|"q4_1"|"q8_0", where=), dequantize,
              from_gguf_tensor (GGUF Q4_1 / Q8_0 blocks as they are); plan.init keeps bases quantised
  loftq       loftq(plan, key, params, fmt, iters=T): a quantised base whose low-rank adapter absorbs its error
              (LoftQ; iters=1: INT2.1's low-rank error correction)
  calibrate   capture_inputs (layer-input covariance), capture_grads (full-FT gradient)
  matmul      the hot path: structured_matmul (one custom VJP over every structure), cotangent_barrier,
              norm_barriers (after linen LayerNorm/RMSNorm)
  route       routing any model's contractions of adapted weights to the hot path (jaxpr re-evaluation:
              scan, NNX, einsum, remat, nested jit); Routing, the record a traced step keeps
  train       TrainState, init_state, make_train_step (matmul="auto"|..., remat, scan_remat), make_eval_step,
              use_huge_pages (CPU: 2 MiB pages for XLA's per-step temporaries)
  sharding    mesh("data:4,model:2"), DEFAULT_RULES, specs (base rules -> derived adapter/opt specs),
              put, shard_batch, global_batch, initialize (jax.distributed), make_train_step
  checkpoint  orbax manager, save, restore (config- and plan-checked, damaged files named, reshards onto `like`)
  interop     peft.export / peft.load: Hugging Face PEFT adapter directories (LoRA, rsLoRA, DoRA, PiSSA, VeRA, LoKr)
"""
from reparam import (checkpoint, compose, interop, kronecker, matmul, quant, random_basis, route, sharding, sparse,
                     structure, train)
from reparam.calibrate import capture_grads, capture_inputs
from reparam.compose import merge_adapters, orthogonality_penalty, weight_deltas
from reparam.core import Basis, Reparam, ReparamError, add, additive, frozen, full, in_basis
from reparam.kronecker import compacter, factorization, kron_matmul, krona, lokr, soka
from reparam.linalg import truncated_svd
from reparam.loftq import loftq
from reparam.lowrank import dora, dylora, lora, lora_xs
from reparam.plan import Plan, plan
from reparam.random_basis import nola, randlora, vera
from reparam.svd import corda, eva, eva_allocate, milora, pissa, sorsa, svfit
from reparam.views import on_axes
from reparam.wavelet import dct_basis, fourier_basis, fourierft, wara, wavelet_basis, waveft

__version__ = "0.1.0"

__all__ = [
    "Reparam", "ReparamError", "add", "additive", "frozen", "full", "on_axes", "plan", "Plan",
    "lora", "dora", "lora_xs", "dylora", "pissa", "milora", "svfit", "sorsa", "corda", "eva",
    "eva_allocate", "capture_inputs", "capture_grads", "truncated_svd", "train", "checkpoint",
    "krona", "lokr", "compacter", "soka", "factorization", "kron_matmul", "kronecker",
    "sparse", "compose", "Basis", "in_basis", "wavelet_basis", "dct_basis", "fourier_basis", "waveft", "wara",
    "fourierft", "merge_adapters", "weight_deltas", "orthogonality_penalty",
    "vera", "nola", "randlora", "random_basis", "quant", "loftq", "matmul", "route", "structure", "sharding", "interop",
]
