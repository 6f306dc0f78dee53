"""SPP's place in peft: the `PeftType.SPP` member and the method registration.

peft 0.21's `register_peft_method(name=, config_cls=, model_cls=, prefix=)` accepts only
names already in `PeftType` (a `str`-mixin Enum without an extension hook), and
transformers' `load_adapter` needs a real member (it calls `peft_type.value.lower()` and
derives the state-dict prefix "spp_" from it). `extend_peft_type` adds the member the way
Enum itself stores members; `register` calls peft's registration once (importing
spp_kernels twice, or both spp_kernels.adapters and spp_kernels, is harmless).
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


def register(config_cls: type, tuner_cls: type) -> None:
    """peft.register_peft_method for SPP, once per process."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(SPP_PEFT_TYPE) is config_cls:
        return
    register_peft_method(
        name=METHOD_NAME, config_cls=config_cls, model_cls=tuner_cls, prefix=PREFIX
    )
