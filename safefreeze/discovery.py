"""Find adapter/base layer pairs by module and parameter names: the one matching rule.

A *site* is a module whose output is the adapted representation ``Y``. Its *base* is
either a child module whose output is the base representation ``X`` (PEFT's
``base_layer``) or, for bottleneck adapters that add to their input, the site's own input.
The site's *adapter parameters* are the parameters below it whose relative names match a
regex. Nothing here knows a model family; an :class:`AdapterPattern` describes a layout,
and a list of patterns describes a model that mixes layouts.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

# Parameter stems of the PEFT tuners found by default: PEFT stores each as "<stem>.<adapter>".
_PEFT_STEMS = (
    # LoRA, embedding LoRA, DoRA's magnitude vector, AdaLoRA's singular values
    "lora_A",
    "lora_B",
    "lora_E",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    # LoHa
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    # LoKr
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    # IA3
    "ia3_l",
)
# PEFT keeps trainable copies of task heads here; they are never adapters.
_PEFT_HEAD_COPIES = r"(?:.*\.)?(?:modules_to_save|original_module)(?:\..*)?"
# A PEFT adapter parameter's relative name: "<stem>.<adapter>", maybe with a suffix such as ".weight".
_STEM_NAME = re.compile(r"(?P<stem>[A-Za-z_]\w*)\.(?P<adapter>[^.]+)(?:\..+)?")
_SAMPLE = 8


def _peft_params(stems: Iterable[str]) -> str:
    """The ``params`` regex of PEFT parameters ``<stem>.<adapter>[.<suffix>]`` for ``stems``."""
    return rf"(?:{'|'.join(stems)})\.(?P<adapter>[^.]+)(?:\..+)?"


_PEFT_PARAMS = _peft_params(_PEFT_STEMS)
_PEFT_PARAMS_FORM = re.compile(r"\(\?:(?P<stems>[\w|]+)\)" + re.escape(r"\.(?P<adapter>[^.]+)(?:\..+)?"))


class AdapterDiscoveryError(ValueError):
    """Raised when a pattern finds no adapter pair in a model, or patterns contradict each other."""


@dataclasses.dataclass(frozen=True)
class AdapterPattern:
    """Regular expressions that describe where adapters sit in a model.

    Every regex is matched with :func:`re.fullmatch`. The default describes the PEFT tuners
    that add to (or scale) their base layer's output: LoRA (with DoRA, embedding LoRA and
    AdaLoRA), LoHa, LoKr and IA3. Pass a list of patterns where a model mixes layouts.

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
    params: str = _PEFT_PARAMS
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


@dataclasses.dataclass
class _Found:
    """What one pattern found: its pairs, and every module that has the pattern's base."""

    pattern: AdapterPattern
    pairs: list[AdapterPair]
    # Sites whose base matched (all of them when base is None), claiming or not.
    candidates: list[str]
    # Every parameter the pattern claims, inactive PEFT adapters included.
    claimed: set[str]


