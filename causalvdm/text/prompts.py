"""What every text encoder accepts as prompts."""


def prompt_list(prompts: str | list[str]) -> list[str]:
    """One prompt or a list of them -> a non-empty list; an empty list is a ValueError."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("encode needs at least one prompt")
    return prompts
