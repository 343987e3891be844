"""Fail fast, before any stage runs, when a hub model id cannot be had."""

from __future__ import annotations

import os


class HubUnreachableError(RuntimeError):
    """A hub id is neither in the local cache nor reachable; the message says what to do."""


def check_hub_model(model_id: str, key: str = "model.source") -> None:
    """Pass if `model_id`'s config is cached locally or the hub answers for it; raise otherwise."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    cached = try_to_load_from_cache(model_id, "config.json")
    if isinstance(cached, str):
        return
    advice = (
        f"check the id in {key}, connect to the internet (and log in for gated models), "
        "or download the model once and give its local directory"
    )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise HubUnreachableError(
            f"{key}: hub model {model_id!r} is not in the local cache and HF_HUB_OFFLINE is set; "
            f"unset HF_HUB_OFFLINE (make demo sets it to 1; run with HF_HUB_OFFLINE=0) or {advice}"
        )
    try:
        HfApi().model_info(model_id, timeout=15)
    except Exception as error:  # the hub client raises many types; all mean the same here
        raise HubUnreachableError(f"{key}: hub model {model_id!r} cannot be reached ({error}); {advice}") from error
