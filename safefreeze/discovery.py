"""Find adapter/base layer pairs by module and parameter names: the one matching rule.

A *site* is a module whose output is the adapted representation ``Y``. Its *base* is
either a child module whose output is the base representation ``X`` (PEFT's
``base_layer``) or, for bottleneck adapters that add to their input, the site's own input.
The site's *adapter parameters* are the parameters below it whose relative names match a
regex. Nothing here knows a model family; an :class:`AdapterPattern` describes a layout.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence

from torch import nn

# PEFT LoRA, DoRA (magnitude vector) and embedding LoRA; the named group is the adapter name.
_PEFT_LORA_PARAMS = r"lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)\.(?P<adapter>[^.]+)(?:\..+)?"
# PEFT keeps trainable copies of task heads here; they are never adapters.
_PEFT_HEAD_COPIES = r"(?:.*\.)?(?:modules_to_save|original_module)(?:\..*)?"
_SAMPLE = 8


class AdapterDiscoveryError(ValueError):
    """Raised when a pattern finds no adapter pair in a model."""


@dataclasses.dataclass(frozen=True)
class AdapterPattern:
    """Regular expressions that describe where adapters sit in a model.

    Every regex is matched with :func:`re.fullmatch`. The default describes PEFT LoRA
    (including DoRA and embedding LoRA).

    Example:
        A hand-written LoRA whose parts are ``base``, ``lora_down`` and ``lora_up``:

        >>> AdapterPattern(base=r"base", params=r"lora_(?:down|up)\\..+")  # doctest: +ELLIPSIS
        AdapterPattern(site='.*', base='base', params=...)

        A bottleneck adapter ``x + up(act(down(x)))`` scored against its own input:

        >>> AdapterPattern(site=r".*\\.adapter", base=None, params=r"(?:down|up)\\..+")
        ... # doctest: +ELLIPSIS
        AdapterPattern(site='.*\\\\.adapter', base=None, ...)
    """

    # Full names of modules that may be sites (their output is the adapted representation).
    site: str = r".*"
    # Name of the site's child whose output is the base representation; None = site input.
    base: str | None = r"base_layer"
    # Parameter names relative to the site; an optional group (?P<adapter>...) names the adapter.
    params: str = _PEFT_LORA_PARAMS
    # Full module names never considered (and nothing below them).
    exclude: str | None = _PEFT_HEAD_COPIES

    def __post_init__(self) -> None:
        for field in ("site", "base", "params", "exclude"):
            value = getattr(self, field)
            if value is None and field in ("base", "exclude"):
                continue
            try:
                re.compile(value)
            except (re.error, TypeError) as err:
                raise ValueError(f"AdapterPattern.{field} is not a valid regex: {value!r} ({err})") from None


@dataclasses.dataclass(frozen=True)
class AdapterPair:
    """One adapter: an adapted site and where its base representation comes from.

    Adapters are frozen in units (one adapter each, unless ``SAFEConfig.group_by`` groups them).
    """

    # Unique name: the site's module name, plus ":<adapter>" when a site holds several.
    name: str
    # Module whose output is the adapted representation Y.
    site: str
    # Module whose output is the base representation X; None = the site's input.
    base: str | None
    # Adapter name captured by the pattern (PEFT's "default"), or None.
    adapter: str | None
    # Full names of the adapter's parameters, as in model.named_parameters().
    param_names: tuple[str, ...]
    # Whether any adapter parameter requires grad; untrainable pairs are never scored.
    trainable: bool


def find_adapter_pairs(model: nn.Module, pattern: AdapterPattern | None = None) -> list[AdapterPair]:
    """Find every adapter/base pair in ``model``, in module order.

    A parameter belongs to the deepest site that claims it, so nested modules never
    claim the same adapter twice. Where a site holds several adapters and exposes PEFT's
    ``active_adapters``, only the active ones are pairs. Pairs whose adapter has no
    trainable parameter are returned with ``trainable=False`` and reported in a warning.

    Args:
        model: Any module (a PEFT model, a DDP wrapper, a hand-written network).
        pattern: Layout to look for; ``None`` means PEFT LoRA.

    Returns:
        The pairs, in the order of ``model.named_modules()``.

    Raises:
        AdapterDiscoveryError: If nothing matches, or base layers match but no adapter
            parameters do; the message names the pattern and shows module names.

    Example:
        >>> import torch.nn as nn
        >>> class LoRALinear(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.base = nn.Linear(4, 4)
        ...         self.lora_down, self.lora_up = nn.Linear(4, 2), nn.Linear(2, 4)
        >>> pattern = AdapterPattern(base="base", params=r"lora_(?:down|up)\\..+")
        >>> [p.name for p in find_adapter_pairs(nn.Sequential(LoRALinear(), LoRALinear()), pattern)]
        ['0', '1']
    """
    pattern = pattern or AdapterPattern()
    modules = [
        (name, module)
        for name, module in model.named_modules()
        if pattern.exclude is None or not re.fullmatch(pattern.exclude, name)
    ]
    claimed: set[int] = set()
    found: dict[str, list[AdapterPair]] = {}
    bases_seen: list[str] = []
    # Deepest first, so a parameter goes to the innermost site that matches it.
    for name, module in sorted(modules, key=lambda item: -_depth(item[0])):
        if not re.fullmatch(pattern.site, name):
            continue
        has_base, base = _find_base(name, module, pattern.base)
        if not has_base:
            continue
        if base is not None:
            bases_seen.append(base)
        groups = _claim_params(name, module, pattern.params, claimed)
        pairs = _pairs_for_site(name, module, base, groups)
        if pairs:
            found[name] = pairs
    order = {name: i for i, (name, _) in enumerate(modules)}
    pairs = [pair for site in sorted(found, key=order.__getitem__) for pair in found[site]]
    if not pairs:
        bases_seen.sort(key=lambda base: order[base.rpartition(".")[0]])
        raise _no_match_error(model, pattern, bases_seen, len(modules))
    idle = [p.name for p in pairs if not p.trainable]
    if idle:
        warnings.warn(
            f"{len(idle)} of {len(pairs)} adapter(s) have no trainable parameter and will not "
            f"be scored or frozen: {idle[:_SAMPLE]}",
            stacklevel=2,
        )
    return pairs


def _depth(name: str) -> int:
    return 0 if not name else name.count(".") + 1


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _find_base(name: str, module: nn.Module, base: str | None) -> tuple[bool, str | None]:
    """(whether the site has its base, the base's full name or None for the site's input)."""
    if base is None:
        return True, None
    children = [child for child, _ in module.named_children() if re.fullmatch(base, child)]
    if not children:
        return False, None
    if len(children) > 1:
        raise AdapterDiscoveryError(
            f"adapter pattern base={base!r} matched {len(children)} children of {name!r}: "
            f"{children}; expected exactly one base layer per site"
        )
    return True, _join(name, children[0])


def _claim_params(
    name: str, module: nn.Module, params: str, claimed: set[int]
) -> dict[str | None, list[tuple[str, nn.Parameter]]]:
    """Adapter parameters below ``module`` not yet claimed by a deeper site, by adapter."""
    groups: dict[str | None, list[tuple[str, nn.Parameter]]] = {}
    for rel, param in module.named_parameters():
        match = re.fullmatch(params, rel)
        if match is None or id(param) in claimed:
            continue
        groups.setdefault(match.groupdict().get("adapter"), []).append((_join(name, rel), param))
    for members in groups.values():
        claimed.update(id(p) for _, p in members)
    return groups


def _pairs_for_site(
    name: str,
    module: nn.Module,
    base: str | None,
    groups: dict[str | None, list[tuple[str, nn.Parameter]]],
) -> list[AdapterPair]:
    active = getattr(module, "active_adapters", None)
    if isinstance(active, str):
        active = [active]
    adapters = list(groups)
    if isinstance(active, Sequence) and None not in groups:
        # PEFT keeps inactive adapters in place; only what the forward uses is a pair.
        adapters = [a for a in adapters if a in active]
    return [
        AdapterPair(
            name=name if len(adapters) == 1 else f"{name}:{adapter}",
            site=name,
            base=base,
            adapter=adapter,
            param_names=tuple(n for n, _ in groups[adapter]),
            trainable=any(p.requires_grad for _, p in groups[adapter]),
        )
        for adapter in adapters
    ]


def _no_match_error(
    model: nn.Module, pattern: AdapterPattern, bases_seen: list[str], searched: int
) -> AdapterDiscoveryError:
    if bases_seen:
        site = bases_seen[0].rpartition(".")[0]
        owned = [rel for rel, _ in model.get_submodule(site).named_parameters()][:_SAMPLE]
        return AdapterDiscoveryError(
            f"adapter pattern {pattern} found {len(bases_seen)} base layer(s) (e.g. "
            f"{bases_seen[0]!r}) among {searched} modules but no adapter parameters matching "
            f"params={pattern.params!r}; parameters under {site!r} are {owned}; pass "
            "pattern=AdapterPattern(params=...) matching your adapter's parameter names"
        )
    names = [n for n, m in model.named_modules() if n and next(m.parameters(False), None) is not None]
    return AdapterDiscoveryError(
        f"adapter pattern {pattern} matched 0 of {searched} modules; first names with "
        f"parameters: {names[:_SAMPLE]}; pass pattern=AdapterPattern(site=..., base=..., "
        "params=...) describing your adapter layout"
    )
