"""The one exception type for bad user input.

Command-line entry points catch `UserInputError`, print its message as one line on stderr and
exit with status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class UserInputError(ValueError):
    """Bad input from the user (path, config, prompt, spec): reported in one line, exit 2."""


def exit_on_user_error(main: Callable[[], object], prog: str) -> NoReturn:
    """Run `main`; turn a `UserInputError` into one line on stderr and exit status 2."""
    try:
        main()
    except UserInputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)