def find_adapter_pairs(
    model: nn.Module, pattern: AdapterPattern | Sequence[AdapterPattern] | None = None
) -> list[AdapterPair]:
    """Find every adapter/base pair in ``model``, in module order.

    A parameter belongs to the deepest site that claims it, so nested modules never
    claim the same adapter twice. Where a site holds several adapters and exposes PEFT's
    ``active_adapters``, only the active ones are pairs. Pairs whose adapter has no
    trainable parameter are returned with ``trainable=False`` and reported in a warning.
    Trainable parameters of an adapter site that no pattern claims, outside its base layer,
    keep training after their adapter freezes; they are reported in a warning that gives a
    pattern claiming them where one can be written.

    With a list of patterns, each pattern is searched on its own and must find pairs; the
    pairs are combined in module order, and a parameter or site found by two patterns is
    an error.

    Args:
        model: Any module (a PEFT model, a DDP wrapper, a hand-written network).
        pattern: Layout to look for, or a list of layouts for a model that mixes them;
            ``None`` means the PEFT tuners LoRA (DoRA, AdaLoRA), LoHa, LoKr and IA3.

    Returns:
        The pairs, in the order of ``model.named_modules()``.

    Raises:
        AdapterDiscoveryError: If a pattern matches nothing, or matches base layers but no
            adapter parameters (the message names the pattern and shows module names);
            if two patterns claim the same parameter or site; if a PEFT IA3 adapter scales
            its base layer's input, which SAFE cannot score.
        TypeError: If ``pattern`` is neither an AdapterPattern nor a list of them.
        ValueError: If ``pattern`` is an empty list.

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
    patterns = _as_patterns(pattern)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    found = [_find(model, p, order) for p in patterns]
    _check_disjoint(found)
    pairs = sorted((pair for f in found for pair in f.pairs), key=lambda pair: order[pair.site])
    _check_scorable(model, pairs)
    idle = [p.name for p in pairs if not p.trainable]
    if idle:
        warnings.warn(
            f"{len(idle)} of {len(pairs)} adapter(s) have no trainable parameter and will not "
            f"be scored or frozen: {idle[:_SAMPLE]}",
            stacklevel=2,
        )
    _report_unclaimed(model, found, order)
    return pairs


def check_adalora_schedule(model: nn.Module, warmup_steps: int) -> None:
    """Refuse a SAFE warm-up that ends while PEFT AdaLoRA still allocates ranks.

    Until step ``total_step - tfinal`` AdaLoRA's ``update_and_allocate`` reads the gradient
    of every ``lora_`` parameter and prunes singular values across all adapters, so it fails
    on a frozen adapter (its gradient is None) and would change frozen values. SAFE freezes
    nothing before ``warmup_steps``; a model without AdaLoRA passes.

    Args:
        model: The model holding the adapters.
        warmup_steps: SAFE's warm-up: the first step at which anything may freeze.

    Raises:
        ValueError: If ``warmup_steps <= total_step - tfinal`` of an AdaLoRA adapter in ``model``.
    """
    for name, module in model.named_modules():
        configs = getattr(module, "peft_config", None)
        if getattr(module, "rankallocator", None) is None or not isinstance(configs, dict):
            continue
        for adapter, config in configs.items():
            total, final = getattr(config, "total_step", None), getattr(config, "tfinal", None)
            if not isinstance(total, int) or not isinstance(final, int):
                continue
            if warmup_steps <= total - final:
                raise ValueError(
                    f"AdaLoRA adapter {adapter!r} of {name or 'the model'!r} allocates ranks until step "
                    f"{total - final} (total_step={total} - tfinal={final}), reading every adapter's "
                    f"gradient, but SAFE may freeze from warmup_steps={warmup_steps}; set "
                    f"SAFEConfig(warmup_steps={total - final + 1}) or more, and call "
                    "update_and_allocate from a step post-hook of the wrapped optimizer"
                )


def attention_modules(model: nn.Module, name: str) -> list[str]:
    """Names of the innermost modules at or below ``model``'s submodule ``name`` whose class name
    ends in "Attention" (``BertSelfAttention`` inside ``BertAttention``, ``LlamaAttention``).

    Example:
        >>> class SelfAttention(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.drop = nn.Dropout(0.1)
        >>> class BlockAttention(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.self, self.out = SelfAttention(), nn.Linear(2, 2)
        >>> model = nn.Sequential(nn.Sequential(BlockAttention(), nn.Dropout(0.1)))
        >>> attention_modules(model, "0")
        ['0.0.self']
    """
    found = [
        _join(name, rel) if rel else name
        for rel, module in model.get_submodule(name).named_modules()
        if type(module).__name__.endswith("Attention")
    ]
    return [n for n in found if not any(o != n and (not n or o.startswith(n + ".")) for o in found)]


def _as_patterns(pattern: object) -> list[AdapterPattern]:
    if pattern is None:
        return [AdapterPattern()]
    if isinstance(pattern, AdapterPattern):
        return [pattern]
    if isinstance(pattern, Sequence) and not isinstance(pattern, (str, bytes)):
        wrong = [type(p).__name__ for p in pattern if not isinstance(p, AdapterPattern)]
        if wrong:
            raise TypeError(
                f"pattern must be an AdapterPattern or a list of them; the list holds {wrong[:3]}"
            )
        if not pattern:
            raise ValueError(
                "pattern is an empty list; pass None for the default or at least one AdapterPattern"
            )
        return list(pattern)
    raise TypeError(
        f"pattern must be an AdapterPattern, a list of them, or None; got {type(pattern).__name__}"
    )


def _find(model: nn.Module, pattern: AdapterPattern, order: dict[str, int]) -> _Found:
    """One pattern's pairs in module order, or the error explaining why it found none."""
    modules = [(name, module) for name, module in model.named_modules() if not _excluded(pattern, name)]
    claimed: set[int] = set()
    claimed_names: set[str] = set()
    found: dict[str, list[AdapterPair]] = {}
    bases_seen: list[str] = []
    candidates: list[str] = []
    # Deepest first, so a parameter goes to the innermost site that matches it.
    for name, module in sorted(modules, key=lambda item: -_depth(item[0])):
        if not re.fullmatch(pattern.site, name):
            continue
        has_base, base = _find_base(name, module, pattern.base)
        if not has_base:
            continue
        candidates.append(name)
        if base is not None:
            bases_seen.append(base)
        groups = _claim_params(name, module, pattern.params, claimed)
        claimed_names.update(n for members in groups.values() for n, _ in members)
        pairs = _pairs_for_site(name, module, base, groups)
        if pairs:
            found[name] = pairs
    pairs = [pair for site in sorted(found, key=order.__getitem__) for pair in found[site]]
    if not pairs:
        bases_seen.sort(key=lambda base: order[base.rpartition(".")[0]])
        raise _no_match_error(model, pattern, bases_seen, len(modules))
    return _Found(pattern, pairs, candidates, claimed_names)


def _excluded(pattern: AdapterPattern, name: str) -> bool:
    return pattern.exclude is not None and re.fullmatch(pattern.exclude, name) is not None


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
    active = _active_adapters(module)
    adapters = list(groups)
    if active is not None and None not in groups:
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


def _active_adapters(module: nn.Module) -> list[str] | None:
    """PEFT's ``active_adapters`` of a tuner layer, or None where the module has none."""
    active = getattr(module, "active_adapters", None)
    if isinstance(active, str):
        return [active]
    if isinstance(active, Sequence):
        return [a for a in active if isinstance(a, str)]
    return None


def _check_disjoint(found: Sequence[_Found]) -> None:
    """No parameter and no pair name may be found by two patterns."""
    if len(found) < 2:
        return
    owner: dict[str, tuple[AdapterPattern, AdapterPair]] = {}
    names: dict[str, AdapterPattern] = {}
    for f in found:
        for pair in f.pairs:
            if pair.name in names:
                raise AdapterDiscoveryError(
                    f"adapter {pair.name!r} is found by two adapter patterns, {names[pair.name]} and "
                    f"{f.pattern}; narrow their site= or exclude= so each site has one pattern"
                )
            names[pair.name] = f.pattern
            for param in pair.param_names:
                if param in owner:
                    first, other = owner[param]
                    raise AdapterDiscoveryError(
                        f"parameter {param!r} is claimed by two adapter patterns: {first} (adapter "
                        f"{other.name!r}) and {f.pattern} (adapter {pair.name!r}); make their params= "
                        "or exclude= regexes disjoint"
                    )
                owner[param] = (f.pattern, pair)


def _check_scorable(model: nn.Module, pairs: Sequence[AdapterPair]) -> None:
    """Refuse PEFT IA3 layers that scale their base layer's *input*: X and Y are one tensor."""
    sites = [
        pair.site
        for pair in pairs
        if pair.trainable
        and pair.base is not None
        and getattr(model.get_submodule(pair.site), "is_feedforward", False) is True
        and isinstance(getattr(model.get_submodule(pair.site), "ia3_l", None), nn.ParameterDict)
    ]
    if not sites:
        return
    generic = "|".join(dict.fromkeys(_generalize(site) for site in sites))
    exclude = f"{_PEFT_HEAD_COPIES}|(?:{generic})(?:\\..*)?"
    raise AdapterDiscoveryError(
        f"{len(sites)} IA3 adapter(s) scale the input of their base layer (IA3Config "
        f"feedforward_modules), e.g. {sites[:3]}: the base layer's output already holds the "
        "scaling, so the base and adapted outputs SAFE compares are one tensor and every such "
        "adapter would score 0 and freeze first. Either let IA3 scale these layers' outputs "
        "(IA3Config(..., feedforward_modules=[])), or leave them out of SAFE so they train "
        f"throughout (no backward savings below them): pattern={_source(AdapterPattern(exclude=exclude))}"
    )


def _generalize(name: str) -> str:
    """A regex for ``name`` with every numeric component (a layer index) generalized."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def _report_unclaimed(model: nn.Module, found: Sequence[_Found], order: dict[str, int]) -> None:
    """Warn about trainable parameters below adapter sites that no pattern claims."""
    claimed = {name for f in found for name in f.claimed}
    pair_sites = {pair.site for f in found for pair in f.pairs}
    seen: set[str] = set()
    # (full name, site, relative name, pattern) of each unclaimed trainable parameter.
    unclaimed: list[tuple[str, str, str, AdapterPattern]] = []
    for f in found:
        # A site is a module that holds a pair, or any module that has the pattern's base layer.
        sites = [s for s in f.candidates if s in pair_sites or f.pattern.base is not None]
        for site in sorted(sites, key=order.__getitem__):
            module = model.get_submodule(site)
            for rel, param in module.named_parameters():
                full = _join(site, rel)
                if (
                    not param.requires_grad
                    or full in claimed
                    or full in seen
                    or _in_base(f.pattern, rel)
                    or _below_excluded(f.pattern, site, rel)
                ):
                    continue
                seen.add(full)
                unclaimed.append((full, site, rel, f.pattern))
    if not unclaimed:
        return
    names = [full for full, *_ in unclaimed]
    pattern = unclaimed[0][3]
    rels = [rel for _, site, rel, p in unclaimed if p == pattern]
    adapters = {pair.adapter for f in found for pair in f.pairs if f.pattern == pattern}
    suggestion = _claiming_pattern(pattern, rels, adapters)
    how = (
        f"a pattern that also claims them: pattern={_source(suggestion)}"
        if suggestion is not None
        else f"extend params={pattern.params!r} to match them, or freeze them yourself"
    )
    warnings.warn(
        f"{len(names)} trainable parameter(s) below adapter sites belong to no adapter, so they keep "
        f"training when their adapter freezes (and backward work still reaches their layer): "
        f"{names[:_SAMPLE]}; {how}",
        stacklevel=3,
    )


def _in_base(pattern: AdapterPattern, rel: str) -> bool:
    """Whether parameter ``rel`` of a site belongs to its base layer: the model's, not an adapter's."""
    child = rel.partition(".")[0]
    return pattern.base is not None and child != rel and re.fullmatch(pattern.base, child) is not None


def _below_excluded(pattern: AdapterPattern, site: str, rel: str) -> bool:
    """Whether parameter ``rel`` of ``site`` lies below a module the pattern excludes."""
    parts = rel.split(".")[:-1]
    return any(_excluded(pattern, _join(site, ".".join(parts[: i + 1]))) for i in range(len(parts)))


def _claiming_pattern(
    pattern: AdapterPattern, rels: Sequence[str], adapters: set[str | None]
) -> AdapterPattern | None:
    """``pattern`` with ``params`` widened to claim ``rels`` as well, where that can be written."""
    if "adapter" not in re.compile(pattern.params).groupindex:
        extra = dict.fromkeys(_generalize(rel) for rel in rels)
        return dataclasses.replace(pattern, params=f"(?:{pattern.params})|" + "|".join(extra))
    form = _PEFT_PARAMS_FORM.fullmatch(pattern.params)
    stems = _new_stems(rels, adapters)
    if form is None or stems is None:
        return None
    return dataclasses.replace(pattern, params=_peft_params([*form.group("stems").split("|"), *stems]))


def _new_stems(rels: Sequence[str], adapters: Iterable[str | None]) -> list[str] | None:
    """The stems of PEFT-style names ``<stem>.<adapter>...``, or None if any name is not one."""
    stems: dict[str, None] = {}
    for rel in rels:
        match = _STEM_NAME.fullmatch(rel)
        if match is None or match.group("adapter") not in adapters:
            return None
        stems[match.group("stem")] = None
    return list(stems)


def _source(pattern: AdapterPattern) -> str:
    """``pattern`` as a line of Python, giving only the fields that differ from the default."""
    default = AdapterPattern()
    fields = []
    for field in dataclasses.fields(AdapterPattern):
        value: Any = getattr(pattern, field.name)
        if value == getattr(default, field.name):
            continue
        raw = isinstance(value, str) and '"' not in value and not value.endswith("\\")
        fields.append(f'{field.name}=r"{value}"' if raw else f"{field.name}={value!r}")
    return f"AdapterPattern({', '.join(fields)})"


def _no_match_error(
    model: nn.Module, pattern: AdapterPattern, bases_seen: list[str], searched: int
) -> AdapterDiscoveryError:
    if bases_seen:
        site = bases_seen[0].rpartition(".")[0]
        module = model.get_submodule(site)
        owned = [rel for rel, _ in module.named_parameters()][:_SAMPLE]
        base = bases_seen[0].rpartition(".")[2]
        trainable = [
            rel for rel, p in module.named_parameters() if p.requires_grad and not rel.startswith(f"{base}.")
        ]
        stems = _new_stems(trainable, _active_adapters(module) or []) if trainable else None
        line = (
            "pass pattern=AdapterPattern(params=...) matching your adapter's parameter names"
            if stems is None
            else "if these adapters add to or scale the base layer's output, pass "
            f"pattern={_source(dataclasses.replace(pattern, params=_peft_params(stems)))}"
        )
        return AdapterDiscoveryError(
            f"adapter pattern {pattern} found {len(bases_seen)} base layer(s) (e.g. "
            f"{bases_seen[0]!r}) among {searched} modules but no adapter parameters matching "
            f"params={pattern.params!r}; parameters under {site!r} are {owned}; {line}"
        )
    names = [n for n, m in model.named_modules() if n and next(m.parameters(False), None) is not None]
    return AdapterDiscoveryError(
        f"adapter pattern {pattern} matched 0 of {searched} modules; first names with "
        f"parameters: {names[:_SAMPLE]}; pass pattern=AdapterPattern(site=..., base=..., "
        "params=...) describing your adapter layout"
    )
