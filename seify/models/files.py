"""Seify files rebuilt: the model a recipe describes (converted again, or plain), its weights loaded strictly,
and a ``pretrained_cfg`` that says what the file's model is."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..checkpoint import read_state_dict
from ..errors import SeifyError, first_line
from ..gates import find_gates, remove_se
from ..options import SEOptions
from ..surgery import Conversion, add_se
from .classifier import num_classes_of, reset_classifier
from .spec import build, check_known


def from_recipe(recipe: dict) -> tuple[nn.Module, Conversion | None]:
    """(base model, its Conversion or None for a plain file) that a recipe describes, with fresh weights."""
    parent = recipe.get("parent")
    if parent:
        base = model_of(parent)
        if num_classes_of(base) != recipe["num_classes"]:  # fine-tuned on other classes: a new head since
            reset_classifier(base, recipe["num_classes"])
    else:
        check_known(recipe["model"])
        try:
            base = build(recipe["model"], False, recipe["num_classes"], offline=True,
                         model_args=recipe.get("model_args"))
        except (TypeError, ValueError, AssertionError) as e:  # model_args the architecture does not take
            raise SeifyError(f"this file's recipe builds {recipe['model']} with arguments it does not take "
                             f"({first_line(e)[:120]}); the file was altered: convert the model again") from e
        if recipe.get("frozen_batchnorm"):
            freeze_batchnorm(base)
    if recipe.get("options") is None:
        return without_native_gates(base, recipe), None
    conversion = add_se(base, SEOptions.from_dict(recipe["options"]), tuple(recipe["input_size"]))
    without_native_gates(conversion.model, recipe)
    folded = list(recipe.get("folded") or [])  # blocks seify fold took out again
    built = [s.path for s in conversion.sites if s.path not in folded]
    recorded = [s["path"] for s in recipe["sites"]]
    if built != recorded or not set(folded) <= {s.path for s in conversion.sites}:
        raise SeifyError(f"this file was written by seify {recipe['seify_version']} with SE sites that this "
                         f"version places differently ({len(recorded)} recorded, {len(built)} now); convert again")
    if folded:
        slots = {p for p in folded if isinstance(module_or_none(base, p), nn.Identity)}
        remove_se(conversion.model, folded, slots)
        conversion.sites = [s for s in conversion.sites if s.path not in folded]
    return base, conversion


def module_or_none(model: nn.Module, path: str) -> nn.Module | None:
    """The submodule at ``path``, or None where there is none."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def model_of(recipe: dict) -> nn.Module:
    """The model a recipe describes (SE or plain), with fresh weights."""
    base, conversion = from_recipe(recipe)
    return conversion.model if conversion else base


def without_native_gates(model: nn.Module, recipe: dict) -> nn.Module:
    """The network's own gates that ``seify fold`` took out (``folded_native``), out again: each was ``x * gate``
    and is an Identity now, its multiplier in a neighbour's weights. Only gates may be named: taking out any other
    module (an activation, a pool) would compute something else."""
    folded = recipe.get("folded_native") or []
    gates = find_gates(model) if folded else {}
    for path in folded:
        if module_or_none(model, path) is None:
            raise SeifyError(f"this file's recipe names a folded gate at {path}, which its model lacks; fold it again")
        if path not in gates or gates[path].ours:
            raise SeifyError(f"this file's recipe names {path} as a folded gate of the network, and it is none (a "
                             f"{type(model.get_submodule(path)).__name__}); the file was altered: fold the model "
                             "again")
    for path in folded:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, nn.Identity())
    return model


def rebuild(path: str, recipe: dict, meta: bool) -> tuple[nn.Module, nn.Module | None]:
    """(the file's model with its weights, the base it was converted from or None for a plain file); on the
    ``meta`` device the architecture only."""
    base, conversion = from_recipe(recipe)
    model = conversion.model if conversion else base
    if not meta:
        state_dict, _ = read_state_dict(path)
        load_strict(model, state_dict, f"{path}: its weights do not match its recipe", "convert the model again")
    set_pretrained_cfg(model, recipe)
    return model.eval(), base if conversion else None


def load_strict(model: nn.Module, state_dict: dict, what: str, advice: str, fresh: tuple = ()) -> None:
    """Load every key or fail with what is missing, unexpected or misshapen; ``fresh`` keys may be missing.

    A file written once per storage (safetensors) lacks the second name of a tied tensor, and one without
    state_dict metadata (safetensors, a cleaned checkpoint) gets the model's own, which modules that check
    the version of their saved form (torchvision's MNASNet) need.
    """
    expected = model.state_dict()
    loaded = {t.data_ptr() for k, t in expected.items() if k in state_dict and not t.is_meta}
    missing = [k for k in expected if k not in state_dict and k not in fresh and expected[k].data_ptr() not in loaded]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{len(lst)} {kind} ({', '.join(lst[:3])}{', ...' if len(lst) > 3 else ''})"
                 for kind, lst in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if lst]
        raise SeifyError(f"{what}: {'; '.join(parts)}; {advice}")
    if getattr(state_dict, "_metadata", None) is None:
        state_dict = OrderedDict(state_dict)
        state_dict._metadata = getattr(expected, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state_dict, strict=False)  # every key checked above


_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def set_pretrained_cfg(model: nn.Module, recipe: dict) -> None:
    """timm's ``pretrained_cfg`` as the file's model is: the size it was trained at, its classes and their names,
    its normalisation and crop, so that ``timm.data.resolve_data_config(model=...)`` builds the right transforms."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    data = recipe["data_config"]
    if list(cfg.get("input_size", [])) != list(data["input_size"]):  # a test size for another training size
        cfg.pop("test_input_size", None)
        cfg.pop("test_crop_pct", None)
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in _DATA_KEYS})
    cfg["num_classes"] = recipe["num_classes"]
    if recipe.get("classes"):
        cfg["label_names"] = list(recipe["classes"])
    setattr(model, "pretrained_cfg", cfg)  # noqa: B010 (a plain attribute, which nn.Module's typing does not know)
    if hasattr(model, "default_cfg"):
        setattr(model, "default_cfg", cfg)  # noqa: B010


def has_frozen_batchnorm(model: nn.Module) -> bool:
    """torchvision builds pretrained detectors with FrozenBatchNorm2d, and untrained ones with BatchNorm2d."""
    from torchvision.ops import FrozenBatchNorm2d
    return any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())


def freeze_batchnorm(model: nn.Module) -> None:
    """Replace BatchNorm2d by FrozenBatchNorm2d (what a pretrained torchvision detector has), in place."""
    from torchvision.ops import FrozenBatchNorm2d
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(m, child_name, FrozenBatchNorm2d(child.num_features, child.eps))
