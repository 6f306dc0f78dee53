"""SPP's place in peft: the `PeftType.SPP` member and the method's registration.

peft 0.21's `register_peft_method(name=, config_cls=, model_cls=, prefix=)` accepts only
names already in `PeftType` (a `str`-mixin Enum without an extension hook), and
transformers' `load_adapter` needs a real member (it calls `peft_type.value.lower()` and
derives the state-dict prefix "spp_" from it). `extend_peft_type` adds the member the way
Enum itself stores members.

Registration is split so that reading an adapter costs little (the start-up hook runs it
inside `import peft`, see `_spp_kernels_hook`): `register_config` fills peft's prefix and
config mappings (the config module only), `ensure_tuner` adds the tuner (which imports the
op, ~200 ms) when the first SPPConfig is made, before peft reads the tuner mapping. Both
are idempotent; importing spp_kernels twice, or from the hook and the user, is harmless.
"""

from __future__ import annotations

from peft.utils import PeftType

METHOD_NAME = "spp"
PREFIX = "spp_"


def extend_peft_type(name: str) -> PeftType:
    """The `PeftType` member `name` (value == name, like peft's own), added if missing."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # EnumType.__setattr__ refuses to rebind member names; type.__setattr__ does not.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


SPP_PEFT_TYPE = extend_peft_type("SPP")


def register_config(config_cls: type) -> None:
    """PeftType.SPP's prefix "spp_" and config class: all that reading an adapter needs."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    PEFT_TYPE_TO_PREFIX_MAPPING.setdefault(SPP_PEFT_TYPE, PREFIX)
    PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(SPP_PEFT_TYPE, config_cls)


def ensure_tuner() -> None:
    """The tuner's entry in peft's mapping (imported on first need: it pulls in the op)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    if SPP_PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:
        from .model import SPPTuner

        PEFT_TYPE_TO_TUNER_MAPPING[SPP_PEFT_TYPE] = SPPTuner
