"""The Specific Character Set a report carries: the source's, in a form highdicom writes.

highdicom checks the value when it builds an object (its own rule, applied
here so that the node can refuse at ingest what no report could be written
for): known terms only, no single code-extension term, code extensions for
every value of a multi-valued set.  PS3.5 writes the default repertoire as an
empty first value before code extensions (``\\ISO 2022 IR 87``); highdicom
wants the explicit term, ``ISO 2022 IR 6``, which means the same.
"""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.valuerep import _check_specific_character_set  # the check highdicom runs when it writes

#: The default repertoire's term with code extensions (PS3.3 C.12.1.1.2).
DEFAULT_REPERTOIRE_WITH_EXTENSIONS = "ISO 2022 IR 6"


def report_character_set(value: str | Sequence[str] | None) -> str | list[str] | None:
    """The Specific Character Set for a report on a source with *value*; None: the default repertoire.

    Raises
    ------
    ValueError
        highdicom cannot write a report with this character set.
    """
    if value is None:
        return None
    names = [value.strip()] if isinstance(value, str) else [str(v).strip() for v in value]
    if not any(names):
        return None
    if len(names) > 1 and not names[0]:
        names[0] = DEFAULT_REPERTOIRE_WITH_EXTENSIONS
    checked = _check_specific_character_set(names[0] if len(names) == 1 else names)
    return checked if isinstance(checked, str) else list(checked)
