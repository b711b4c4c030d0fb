"""Validation errors as people read them: one line per problem, naming the field."""

from __future__ import annotations

from pydantic import ValidationError


def format_errors(error: ValidationError) -> list[str]:
    """One line per problem: `spec.indexes[0].name: <what is wrong>`."""
    lines = []
    for item in error.errors(include_url=False):
        path = ""
        for part in item["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{path or '(document)'}: {message}")
    return lines
