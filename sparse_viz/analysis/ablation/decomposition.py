"""Rank-1 component decompositions of linear projections: an SVD baseline, or SPD-style factors.

A decomposition of `nn.Linear` (y = x W^T + b, W: (d_out, d_in)) into C rank-1 components is a
pair of factors in SPD's layout:

    V: (d_in, C),  U: (C, d_out),   y = ((x @ V) * mask) @ U + b

so component c maps x to (x . V[:, c]) U[c] and, with mask = 1, W^T = V @ U exactly when the
decomposition is faithful. Optionally each component has a causal importance ci in [0, 1]
(C,), used by the stochastic and adversarial modes (mask = ci + (1 - ci) * u).

- `svd_decomposition`: W = sum_c s_c u_c v_c^T (V = v * s, U = u^T). Labelled "svd" so no
  report mistakes it for a learned (SPD) decomposition: it is a baseline, exact by construction.
- `load_factors`: SPD-style factors from a `.safetensors` / `.pt` file, keys
  `<module path>.V`, `<module path>.U` and optionally `<module path>.ci`, where the module path
  is a `named_modules()` name (`model.layers.3.self_attn.q_proj`) or SPD's form with dashes
  (`components.model-layers-3-self_attn-q_proj.V`). Every shape is checked against the model.
- `parse_component_spec` names components ("3.o_proj:0,2"); `component_masks` runs the model
  with chosen modules replaced by their masked component forward.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sparse_viz.analysis.index_spec import parse_index_spec
from sparse_viz.errors import UserInputError
from sparse_viz.pretrained.adapter import ArchitectureAdapter

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class ComponentFactors:
    """C rank-1 components of one linear map.

    Attributes:
        V: (d_in, C) read-in directions.
        U: (C, d_out) write-out directions.
        ci: (C,) causal importance in [0, 1], or None (treated as 1: always fully active).
    """

    V: torch.Tensor
    U: torch.Tensor
    ci: torch.Tensor | None = None

    @property
    def n_components(self) -> int:
        return self.V.shape[1]

    def weight(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The (d_out, d_in) weight the (masked) components reconstruct."""
        V = self.V if mask is None else self.V * mask  # (d_in, C)
        return (V @ self.U).T

    def apply(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masked component forward without bias.

        Args:
            x: (..., d_in).
            mask: broadcastable to (..., C): (C,), (B, 1, C) or (B, T, C); None = all ones.
        Returns:
            (..., d_out) = ((x @ V) * mask) @ U.
        """
        inner = x @ self.V.to(x.dtype)  # (..., C)
        if mask is not None:
            inner = inner * mask.to(x.dtype)
        return inner @ self.U.to(x.dtype)  # (..., d_out)


@dataclass
class Decomposition:
    """Component factors per module path, and where they came from ("svd" or a file path)."""

    factors: dict[str, ComponentFactors]
    source: str
    label: str = ""
    relative_error: dict[str, float] = field(default_factory=dict)  # ||W - (VU)^T|| / ||W||

    def __getitem__(self, path: str) -> ComponentFactors:
        return self.factors[path]


def linear_at(model: nn.Module, path: str) -> nn.Linear:
    """The nn.Linear at `path` (a `named_modules()` name).

    Raises:
        UserInputError: no such module, or not a linear layer.
    """
    try:
        module = model.get_submodule(path)
    except AttributeError:
        # Name the valid forms: the short one, and the full paths of layer 0's linear modules
        # (listing every layer's would make the one-line error hundreds of names long).
        linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        examples = [name for name in linear if re.search(r"(^|\.)0\.", name)] or linear[:8]
        raise UserInputError(
            f"no module {path!r} in the model: give LAYER.PROJ with PROJ one of {', '.join(PROJECTIONS)} "
            f"(e.g. 0.o_proj), or the full path of one of its {len(linear)} linear modules, "
            f"e.g. {', '.join(examples)}") from None
    if not isinstance(module, nn.Linear):
        raise UserInputError(f"module {path!r} is a {type(module).__name__}, not a linear projection")
    return module


def projection_path(model: nn.Module, layer: int, projection: str) -> str:
    """The `named_modules()` name of layer `layer`'s q/k/v/o projection.

    Raises:
        UserInputError: unknown projection or layer out of range.
    """
    if projection not in PROJECTIONS:
        raise UserInputError(f"unknown projection {projection!r}: expected one of {', '.join(PROJECTIONS)}")
    adapter = ArchitectureAdapter.for_model(model)
    if not 0 <= layer < adapter.n_layers:
        raise UserInputError(f"layer {layer} out of range (model has {adapter.n_layers} layers)")
    target = getattr(adapter.attention(layer), projection)
    for name, module in model.named_modules():
        if module is target:
            return name
    raise AssertionError("projection not found among named_modules")  # pragma: no cover


_SHORT = re.compile(r"^(\d+)\.([qkvo]_proj)$")


def parse_component_spec(spec: str, model: nn.Module, decomposition: Decomposition | None = None,
                         n_components: Mapping[str, int] | None = None) -> tuple[str, list[int]]:
    """Parse "LAYER.PROJ:IDX" (e.g. "3.o_proj:0,2,5-7", "0.q_proj:all") or "MODULE_PATH:IDX".

    Args:
        n_components: C per module path (to check indices); taken from `decomposition` if given,
            else min(d_in, d_out) (the SVD rank).
    Returns:
        (module path, sorted component indices).
    Raises:
        UserInputError: malformed spec, unknown module, component index >= C.
    """
    if ":" not in spec:
        raise UserInputError(f"malformed component spec {spec!r}: expected LAYER.PROJ:INDICES, e.g. 3.o_proj:0,2,5-7")
    module, _, indices = spec.rpartition(":")
    short = _SHORT.match(module.strip())
    path = projection_path(model, int(short.group(1)), short.group(2)) if short else module.strip()
    linear = linear_at(model, path)
    if decomposition is not None:
        if path not in decomposition.factors:
            raise UserInputError(f"component spec {spec!r}: the decomposition has no factors for {path!r}")
        C = decomposition[path].n_components
    elif n_components is not None and path in n_components:
        C = n_components[path]
    else:
        C = min(linear.weight.shape)
    chosen = parse_index_spec(indices, C, what=f"components of {path} (C={C})")
    return path, list(range(C)) if chosen is None else chosen


def _relative_error(W: torch.Tensor, factors: ComponentFactors) -> float:
    W64 = W.detach().double()
    return float((W64 - factors.weight().double()).norm() / W64.norm().clamp_min(1e-30))


@torch.no_grad()
def svd_decomposition(model: nn.Module, paths: Iterable[str]) -> Decomposition:
    """SVD baseline: W = sum_c s_c u_c v_c^T for each module, C = min(d_in, d_out).

    Computed in float64, stored in the weight's dtype. Components are in SVD order
    (component 0 has the largest singular value); ci is None (all 1).
    """
    factors, errors = {}, {}
    for path in paths:
        W = linear_at(model, path).weight  # (d_out, d_in)
        u, s, vh = torch.linalg.svd(W.detach().double(), full_matrices=False)  # (d_out,C) (C,) (C,d_in)
        f = ComponentFactors(V=(vh.T * s).to(W.dtype), U=u.T.contiguous().to(W.dtype))  # (d_in,C), (C,d_out)
        factors[path] = f
        errors[path] = _relative_error(W, f)
    return Decomposition(factors, source="svd", label="SVD baseline (exact reconstruction; not a learned SPD decomposition)",
                         relative_error=errors)


def _module_name(key: str, model: nn.Module) -> str:
    """Map a checkpoint key prefix to a module path of `model` (dotted or SPD's dashed form)."""
    for prefix in ("components.", "_components.", "model.components."):
        if key.startswith(prefix) and not _has_module(model, key):
            key = key[len(prefix):]
    if not _has_module(model, key) and "-" in key:
        key = key.replace("-", ".")
    return key


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def load_factors(path: str | Path, model: nn.Module, modules: Sequence[str] | None = None) -> Decomposition:
    """Load SPD-style component factors and check them against `model`.

    Args:
        path: `.safetensors` or `.pt`/`.pth` file with `<module>.V` (d_in, C), `<module>.U`
            (C, d_out) and optional `<module>.ci` (C,) tensors.
        model: the model the factors decompose.
        modules: keep only these module paths (None = all in the file).
    Returns:
        Decomposition (source = the file path, relative reconstruction error per module).
    Raises:
        UserInputError: unreadable file, no factors, a V without U (or the reverse), a module
            that is not in the model, or any shape mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"decomposition file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is bad input
        raise UserInputError(f"cannot read decomposition file {str(path)!r}: {type(error).__name__}") from error
    if not isinstance(tensors, dict):
        raise UserInputError(f"decomposition file {str(path)!r} does not hold a dict of tensors")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        prefix, _, leaf = str(key).rpartition(".")
        if leaf in ("V", "U", "ci") and isinstance(value, torch.Tensor):
            grouped.setdefault(_module_name(prefix, model), {})[leaf] = value
    if not grouped:
        raise UserInputError(f"decomposition file {str(path)!r} has no '<module>.V' / '<module>.U' tensors")
    if modules is not None:
        missing = [m for m in modules if m not in grouped]
        if missing:
            raise UserInputError(f"decomposition file {str(path)!r} has no factors for {missing[0]!r}")
        grouped = {m: grouped[m] for m in modules}
    factors, errors = {}, {}
    for name, parts in sorted(grouped.items()):
        if "V" not in parts or "U" not in parts:
            raise UserInputError(f"decomposition of {name!r}: needs both V and U, found {', '.join(sorted(parts))}")
        linear = linear_at(model, name)
        V, U = parts["V"], parts["U"]
        d_out, d_in = linear.weight.shape
        if V.dim() != 2 or V.shape[0] != d_in:
            raise UserInputError(f"decomposition of {name!r}: V has shape {tuple(V.shape)}, expected ({d_in}, C)")
        if U.dim() != 2 or U.shape[1] != d_out:
            raise UserInputError(f"decomposition of {name!r}: U has shape {tuple(U.shape)}, expected (C, {d_out})")
        if U.shape[0] != V.shape[1]:
            raise UserInputError(f"decomposition of {name!r}: V has {V.shape[1]} components but U has {U.shape[0]}")
        ci = parts.get("ci")
        if ci is not None:
            if tuple(ci.shape) != (V.shape[1],):
                raise UserInputError(f"decomposition of {name!r}: ci has shape {tuple(ci.shape)}, expected ({V.shape[1]},)")
            if not bool(((ci >= 0) & (ci <= 1)).all()):
                raise UserInputError(f"decomposition of {name!r}: ci values must lie in [0, 1]")
        weight = linear.weight
        f = ComponentFactors(V=V.to(weight.device, weight.dtype), U=U.to(weight.device, weight.dtype),
                             ci=None if ci is None else ci.to(weight.device, torch.float32))
        factors[name] = f
        errors[name] = _relative_error(weight, f)
    return Decomposition(factors, source=str(path), label=f"loaded factors ({path.name})", relative_error=errors)


def save_factors(decomposition: Decomposition, path: str | Path) -> Path:
    """Write factors in the format `load_factors` reads (safetensors; `<module>.V/.U/.ci`)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, f in decomposition.factors.items():
        tensors[f"{name}.V"] = f.V.detach().cpu().contiguous()
        tensors[f"{name}.U"] = f.U.detach().cpu().contiguous()
        if f.ci is not None:
            tensors[f"{name}.ci"] = f.ci.detach().cpu().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


@contextlib.contextmanager
def component_masks(model: nn.Module, decomposition: Decomposition, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Replace each listed module's output by its masked component forward while open.

    Args:
        decomposition: factors per module path.
        masks: module path -> mask broadcastable to (B, T, C): (C,), (B, 1, C) or (B, T, C).
    """
    handles = []

    def replace(path: str, mask: torch.Tensor):
        factors = decomposition[path]

        def hook(module, args, out):
            x = args[0]  # (B, T, d_in); a sweep's batch may hold only the first B rows (sweep.py)
            y = factors.apply(x, mask[: x.shape[0]] if mask.dim() == 3 else mask)  # (B, T, d_out)
            return y if module.bias is None else y + module.bias
        return hook

    try:
        for path, mask in masks.items():
            handles.append(linear_at(model, path).register_forward_hook(replace(path, mask)))
        yield
    finally:
        for handle in handles:
            handle.remove()
