"""What reasoning-lab takes from files that others produced: weights and settings, never code or its source.

The user's config and command line alone choose the backbone (`name`, `revision`), whether code shipped with a
model may run (`trust_remote_code`) and the attention kernel (`attn_implementation`: a hub kernel is code).
Checkpoints, `training_info.json`, `config.json` and tokenizer files may only record them:
- a recorded `trust_remote_code: true` that the user did not set is refused (one line saying how to allow it);
- a recorded name, revision or kernel that differs from the user's is named in a warning, and the user's is used.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

from core.errors import UserInputError

log = logging.getLogger(__name__)

USER_FIELDS = ("name", "revision", "trust_remote_code", "attn_implementation")
"""Backbone settings that only the user chooses (`models.loading.ModelSpec` fields)."""


def as_mapping(settings: Any) -> dict:
    """A backbone's settings (a ModelSpec, a jsonargparse Namespace or a dict) as a plain dict."""
    if settings is None:
        return {}
    if is_dataclass(settings) and not isinstance(settings, type):
        return asdict(settings)
    if hasattr(settings, "as_dict"):
        return settings.as_dict()
    if isinstance(settings, Mapping):
        return dict(settings)
    raise UserInputError(f"backbone settings of an unexpected type: {type(settings).__name__}")


def with_user_backbone(recorded: Any, user: Any, source: str) -> dict:
    """The backbone settings `source` recorded, with the user's `USER_FIELDS`: what a checkpoint may set (dtype,
    quantisation...) is kept, what chooses code or its origin is the user's. A recorded request for remote code
    that the user did not make is refused; a differing name, revision or kernel is warned about."""
    recorded, user = as_mapping(recorded), as_mapping(user)
    if recorded.get("trust_remote_code") and not user.get("trust_remote_code"):
        raise UserInputError(
            f"{source} records backbone.trust_remote_code: true; code shipped with a model runs only when you "
            f"ask for it: set model.init_args.backbone.trust_remote_code true (or --model.trust_remote_code true) "
            f"if you trust '{recorded.get('name')}'"
        )
    for field in ("name", "revision", "attn_implementation"):
        if field in recorded and recorded[field] != user.get(field):
            log.warning(
                "%s was trained with backbone.%s = %r; using yours, %r (set it in your config to change it)",
                source,
                field,
                recorded[field],
                user.get(field),
            )
    return {**recorded, **{field: user[field] for field in USER_FIELDS if field in user}}


def check_recorded_backbone(recorded: Any, user: Any, source: str) -> None:
    """Refuse or warn about what `source` recorded (see `with_user_backbone`); the user's settings are used."""
    if recorded is not None:
        with_user_backbone(recorded, user, source)


def refuse_custom_code(error: ValueError, name: str) -> UserInputError | None:
    """transformers' refusal to run a folder's or repository's own code without trust_remote_code, as one line
    (None for any other ValueError)."""
    if "contains custom code" not in str(error):
        return None
    return UserInputError(
        f"'{name}' needs its own Python code to load (an auto_map in its config.json or tokenizer_config.json); "
        "reasoning-lab runs such code only when you set model.init_args.backbone.trust_remote_code true "
        "(--model.trust_remote_code true for companion commands), never because a file asks for it"
    )
