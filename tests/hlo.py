"""Reading compiled HLO text (``step.lower(...).compile().as_text()``): the checks the tests and benchmarks make
on what XLA compiled -- dots (is there an ``xᵀg``?) and all-gathers (is a base weight gathered?)."""
from __future__ import annotations

import math
import re

from reparam.plan import Plan


def dot_shapes(hlo: str):
    """(result shape, lhs contracting dim sizes) of every dot in an HLO module's text."""
    dims = lambda txt: tuple(int(v) for v in txt.split(",") if v)
    shapes = dict(re.findall(r"(%[\w.\-]+) = \w+\[([\d,]*)\]", hlo))
    out = []
    for line in hlo.splitlines():
        m = re.search(r"= \w+\[([\d,]*)\]\S* dot\((%[\w.\-]+), ", line)
        c = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        if m and c and m.group(2) in shapes:
            lhs = dims(shapes[m.group(2)])
            out.append((dims(m.group(1)), tuple(lhs[i] for i in dims(c.group(1)))))
    return out


_AG = re.compile(r"=\s*(\([^=]*?\)|\S+)\s+all-gather(-start)?\(")
_SHAPE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


def all_gathers(hlo_text: str) -> list[tuple[int, ...]]:
    """Result shapes of the all-gather ops in compiled HLO text (``step.lower(...).compile().as_text()``),
    one per gathered array (a combined all-gather has several; an async ``all-gather-start`` lists its
    operands, then its results)."""
    out = []
    for m in _AG.finditer(hlo_text):
        shapes = [tuple(int(d) for d in s.split(",") if d) for s in _SHAPE.findall(m.group(1))]
        out += shapes[len(shapes) // 2:] if m.group(2) else shapes
    return out


def gathered_weights(hlo_text: str, plan: Plan) -> list[str]:
    """Paths of the plan's reparameterised kernels (a transform other than ``rp.full``) that some
    all-gather in ``hlo_text`` rebuilds in full, whole or one layer of a stack: an all-gather whose result
    has the kernel's shape or its matrix view's ``[*batch, d_in, d_out]``, or, for a stacked kernel, the dims
    (in any order, size-1 dims aside) of one layer of it or of one layer's ``[d_in, d_out]``. Empty when the step never gathers a base
    weight. Shapes are all the HLO tells: an activation or gradient with the same dims counts too."""
    key = lambda shape: tuple(sorted(n for n in shape if n != 1))
    shapes = all_gathers(hlo_text)
    gathered = set(shapes) | {key(s) for s in shapes}
    hits = []
    for leaf in plan.leaves:
        if leaf.transform is None or leaf.view is None or leaf.transform.ident.method == "full":
            continue
        v = leaf.view
        stack = tuple(leaf.shape[a] for a in v.batch)
        matrix = (math.prod(leaf.shape[a] for a in v.inp), math.prod(leaf.shape[a] for a in v.out))
        layer = tuple(n for a, n in enumerate(leaf.shape) if a not in v.batch)
        forms = {tuple(leaf.shape), stack + matrix} | ({key(layer), key(matrix)} if stack else set())
        if forms & gathered:
            hits.append(leaf.path)
    return hits
